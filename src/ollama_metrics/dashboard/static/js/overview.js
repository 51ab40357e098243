// The overview: figure cards and charts over the chosen window (/analytics/stats and
// /analytics/timeseries), the per-model table, requests in flight (/analytics/live) and the
// models Ollama has loaded (/analytics/loaded).

import { TimeChart } from "./charts.js";
import {
  $, DASH, cell, el, fillTable, fmtBytes, fmtInt, fmtNumber, fmtPercent, fmtRate, fmtSeconds, fmtUntil, pair,
  plural, setText,
} from "./dom.js";

const perSecond = (n, seconds) => (seconds > 0 ? n / seconds : null);

export class Overview {
  constructor() {
    this.charts = {
      requests: new TimeChart($("ch-requests"), [
        { label: "requests/s", color: "--accent", format: fmtNumber, fill: true },
        { label: "errors/s", color: "--red", format: fmtNumber },
        { label: "error rate", color: "--orange", format: (v) => `${fmtNumber(v)}%`, dash: [4, 3], scale: "pct", points: true },
      ], { yFormat: fmtNumber, percent: true }),
      tokens: new TimeChart($("ch-tokens"), [
        { label: "output tokens/s", color: "--green", format: fmtNumber, fill: true },
        { label: "prompt tokens/s", color: "--purple", format: fmtNumber },
      ], { yFormat: fmtNumber }),
      latency: new TimeChart($("ch-latency"), [
        { label: "p50", color: "--accent", format: fmtSeconds, points: true },
        { label: "p95", color: "--accent-2", format: fmtSeconds, points: true, dash: [4, 3] },
      ], { yFormat: fmtSeconds }),
      ttft: new TimeChart($("ch-ttft"), [
        { label: "p50", color: "--green", format: fmtSeconds, points: true },
        { label: "p95", color: "--green-2", format: fmtSeconds, points: true, dash: [4, 3] },
      ], { yFormat: fmtSeconds }),
    };
  }

  showStats(stats, span) {
    const t = stats.totals;
    setText("c-rps", fmtRate(perSecond(t.requests, span)));
    setText("c-rps-sub", plural(t.requests, "request"));
    setText("c-tps", fmtRate(perSecond(t.completion_tokens, span)));
    setText("c-tps-sub", `${fmtInt(t.completion_tokens)} generated · ${fmtInt(t.prompt_tokens)} prompt`);
    setText("c-lat", pair(t.latency_p50, t.latency_p95, fmtSeconds));
    setText("c-ttft", pair(t.ttft_p50, t.ttft_p95, fmtSeconds));
    setText("c-err", t.requests ? fmtPercent(t.error_rate) : DASH);
    $("c-err").classList.toggle("bad", t.error_rate > 0.05);
    setText("c-err-sub", `${plural(t.errors, "error")} · ${fmtInt(t.cancelled)} cancelled`);
    fillTable($("models").tBodies[0], stats.models.map((m) => el("tr", {},
      el("td", cell(m.model)),
      el("td", { class: "num", text: fmtInt(m.requests) }),
      el("td", { class: "num", text: fmtRate(perSecond(m.requests, span)) }),
      el("td", { class: "num", text: m.errors ? `${fmtInt(m.errors)} (${fmtPercent(m.error_rate)})` : "0" }),
      el("td", { class: "num", text: fmtRate(perSecond(m.completion_tokens, span)) }),
      el("td", { class: "num", text: pair(m.latency_p50, m.latency_p95, fmtSeconds) }),
      el("td", { class: "num", text: pair(m.ttft_p50, m.ttft_p95, fmtSeconds) }),
    )), "No requests in this window.");
  }

  showSeries(body) {
    const points = body.points;
    const xs = points.map((p) => p.start);
    const column = (f) => points.map(f);
    this.charts.requests.show(xs, [
      column((p) => perSecond(p.requests, p.seconds)),
      column((p) => perSecond(p.errors, p.seconds)),
      column((p) => (p.requests ? (100 * p.errors) / p.requests : null)),
    ]);
    this.charts.tokens.show(xs, [
      column((p) => perSecond(p.completion_tokens, p.seconds)),
      column((p) => perSecond(p.prompt_tokens, p.seconds)),
    ]);
    this.charts.latency.show(xs, [column((p) => p.latency_p50), column((p) => p.latency_p95)]);
    this.charts.ttft.show(xs, [column((p) => p.ttft_p50), column((p) => p.ttft_p95)]);
  }

  showLive(live) {
    // All requests in flight; the snapshot lists the longest-running of them (at most 1,000).
    const total = Number.isInteger(live.active_count) ? live.active_count : live.active.length;
    const unlisted = total - live.active.length;
    setText("c-active", fmtInt(total));
    const rows = live.active.map((a) => el("tr", {},
      el("td", cell(a.model)),
      el("td", cell(a.endpoint, 32)),
      el("td", { class: "num", text: fmtSeconds(a.elapsed) }),
      el("td", { class: "num", text: fmtSeconds(a.ttft) }),
      el("td", { class: "num", text: fmtInt(a.chunks) }),
    ));
    if (unlisted > 0) {
      rows.push(el("tr", { class: "more" }, el("td", {
        class: "empty", colspan: 5, text: `+${fmtInt(unlisted)} more, not listed` })));
    }
    fillTable($("active").tBodies[0], rows, "Nothing in flight.");
  }

  showLoaded(loaded) {
    const pill = $("ollama");
    let empty = "Nothing loaded.";
    if (!loaded.polling) {
      pill.className = "pill";
      pill.textContent = "Ollama: not polled";
      empty = "Not polled: the proxy runs with --ps-interval 0.";
    } else if (!loaded.up) {
      pill.className = "pill down";
      pill.textContent = loaded.checked_at ? "Ollama down" : "Ollama …";
      empty = loaded.checked_at ? "Ollama is not answering." : "Not polled yet.";
    } else {
      pill.className = "pill up";
      pill.textContent = loaded.version ? `Ollama ${loaded.version} up` : "Ollama up";
    }
    const now = Date.now() / 1000;
    fillTable($("loaded").tBodies[0], (loaded.models || []).map((m) => {
      const share = m.size > 0 && m.size_vram !== null ? m.size_vram / m.size : null;
      const gpu = share === null ? DASH : share >= 0.995 ? "all on GPU" : share === 0 ? "CPU only" : `${fmtPercent(share)} on GPU`;
      return el("tr", {},
        el("td", cell(m.name)),
        el("td", { class: "num", text: fmtBytes(m.size) }),
        el("td", {},
          el("span", { class: "bar", "aria-hidden": "true" },
            el("span", { "data-share": share ?? 0 })),
          `${fmtBytes(m.size_vram)} · ${gpu}`),
        el("td", { class: "num", text: fmtInt(m.context_length) }),
        el("td", { class: "num", text: m.expires_at ? fmtUntil(m.expires_at - now) : DASH }),
      );
    }), empty);
    // Bar widths through the CSSOM: the policy allows no style attributes.
    for (const bar of $("loaded").querySelectorAll("[data-share]")) {
      bar.style.width = `${Math.round(Number(bar.dataset.share) * 100)}%`;
    }
  }
}
