// The detail view of one interaction (/analytics/messages/{id}) in a modal <dialog>: the
// whole conversation with roles, the reply, thinking and tool calls, timings, token figures
// and the error. All of it is text.

import { get } from "./api.js";
import {
  $, DASH, badge, el, fmtBytes, fmtDateTime, fmtInt, fmtNumber, fmtSeconds,
} from "./dom.js";

const ROLES = new Set(["system", "user", "assistant", "tool"]);

export class Detail {
  constructor() {
    this.dialog = $("detail");
    this.body = $("detail-body");
    this.seq = 0;
    $("detail-close").addEventListener("click", () => this.dialog.close());
    // A click on the backdrop lands on the dialog itself; inside, on its children.
    this.dialog.addEventListener("click", (event) => {
      if (event.target === this.dialog) this.dialog.close();
    });
  }

  async open(id) {
    const seq = ++this.seq;
    $("detail-title").textContent = "Interaction";
    this.body.replaceChildren(el("p", { class: "muted", text: "Loading…" }));
    if (!this.dialog.open) this.dialog.showModal();
    let record;
    try {
      record = await get(`/analytics/messages/${encodeURIComponent(id)}`);
    } catch (error) {
      if (seq === this.seq) this.body.replaceChildren(el("p", { class: "error", text: error.message }));
      return;
    }
    if (seq !== this.seq) return;
    $("detail-title").replaceChildren(`${record.model ?? "no model"} · ${record.endpoint ?? record.path ?? ""} `,
      badge(record.outcome, record.http_status));
    this.body.replaceChildren(...render(record));
  }
}

function fact(label, value) {
  return el("div", {}, el("dt", { text: label }), el("dd", { text: value }));
}

function message(role, text, extras = []) {
  const known = ROLES.has(role) ? role : "other";
  return el("div", { class: `msg role-${known}` },
    el("div", { class: "role" }, el("span", { text: role })),
    text === null || text === undefined || text === "" ? null : el("pre", { class: "text", text }),
    extras);
}

function json(value) {
  return el("pre", { class: "json", text: JSON.stringify(value, null, 2) });
}

function messageExtras(m) {
  const extras = [];
  if (m.thinking) extras.push(el("details", {}, el("summary", { text: "thinking" }), el("pre", { class: "text", text: String(m.thinking) })));
  if (m.tool_calls) extras.push(json(m.tool_calls));
  if (m.images) extras.push(el("p", { class: "muted small text", text: `${m.images.length} image(s)` }));
  return extras;
}

function render(r) {
  const parts = [];
  parts.push(el("dl", { class: "facts" },
    fact("Started", fmtDateTime(r.started_at)),
    fact("Duration", fmtSeconds(r.duration)),
    fact("Time to first token", fmtSeconds(r.ttft)),
    fact("Ollama total", fmtSeconds(r.total_duration)),
    fact("Load", fmtSeconds(r.load_duration)),
    fact("Prompt eval", fmtSeconds(r.prompt_eval_duration)),
    fact("Generation", fmtSeconds(r.eval_duration)),
    fact("Prompt tokens", fmtInt(r.prompt_tokens)),
    fact("Output tokens", r.tokens_estimated
      ? `${fmtInt(r.completion_tokens)} (counted by the proxy: an estimate)`
      : fmtInt(r.completion_tokens)),
    fact("Tokens/s", fmtNumber(r.tokens_per_second)),
    fact("Request / reply size", `${fmtBytes(r.request_bytes)} / ${fmtBytes(r.response_bytes)}`),
    fact("Done reason", r.done_reason ?? DASH),
    fact("Category", r.prompt_category ?? DASH),
    fact("Streamed", r.stream === null ? DASH : r.stream ? "yes" : "no"),
    fact("Request", `${r.method ?? ""} ${r.path ?? ""}`),
    fact("Client", r.client_ip ?? DASH),
    fact("User agent", r.user_agent ?? DASH),
    r.embedding_dims ? fact("Embedding size", fmtInt(r.embedding_dims)) : null,
    r.image_count ? fact("Images", fmtInt(r.image_count)) : null,
    fact("Captured", `${r.capture ?? DASH}${r.truncated ? ", truncated" : ""}${
      Array.isArray(r.truncated_fields) ? ` (${r.truncated_fields.join(", ")})` : ""}`),
    fact("Id", r.id),
  ));
  if (r.error) parts.push(el("h3", { text: "Error" }), el("div", { class: "msg error-box" }, el("pre", { class: "text", text: r.error })));

  parts.push(el("h3", { text: "Conversation" }));
  const messages = Array.isArray(r.messages) ? r.messages : null;
  if (r.system && !(messages && messages.some((m) => m.role === "system"))) parts.push(message("system", r.system));
  if (messages) {
    for (const m of messages) {
      if (typeof m.elided === "number") {
        parts.push(el("p", { class: "muted small", text: `… ${fmtInt(m.elided)} messages not stored …` }));
      } else {
        parts.push(message(String(m.role ?? "?"), m.content, messageExtras(m)));
      }
    }
  } else if (r.prompt !== null) {
    parts.push(message(r.embedding_dims ? "input" : "prompt", r.prompt));
  }
  if (r.capture === "metadata") parts.push(el("p", { class: "muted", text: "Texts are not recorded (capture level: metadata)." }));

  parts.push(el("h3", { text: "Response" }));
  const reply = [];
  if (r.thinking) reply.push(el("details", {}, el("summary", { text: "thinking" }), el("pre", { class: "text", text: r.thinking })));
  if (r.tool_calls) reply.push(el("div", { class: "muted small text", text: "tool calls" }), json(r.tool_calls));
  if (r.response === null && reply.length === 0) {
    parts.push(el("p", { class: "muted", text: "No reply text was recorded." }));
  } else {
    parts.push(message("assistant", r.response, reply));
  }
  if (r.options) parts.push(el("details", {}, el("summary", { text: "Request options" }), json(r.options)));
  if (r.images) parts.push(el("details", {}, el("summary", { text: "Images (size and sha256)" }), json(r.images)));
  return parts;
}
