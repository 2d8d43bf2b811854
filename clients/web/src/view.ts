// Renders a session: its stored history (ListMessages), then its live events
// (StreamEvents), keyed by message id so that an answer both stored and streamed (a
// page that loaded mid-turn) is shown once.
import type { Duration } from "@bufbuild/protobuf/wkt";
import type { ConverseResponse, Message } from "./gen/switchboard/chat/v1/chat_pb.js";
import { MessageRole, MessageStatus } from "./gen/switchboard/chat/v1/chat_pb.js";
import type { RetrievedChunk } from "./gen/switchboard/rag/v1/rag_pb.js";
import type { Citation } from "./gen/switchboard/common/v1/common_pb.js";
import { StepEventType } from "./gen/switchboard/events/v1/events_pb.js";

type State = "generating" | "completed" | "cancelled" | "failed";

const STATES: Partial<Record<MessageStatus, State>> = {
  [MessageStatus.IN_PROGRESS]: "generating",
  [MessageStatus.COMPLETED]: "completed",
  [MessageStatus.CANCELLED]: "cancelled",
  [MessageStatus.FAILED]: "failed",
};

function el<K extends keyof HTMLElementTagNameMap>(tag: K, cls = "", text = ""): HTMLElementTagNameMap[K] {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (text) node.textContent = text;
  return node;
}

function seconds(d: Duration | undefined): string {
  return d ? `${(Number(d.seconds) + d.nanos / 1e9).toFixed(1)} s` : "?";
}

export class SessionView {
  private readonly bubbles = new Map<string, HTMLElement>();
  private readonly stored = new Set<string>(); // final answers read from the history
  private readonly sent = new Map<string, string>(); // client_message_id → text
  generating = ""; // the assistant message being generated now

  constructor(private readonly list: HTMLElement, private readonly onTurn: () => void) {}

  clear(): void {
    this.list.replaceChildren();
    this.bubbles.clear();
    this.stored.clear();
    this.generating = "";
  }

  /** A message this page sent (shown at once; its turn's TurnStarted names it). */
  sending(clientId: string, text: string): void {
    this.sent.set(clientId, text);
    const bubble = this.add("user", `pending-${clientId}`, text);
    bubble.dataset.clientId = clientId;
  }

  history(messages: Message[]): void {
    for (const m of messages) {
      if (m.role === MessageRole.USER) {
        this.add("user", m.messageId, m.text);
      } else if (m.role === MessageRole.ASSISTANT) {
        const bubble = this.assistant(m.messageId);
        bubble.querySelector(".text")!.textContent = m.text;
        bubble.dataset.state = STATES[m.status] ?? "completed";
        if (m.error) this.note(bubble, m.error.message);
        this.sources(bubble, m.citations, m.passages);
        if (m.status !== MessageStatus.IN_PROGRESS) this.stored.add(m.messageId);
      } else if (m.role === MessageRole.TOOL_CALL && m.toolCall) {
        const call = this.add("tool", m.messageId, `tool ${m.toolCall.tool} (task ${m.toolCall.taskId})`);
        call.dataset.toolCallId = m.toolCall.toolCallId;
      } else if (m.role === MessageRole.TOOL_RESULT && m.toolResult) {
        const result = m.toolResult.error ? `error: ${m.toolResult.error.message}` : JSON.stringify(m.toolResult.output);
        this.add("tool", m.messageId, `result: ${result}`).dataset.toolCallId = m.toolResult.toolCallId;
      }
    }
    this.scroll();
  }

  apply(event: ConverseResponse): void {
    const id = event.messageId;
    if (id && this.stored.has(id)) return; // in the history already
    const frame = event.frame;
    switch (frame.case) {
      case "turnStarted": {
        const started = frame.value;
        const pending = this.list.querySelector<HTMLElement>(`[data-client-id="${CSS.escape(started.clientMessageId)}"]`);
        if (pending) {
          pending.dataset.messageId = started.userMessageId;
          this.bubbles.set(started.userMessageId, pending);
        } else if (!this.bubbles.has(started.userMessageId)) {
          this.add("user", started.userMessageId, this.sent.get(started.clientMessageId) ?? "…");
        }
        this.assistant(started.assistantMessageId).dataset.state = "generating";
        this.generating = started.assistantMessageId;
        this.onTurn();
        break;
      }
      case "queued": {
        const queue = this.part(this.assistant(id), "queue");
        queue.textContent = `waiting in the queue: position ${frame.value.position}, about ${seconds(frame.value.estimatedWait)}`;
        break;
      }
      case "token": {
        const bubble = this.assistant(id);
        bubble.querySelector(".queue")?.remove();
        bubble.querySelector(".text")!.append(frame.value.text);
        break;
      }
      case "toolCall":
        // a turn in progress when the page loaded: its stored call shows here instead
        for (const stored of this.list.querySelectorAll(`.msg.tool[data-tool-call-id="${CSS.escape(frame.value.toolCallId)}"]`)) {
          stored.remove();
        }
        this.part(this.assistant(id), "tool", true).textContent =
          `▶ ${frame.value.tool} ${JSON.stringify(frame.value.arguments ?? {})} (task ${frame.value.taskId})`;
        break;
      case "toolProgress": {
        const step = frame.value.event;
        const tools = this.assistant(id).querySelectorAll<HTMLElement>(".tool");
        const tool = tools.length ? tools[tools.length - 1] : this.part(this.assistant(id), "tool", true);
        const what = step ? StepEventType[step.type].toLowerCase() : "progress";
        tool.append(`\n  step ${step?.stepName ?? ""}: ${what}${step?.error ? ` (${step.error.message})` : ""}`);
        break;
      }
      case "citations":
        this.sources(this.assistant(id), frame.value.citations, frame.value.passages);
        break;
      case "turnCompleted": {
        const bubble = this.assistant(frame.value.assistantMessageId);
        bubble.querySelector(".queue")?.remove();
        bubble.dataset.state = STATES[frame.value.status] ?? "completed";
        if (this.generating === frame.value.assistantMessageId) this.generating = "";
        this.onTurn();
        break;
      }
      case "error": {
        const status = frame.value.status;
        const text = status ? status.message : "error";
        const target = id ? this.assistant(id) : this.list.querySelector<HTMLElement>(
          `[data-client-id="${CSS.escape(frame.value.clientMessageId)}"]`);
        if (target) this.note(target, text);
        break;
      }
      default:
        break;
    }
    this.scroll();
  }

  private add(kind: string, id: string, text: string): HTMLElement {
    const bubble = el("li", `msg ${kind}`);
    bubble.dataset.messageId = id;
    bubble.append(el("div", "meta", kind), el("div", "text", text));
    this.list.append(bubble);
    this.bubbles.set(id, bubble);
    return bubble;
  }

  private assistant(id: string): HTMLElement {
    return this.bubbles.get(id) ?? this.add("assistant", id, "");
  }

  /** A child of the bubble above its text (queue, tool, sources...). */
  private part(bubble: HTMLElement, cls: string, fresh = false): HTMLElement {
    let node = fresh ? null : bubble.querySelector<HTMLElement>(`.${cls}`);
    if (!node) {
      node = el("div", cls);
      bubble.insertBefore(node, bubble.querySelector(".text"));
    }
    return node;
  }

  private note(bubble: HTMLElement, text: string): void {
    bubble.append(el("div", "error", text));
  }

  private sources(bubble: HTMLElement, citations: Citation[], passages: RetrievedChunk[]): void {
    if (!passages.length) return;
    bubble.querySelector(".sources")?.remove();
    const list = el("ol", "sources");
    const cited = new Set(citations.map((c) => c.passageIndex));
    passages.forEach((passage, index) => {
      const item = el("li");
      const link = el("a", "source", `${passage.documentId}${cited.has(index) ? " (cited)" : ""}`);
      link.href = `#${bubble.dataset.messageId}-${index}`;
      const text = el("span", "passage", passage.text);
      text.hidden = true;
      link.addEventListener("click", (e) => {
        e.preventDefault();
        text.hidden = !text.hidden;
      });
      item.append(link, text);
      list.append(item);
    });
    bubble.append(list);
  }

  private scroll(): void {
    this.list.scrollTop = this.list.scrollHeight;
  }
}
