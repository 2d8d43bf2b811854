#!/usr/bin/env node
// A Node.js client of switchboard.chat.v1.ChatService, with stubs loaded from proto/ at
// run time (@grpc/proto-loader), talking to the mesh through Envoy.
//
// It holds one conversation: CreateSession, a Converse stream opened on the session, the
// first question sent and the others sent while its answer streams in; then, optionally,
// a settings change and one more question whose stream it drops (call.cancel()) after a
// few tokens, resuming on a new stream from the last event id it saw; finally it
// half-closes and waits for the server to end the stream.
//
// Every frame received is printed to stdout as one JSON line (`stream`, `kind`,
// `event_id`, `message_id` and the frame's fields: proto field names, enums as names),
// and so is every frame sent (`kind` "sent"). A call that fails prints an `rpc_error` line (gRPC code, message and
// the ErrorInfo reason from `grpc-status-details-bin`) and exits with status 1.
//
//   node clients/node/converse.mjs --target localhost:8080 --api-key "$KEY" \
//     --collection handbook --question "Who approves expense reports?"
//
// Run with --help for every option.

import { existsSync } from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";

import grpc from "@grpc/grpc-js";
import protoLoader from "@grpc/proto-loader";
import protobuf from "protobufjs";

const REPO = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..", "..");
const CHAT_PROTO = "switchboard/chat/v1/chat_service.proto";
const STATUS_PROTOS = ["google/rpc/status.proto", "google/rpc/error_details.proto"];
const USAGE = `usage: converse.mjs [options]

  --target HOST:PORT      Envoy's public listener ($SWITCHBOARD_TARGET, default localhost:8080)
  --api-key KEY           the tenant's API key, sent as \`authorization: Bearer KEY\`
                          ($SWITCHBOARD_API_KEY; the key decides the tenant)
  --proto-path DIR        an include directory, repeatable ($SWITCHBOARD_PROTO_PATH, ':'-separated);
                          proto/ is always first; one must hold google/rpc/*.proto (default
                          .tools/googleapis, which \`make lint\` fills; or the site-packages of
                          googleapis-common-protos)
  --collection NAME       RAG collection the session retrieves from (default: none)
  --top-k N               chunks retrieved per message (default: the service's)
  --model NAME            model of the session (default: the router's choice)
  --system-prompt TEXT    the session's system prompt
  --question TEXT         a question, repeatable; the second and later ones are sent while
                          the first answer streams (default: two questions)
  --resume-question TEXT  one more question: its stream is dropped after --drop-after tokens
                          and resumed from the last event id (default: none)
  --resume-settings JSON  SessionSettings fields (proto names) changed with ChangeSettings
                          before that question, e.g. '{"model":"generator_large"}'
  --drop-after N          tokens of the resumed answer read before the drop (default 3)
  --timeout SECONDS       deadline of the whole conversation (default 120)
`;

function options() {
  const { values } = parseArgs({
    options: {
      target: { type: "string", default: process.env.SWITCHBOARD_TARGET || "localhost:8080" },
      "api-key": { type: "string", default: process.env.SWITCHBOARD_API_KEY || "" },
      "proto-path": { type: "string", multiple: true, default: [] },
      collection: { type: "string", default: "" },
      "top-k": { type: "string", default: "0" },
      model: { type: "string", default: "" },
      "system-prompt": { type: "string", default: "" },
      question: { type: "string", multiple: true, default: [] },
      "resume-question": { type: "string", default: "" },
      "resume-settings": { type: "string", default: "" },
      "drop-after": { type: "string", default: "3" },
      timeout: { type: "string", default: "120" },
      help: { type: "boolean", default: false },
    },
  });
  if (values.help) {
    process.stdout.write(USAGE);
    process.exit(0);
  }
  const fromEnv = (process.env.SWITCHBOARD_PROTO_PATH || "").split(":").filter(Boolean);
  // the contracts, and the protovalidate rules they are annotated with (vendored)
  const own = [path.join(REPO, "proto"), path.join(REPO, "third_party", "protovalidate")];
  const includes = [...own, ...values["proto-path"], ...fromEnv];
  if (includes.length === own.length) includes.push(path.join(REPO, ".tools", "googleapis"));
  const opts = {
    target: values.target,
    apiKey: values["api-key"],
    includes,
    settings: {
      collection: values.collection,
      retrieval_top_k: integer(values["top-k"], "--top-k"),
      model: values.model,
      system_prompt: values["system-prompt"],
    },
    questions: values.question.length
      ? values.question
      : ["How long is an on-call shift?", "Who approves expense reports?"],
    resumeQuestion: values["resume-question"],
    resumeSettings: values["resume-settings"] ? JSON.parse(values["resume-settings"]) : null,
    dropAfter: integer(values["drop-after"], "--drop-after"),
    timeoutMs: integer(values.timeout, "--timeout") * 1000,
  };
  if (!opts.apiKey) usageError("an API key is required: --api-key or $SWITCHBOARD_API_KEY");
  if (!includes.some((dir) => existsSync(path.join(dir, STATUS_PROTOS[0])))) {
    usageError(
      "no --proto-path holds google/rpc/status.proto; pass the directory of " +
        "googleapis-common-protos, e.g. $(.venv/bin/python -c " +
        "'import pathlib, google.rpc.status_pb2 as m; " +
        "print(pathlib.Path(m.__file__).parents[2])')",
    );
  }
  return opts;
}

function integer(text, flag) {
  const n = Number(text);
  if (!Number.isInteger(n) || n < 0) usageError(`${flag} wants a whole number, not ${text}`);
  return n;
}

function usageError(message) {
  process.stderr.write(`converse.mjs: ${message}\n\n${USAGE}`);
  process.exit(2);
}

/** One JSON line on stdout; Buffers (bytes fields) as base64. */
function emit(record) {
  const json = JSON.stringify(record, (_, v) =>
    v && v.type === "Buffer" && Array.isArray(v.data) ? Buffer.from(v.data).toString("base64") : v,
  );
  process.stdout.write(`${json}\n`);
}

/** Decodes google.rpc.Status and its ErrorInfo, to print the reason a client acts on. */
class ErrorModel {
  constructor(includes) {
    const root = new protobuf.Root();
    root.resolvePath = (origin, target) =>
      includes.map((dir) => path.join(dir, target)).find(existsSync) || target;
    root.loadSync(STATUS_PROTOS, { keepCase: true });
    this.status = root.lookupType("google.rpc.Status");
    this.errorInfo = root.lookupType("google.rpc.ErrorInfo");
  }

  /** The ErrorInfo of a Status's `details` (type_url/value pairs), or null. */
  errorInfoOf(details) {
    const info = (details || []).find((d) => d.type_url.endsWith("/google.rpc.ErrorInfo"));
    return info ? this.errorInfo.toObject(this.errorInfo.decode(info.value)) : null;
  }

  /** The ErrorInfo of a failed call's `grpc-status-details-bin` trailer, or null. */
  errorInfoOfCall(error) {
    const [bin] = error.metadata ? error.metadata.get("grpc-status-details-bin") : [];
    if (!bin) return null;
    const status = this.status.toObject(this.status.decode(bin), { bytes: Buffer });
    return this.errorInfoOf(status.details);
  }
}

class CallFailed extends Error {
  constructor(error) {
    super(error.message);
    this.error = error;
  }
}

/** One Converse stream, read frame by frame. */
class Stream {
  constructor(chat, metadata, deadline, errors, number, first) {
    this.number = number;
    this.errors = errors;
    this.call = chat.Converse(metadata, { deadline });
    this.frames = this.call[Symbol.asyncIterator]();
    this.ended = new Promise((resolve) => this.call.on("status", resolve));
    this.send(first);
  }

  send(request) {
    const [kind] = Object.keys(request);
    emit({ stream: this.number, kind: "sent", frame: kind, [kind]: request[kind] });
    this.call.write(request);
  }

  /** The next frame, printed; null once the server ended the stream. */
  async next() {
    let item;
    try {
      item = await this.frames.next();
    } catch (error) {
      throw new CallFailed(error);
    }
    if (item.done) return null;
    const frame = item.value;
    const record = {
      stream: this.number,
      kind: frame.frame,
      event_id: frame.event_id,
      message_id: frame.message_id,
      [frame.frame]: frame[frame.frame],
    };
    if (frame.frame === "error") {
      record.reason = this.errors.errorInfoOf(frame.error.status?.details)?.reason ?? "";
    }
    emit(record);
    return frame;
  }

  /** Frames until `done(frame)` is true, that frame included. */
  async until(done) {
    const seen = [];
    for (;;) {
      const frame = await this.next();
      if (frame === null) throw new Error(`stream ${this.number} ended early`);
      seen.push(frame);
      if (done(frame)) return seen;
    }
  }

  /** Half-closes, reads what the server still sends, and waits for the status. */
  async close() {
    this.call.end();
    while ((await this.next()) !== null);
    return this.finished();
  }

  /** Drops the stream as a lost connection would. */
  async drop() {
    this.call.on("error", () => {}); // the CANCELLED status is expected
    this.call.cancel();
    return this.finished();
  }

  async finished() {
    const status = await this.ended;
    emit({ stream: this.number, kind: "stream_end", code: status.code, details: status.details });
    return status;
  }
}

const isCompleted = (frame) => frame.frame === "turn_completed";

async function converse(opts, chat, metadata, errors) {
  const deadline = new Date(Date.now() + opts.timeoutMs);
  const unary = (method, request) =>
    new Promise((resolve, reject) =>
      chat[method](request, metadata, { deadline: new Date(Date.now() + 10_000) }, (error, reply) =>
        error ? reject(new CallFailed(error)) : resolve(reply),
      ),
    );

  const { session } = await unary("CreateSession", {
    title: "node client",
    settings: opts.settings,
  });
  emit({ kind: "session", session });
  const sessionId = session.session_id;

  let stream = new Stream(chat, metadata, deadline, errors, 1, { open: { session_id: sessionId } });
  const opened = await stream.next();
  if (opened?.frame !== "opened") throw new Error(`expected opened, got ${opened?.frame}`);

  const [first, ...others] = opts.questions;
  let completed = 0;
  const counted = (frame) => isCompleted(frame) && ++completed > 0;
  stream.send({ message: { client_message_id: "q1", text: first } });
  // the other questions go out while the first answer is streaming: they wait their turn
  await stream.until((f) => f.frame === "token" || counted(f));
  others.forEach((text, i) => stream.send({ message: { client_message_id: `q${i + 2}`, text } }));
  if (completed < opts.questions.length) {
    await stream.until((f) => counted(f) && completed === opts.questions.length);
  }

  if (opts.resumeQuestion) {
    if (opts.resumeSettings) {
      const settings = opts.resumeSettings;
      stream.send({ settings: { settings, update_mask: { paths: Object.keys(settings) } } });
      const reply = await stream.next();
      if (reply?.frame !== "settings_changed") {
        throw new Error(`expected settings_changed, got ${reply?.frame}`);
      }
    }
    stream.send({ message: { client_message_id: "r1", text: opts.resumeQuestion } });
    let tokens = 0;
    const seen = await stream.until(
      (f) => (f.frame === "token" && ++tokens === opts.dropAfter) || isCompleted(f),
    );
    const lastEventId = seen.at(-1).event_id;
    emit({ stream: 1, kind: "dropped", last_event_id: lastEventId });
    await stream.drop();

    stream = new Stream(chat, metadata, deadline, errors, 2, {
      resume: { session_id: sessionId, last_event_id: lastEventId },
    });
    const resumed = await stream.next();
    if (resumed?.frame !== "opened") throw new Error(`expected opened, got ${resumed?.frame}`);
    if (!isCompleted(seen.at(-1))) await stream.until(isCompleted);
  }

  const status = await stream.close();
  return status.code === grpc.status.OK;
}

async function main() {
  const opts = options();
  const definition = protoLoader.loadSync(CHAT_PROTO, {
    includeDirs: opts.includes,
    keepCase: true,
    enums: String,
    longs: String,
    defaults: true,
    oneofs: true,
  });
  const { ChatService } = grpc.loadPackageDefinition(definition).switchboard.chat.v1;
  const chat = new ChatService(opts.target, grpc.credentials.createInsecure());
  const metadata = new grpc.Metadata();
  metadata.set("authorization", `Bearer ${opts.apiKey}`);
  const errors = new ErrorModel(opts.includes);
  try {
    return (await converse(opts, chat, metadata, errors)) ? 0 : 1;
  } catch (failure) {
    if (!(failure instanceof CallFailed)) {
      emit({ kind: "client_error", message: String(failure.stack || failure) });
      return 1;
    }
    const { error } = failure;
    const info = errors.errorInfoOfCall(error);
    emit({
      kind: "rpc_error",
      code: error.code,
      code_name: grpc.status[error.code],
      details: error.details,
      reason: info?.reason ?? "",
      domain: info?.domain ?? "",
    });
    const name = grpc.status[error.code];
    process.stderr.write(`converse.mjs: ${name} (${error.code}): ${error.details}\n`);
    return 1;
  } finally {
    chat.close();
  }
}

process.exitCode = await main();
