// The interactions table: full-text search and filters over /analytics/search, paged with
// its next_cursor. A row opens the detail view.

import { get } from "./api.js";
import { $, DASH, badge, cell, el, fillTable, fmtClock, fmtDateTime, fmtInt, fmtSeconds, preview } from "./dom.js";

const PAGE_SIZE = 50;
// The prompt categories of ollama_metrics.categorize.CATEGORIES (a test keeps them in step).
const CATEGORIES = ["summarize", "translate", "explain", "code_write", "code_debug", "question",
  "creative", "analyze", "help", "list", "empty", "other"];

export class Interactions {
  constructor(open) {
    this.open = open;
    this.cursors = [null]; // the cursor of each page seen; page 0 has none
    this.page = 0;
    this.next = null;
    this.shown = "";
    this.seq = 0;
    this.inputs = ["f-q", "f-model", "f-category", "f-status", "f-since"].map($);
    const category = $("f-category");
    for (const name of CATEGORIES) category.append(el("option", { value: name, text: name.replace("_", " ") }));
    let typing = null;
    $("f-q").addEventListener("input", () => {
      clearTimeout(typing);
      typing = setTimeout(() => this.reload(), 250);
    });
    for (const input of this.inputs.slice(1)) input.addEventListener("change", () => this.reload());
    $("older").addEventListener("click", () => this.turn(1));
    $("newer").addEventListener("click", () => this.turn(-1));
    $("interactions").tBodies[0].addEventListener("click", (event) => {
      const row = event.target.closest("tr[data-id]");
      if (row) this.open(row.dataset.id);
    });
  }

  params() {
    const [q, model, category, status, since] = this.inputs.map((input) => input.value.trim());
    const params = { limit: PAGE_SIZE, prompt_search: q, model, prompt_category: category, status, since };
    if (this.cursors[this.page] !== null) params.cursor = this.cursors[this.page];
    return params;
  }

  reload() {
    this.cursors = [null];
    this.page = 0;
    return this.load();
  }

  turn(by) {
    if (by > 0) {
      if (this.next === null) return undefined;
      this.cursors[this.page + 1] = this.next;
    } else if (this.page === 0) {
      return undefined;
    }
    this.page += by;
    return this.load();
  }

  // Keep the first page current; later pages stay as they were when opened.
  refresh() {
    return this.page === 0 ? this.load() : undefined;
  }

  async load() {
    const seq = ++this.seq;
    let body;
    try {
      body = await get("/analytics/search", this.params());
    } catch (error) {
      if (seq !== this.seq) return;
      // The reason takes the rows' place: rows left from an earlier search would read as
      // this search's answer.
      const reason = error.status === 400 ? error.message : `Cannot search: ${error.message}`;
      const message = $("search-error");
      message.textContent = reason;
      message.hidden = false;
      this.next = null;
      this.shown = null;
      $("older").disabled = true;
      $("page-info").textContent = "";
      fillTable($("interactions").tBodies[0], [], reason);
      return;
    }
    if (seq !== this.seq) return; // a newer search has been asked for meanwhile
    $("search-error").hidden = true;
    this.next = body.next_cursor;
    $("older").disabled = this.next === null;
    $("newer").disabled = this.page === 0;
    const first = this.page * PAGE_SIZE + 1;
    $("page-info").textContent = body.count
      ? `${fmtInt(first)}–${fmtInt(first + body.count - 1)}`
      : "";
    const shown = JSON.stringify([this.page, body.results.map((r) => r.id)]);
    if (shown === this.shown) return; // nothing new: keep the rows (and keyboard focus)
    this.shown = shown;
    fillTable($("interactions").tBodies[0], body.results.map(row), "No interactions match.");
  }

  async fillModels() {
    const select = $("f-model");
    const { models } = await get("/analytics/models");
    const known = new Set([...select.options].map((o) => o.value));
    for (const m of models) {
      if (m.model !== null && !known.has(m.model)) select.append(el("option", { value: m.model, text: preview(m.model, 60) }));
    }
  }
}

function row(r) {
  const tokens = `${r.prompt_tokens ?? DASH} / ${r.completion_tokens ?? DASH}`;
  return el("tr", { "data-id": r.id },
    el("td", {}, el("button", { type: "button", class: "rowlink", title: fmtDateTime(r.started_at), text: fmtClock(r.started_at) })),
    el("td", cell(r.model)),
    el("td", cell(r.endpoint, 32)),
    el("td", {}, badge(r.outcome, r.http_status)),
    el("td", { class: "num", text: tokens }),
    el("td", { class: "num", text: fmtSeconds(r.ttft) }),
    el("td", { class: "num", text: fmtSeconds(r.duration) }),
    el("td", cell(r.prompt_category, 24)),
    el("td", { class: "prompt", title: preview(r.prompt, 400), text: preview(r.prompt) }),
  );
}
