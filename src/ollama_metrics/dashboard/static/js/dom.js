// DOM building and number formatting. Stored text only ever enters the page as text:
// `el` appends strings as text nodes and sets attributes with setAttribute; nothing here
// parses HTML.

// The one word for a missing value (no model, a timing never measured), as the CLI writes it.
export const DASH = "-";

export const $ = (id) => document.getElementById(id);

export function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = String(value);
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === undefined || child === null || child === false) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

// Replace a table body's rows; `empty` is the text of a single full-width row when none.
export function fillTable(tbody, rows, empty) {
  const columns = tbody.closest("table").tHead.rows[0].cells.length;
  if (rows.length === 0) {
    tbody.replaceChildren(el("tr", {}, el("td", { class: "empty", colspan: columns, text: empty })));
  } else {
    tbody.replaceChildren(...rows);
  }
}

export function setText(id, text) {
  const node = $(id);
  if (node.textContent !== text) node.textContent = text;
}

const missing = (x) => x === null || x === undefined || !Number.isFinite(x);

export function fmtNumber(x) {
  if (missing(x)) return DASH;
  const a = Math.abs(x);
  if (a === 0) return "0";
  if (a >= 1000) return Math.round(x).toLocaleString("en-US");
  // Three significant digits at most, trailing zeros dropped: 123, 12.3, 1.23, 0.012.
  return String(Number(a >= 1 ? x.toFixed(a >= 100 ? 0 : a >= 10 ? 1 : 2) : x.toPrecision(2)));
}

// A rate given per second, in the unit that makes it readable: 2.5/s, 12/min, 0.4/h.
export function fmtRate(perSecond) {
  if (missing(perSecond)) return DASH;
  if (perSecond === 0 || perSecond >= 1) return `${fmtNumber(perSecond)}/s`;
  if (perSecond * 60 >= 1) return `${fmtNumber(perSecond * 60)}/min`;
  return `${fmtNumber(perSecond * 3600)}/h`;
}

export const plural = (n, word) => `${fmtInt(n)} ${word}${n === 1 ? "" : "s"}`;

export function fmtInt(x) {
  return missing(x) ? DASH : Math.round(x).toLocaleString("en-US");
}

export function fmtSeconds(s) {
  if (missing(s)) return DASH;
  const ms = s * 1000;
  if (ms === 0) return "0 ms";
  if (ms < 9.95) return `${Number(ms.toPrecision(2))} ms`;
  if (ms < 999.5) return `${Math.round(ms)} ms`;
  if (s < 99.95) return `${Number(s.toFixed(s < 9.995 ? 2 : 1))} s`;
  const whole = Math.round(s);
  if (whole < 3600) return `${Math.floor(whole / 60)} min ${whole % 60} s`;
  return `${Math.floor(whole / 3600)} h ${Math.round((whole % 3600) / 60)} min`;
}

// Ollama gives a model kept with keep_alive < 0 an expiry decades ahead (units.py's twin).
const FOREVER_SECONDS = 10 * 365 * 24 * 3600;

// Time left, in words as `status` writes it: "forever", "4 minutes", "2 hours", "45 seconds".
export function fmtUntil(seconds) {
  if (missing(seconds)) return DASH;
  if (seconds >= FOREVER_SECONDS) return "forever";
  const left = Math.max(0, Math.round(seconds));
  for (const [unit, scale] of [["day", 86400], ["hour", 3600], ["minute", 60]]) {
    if (left >= scale) {
      const n = Math.round(left / scale);
      return `${n} ${unit}${n === 1 ? "" : "s"}`;
    }
  }
  return `${left} second${left === 1 ? "" : "s"}`;
}

export function fmtPercent(fraction) {
  if (missing(fraction)) return DASH;
  const p = fraction * 100;
  return `${p === 0 ? "0" : p < 10 ? p.toFixed(1) : p.toFixed(0)}%`;
}

// Bytes as `ollama ps` and the CLI write them (decimal units): 512 B, 4.1 KB, 272 MB, 5.4 GB.
export function fmtBytes(n) {
  if (missing(n) || n < 0) return DASH;
  for (const [unit, scale] of [["TB", 1e12], ["GB", 1e9], ["MB", 1e6], ["KB", 1e3]]) {
    if (n >= scale) {
      const v = n / scale;
      return `${v < 100 ? v.toFixed(1) : v.toFixed(0)} ${unit}`;
    }
  }
  return `${Math.trunc(n)} B`;
}

export function fmtClock(epoch) {
  if (missing(epoch)) return DASH;
  const d = new Date(epoch * 1000);
  const today = new Date().toDateString() === d.toDateString();
  return today
    ? d.toLocaleTimeString("en-GB", { hour: "2-digit", minute: "2-digit", second: "2-digit" })
    : d.toLocaleString("en-GB", { month: "short", day: "numeric", hour: "2-digit", minute: "2-digit" });
}

// A time axis tick: dates for day steps, minutes for longer steps, else seconds too.
export function fmtTick(epoch, step) {
  const d = new Date(epoch * 1000);
  const date = d.toLocaleDateString("en-GB", { day: "numeric", month: "short" });
  if (step >= 86400) return date;
  const time = d.toLocaleTimeString("en-GB", step >= 60
    ? { hour: "2-digit", minute: "2-digit" }
    : { hour: "2-digit", minute: "2-digit", second: "2-digit" });
  return d.getHours() === 0 && d.getMinutes() === 0 && d.getSeconds() === 0 ? date : time;
}

export function fmtDateTime(epoch) {
  if (missing(epoch)) return DASH;
  const d = new Date(epoch * 1000);
  const ms = String(d.getMilliseconds()).padStart(3, "0");
  return `${d.toLocaleString("en-GB", { dateStyle: "medium", timeStyle: "medium" })}.${ms}`;
}

export const pair = (a, b, format) => `${format(a)} / ${format(b)}`;

// The first words of a text, on one line.
// A table cell's value shortened with an ellipsis (its whole value in the tooltip and the
// detail view): one record's 100,000-character model name must not widen the page.
export function cell(value, chars = 40) {
  if (value === null || value === undefined || value === "") return { text: DASH };
  const text = String(value);
  return { text: preview(text, chars), title: text.length > chars ? text.slice(0, 2000) : undefined };
}

export function preview(text, chars = 140) {
  if (!text) return "";
  const line = String(text).replace(/\s+/g, " ").trim();
  return line.length > chars ? `${line.slice(0, chars - 1)}…` : line;
}

export const OUTCOMES = {
  success: "success",
  error: "error",
  upstream_error: "unreachable",
  cancelled: "cancelled",
};

export function badge(outcome, httpStatus) {
  const known = Object.hasOwn(OUTCOMES, outcome) ? outcome : "";
  const label = OUTCOMES[known] || outcome || "?";
  return el("span", { class: `badge outcome-${known || "other"}`, text: httpStatus ? `${label} ${httpStatus}` : label });
}
