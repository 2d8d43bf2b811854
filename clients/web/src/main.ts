// The chat page: an API key, a session (picked or created), its history and its live
// events. A message goes out with SendMessage, a cancel with CancelTurn; the answer
// arrives on StreamEvents, which the page re-opens after a dropped connection from the
// last event it saw (no gap, no repeat) and, after a reload, from the turn in progress.
import { Code } from "@connectrpc/connect";
import { chatClient, code, describe, ragClient, reason, type Chat, type Rag } from "./api.js";
import type { Session } from "./gen/switchboard/chat/v1/chat_pb.js";
import { SessionView } from "./view.js";

const $ = <T extends HTMLElement>(id: string) => document.getElementById(id) as T;
const store = window.sessionStorage; // this tab's key and session survive a reload

let key = store.getItem("switchboard.key") ?? "";
let current = "";
let watching: AbortController | null = null;
const chat: Chat = chatClient(() => key);
const rag: Rag = ragClient(() => key);
const collections = new Map<string, string>(); // session id -> its collection ("" = none)
const view = new SessionView($("messages"), () => buttons());

function status(text: string, error = false): void {
  const node = $("status");
  node.textContent = text;
  node.classList.toggle("error", error);
}

function buttons(): void {
  ($("send") as HTMLButtonElement).disabled = !current;
  ($("cancel") as HTMLButtonElement).disabled = !current || !view.generating;
  ($("upload-button") as HTMLButtonElement).disabled = !collections.get(current);
}

async function listSessions(): Promise<void> {
  const reply = await chat.listSessions({ pageSize: 100 });
  const list = $("sessions");
  list.replaceChildren(
    ...reply.sessions.map((s: Session) => {
      collections.set(s.sessionId, s.settings?.collection ?? "");
      const item = document.createElement("li");
      item.textContent = s.title || s.sessionId.slice(0, 8);
      item.title = `${s.sessionId}${s.settings?.collection ? ` · ${s.settings.collection}` : ""}`;
      item.dataset.sessionId = s.sessionId;
      item.classList.toggle("current", s.sessionId === current);
      item.addEventListener("click", () => void open(s.sessionId));
      return item;
    }),
  );
}

async function open(sessionId: string): Promise<void> {
  watching?.abort();
  current = sessionId;
  store.setItem("switchboard.session", sessionId);
  for (const item of $("sessions").querySelectorAll<HTMLElement>("li")) {
    item.classList.toggle("current", item.dataset.sessionId === sessionId);
  }
  view.clear();
  buttons();
  const abort = (watching = new AbortController());
  void watch(sessionId, abort.signal);
}

/** Streams the session's events until another session is opened; reconnects. */
async function watch(sessionId: string, signal: AbortSignal): Promise<void> {
  let after = ""; // first: from the turn in progress
  let fresh = true;
  let backoff = 250;
  while (!signal.aborted) {
    try {
      for await (const reply of chat.streamEvents({ sessionId, afterEventId: after }, { signal })) {
        const event = reply.event;
        if (!event) continue;
        if (event.frame.case === "opened") {
          if (fresh) {
            view.clear();
            await loadHistory(sessionId);
            fresh = false;
          }
          status(`session ${sessionId.slice(0, 8)}: live`);
          backoff = 250;
        } else {
          view.apply(event);
        }
        after = event.eventId;
      }
    } catch (error) {
      if (signal.aborted) return;
      if (reason(error) === "EVENT_HISTORY_EXPIRED") {
        after = "";
        fresh = true; // too far behind: history, then the turn in progress
      } else if (code(error) === Code.NotFound || code(error) === Code.Unauthenticated) {
        status(describe(error), true);
        return;
      }
      status(`reconnecting (${describe(error)})`, true);
    }
    await new Promise((done) => setTimeout(done, backoff));
    backoff = Math.min(backoff * 2, 5000);
  }
}

async function loadHistory(sessionId: string): Promise<void> {
  let pageToken = "";
  do {
    const page = await chat.listMessages({ sessionId, pageSize: 1000, pageToken });
    view.history(page.messages);
    pageToken = page.nextPageToken;
  } while (pageToken);
}

async function send(): Promise<void> {
  const box = $("text") as HTMLTextAreaElement;
  const text = box.value;
  if (!current || !text.trim()) return;
  const clientMessageId = crypto.randomUUID();
  view.sending(clientMessageId, text);
  box.value = "";
  try {
    await chat.sendMessage({ sessionId: current, message: { clientMessageId, text } });
  } catch (error) {
    status(describe(error), true);
  }
}

function guard(action: () => Promise<void>): (e?: Event) => void {
  return (e) => {
    e?.preventDefault();
    action().catch((error) => status(describe(error), true));
  };
}

$("key-form").addEventListener(
  "submit",
  guard(async () => {
    key = ($("key") as HTMLInputElement).value.trim();
    store.setItem("switchboard.key", key);
    await listSessions();
    status("key accepted: pick or create a session");
  }),
);

$("new-session").addEventListener(
  "submit",
  guard(async () => {
    const title = ($("title") as HTMLInputElement).value.trim();
    const collection = ($("collection") as HTMLInputElement).value.trim();
    const reply = await chat.createSession({ title, settings: { collection } });
    await listSessions();
    if (reply.session) await open(reply.session.sessionId);
  }),
);

/** Uploads the chosen files, one IngestDocument each, into the session's collection
 * (a file's name is its document id: uploading it again replaces it). */
async function upload(): Promise<void> {
  const collection = collections.get(current);
  const input = $("files") as HTMLInputElement;
  if (!collection || !input.files?.length) return;
  let chunks = 0;
  const files = [...input.files];
  for (const [i, file] of files.entries()) {
    status(`uploading ${file.name} (${i + 1} of ${files.length})`);
    const reply = await rag.ingestDocument({
      document: {
        documentId: file.name,
        collection,
        // the bytes as they are: the service refuses text that is not UTF-8
        content: { case: "textUtf8", value: new Uint8Array(await file.arrayBuffer()) },
      },
    });
    chunks += reply.result?.chunks ?? 0;
  }
  input.value = "";
  status(`${files.length} document(s) in ${collection}: ${chunks} chunks`);
}

$("upload").addEventListener("submit", guard(upload));
$("composer").addEventListener("submit", guard(send));
$("text").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) guard(send)(e);
});
$("cancel").addEventListener(
  "click",
  guard(async () => {
    if (current && view.generating) {
      await chat.cancelTurn({ sessionId: current, assistantMessageId: view.generating });
    }
  }),
);

if (key) {
  ($("key") as HTMLInputElement).value = key;
  const last = store.getItem("switchboard.session");
  guard(async () => {
    await listSessions();
    if (last) await open(last);
  })();
}
