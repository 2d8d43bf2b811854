// The page's clients: ChatService and RagService over gRPC-Web to the origin that served
// the page (Envoy's public port), every call carrying the API key pasted into the page.
import { Code, ConnectError, createClient, type Client, type Interceptor } from "@connectrpc/connect";
import { createGrpcWebTransport } from "@connectrpc/connect-web";
import { ErrorInfoSchema } from "./gen/google/rpc/error_details_pb.js";
import { ChatService } from "./gen/switchboard/chat/v1/chat_service_pb.js";
import { RagService } from "./gen/switchboard/rag/v1/rag_service_pb.js";

export type Chat = Client<typeof ChatService>;
export type Rag = Client<typeof RagService>;

function transport(key: () => string) {
  const withKey: Interceptor = (next) => async (request) => {
    request.header.set("authorization", `Bearer ${key()}`);
    return next(request);
  };
  return createGrpcWebTransport({ baseUrl: window.location.origin, interceptors: [withKey] });
}

export function chatClient(key: () => string): Chat {
  return createClient(ChatService, transport(key));
}

/** Documents go up one per call (IngestDocument): a browser cannot stream requests. */
export function ragClient(key: () => string): Rag {
  return createClient(RagService, transport(key));
}

/** The ErrorInfo reason of a Switchboard error (google.rpc.Status details), or "". */
export function reason(error: unknown): string {
  const found = ConnectError.from(error).findDetails(ErrorInfoSchema);
  return found.length ? found[0].reason : "";
}

export function code(error: unknown): Code {
  return ConnectError.from(error).code;
}

export function describe(error: unknown): string {
  const err = ConnectError.from(error);
  const why = reason(err);
  return `${Code[err.code]}${why ? ` ${why}` : ""}: ${err.rawMessage}`;
}
