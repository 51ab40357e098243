// The dashboard's entry point: wires the window selector, the overview, the interactions
// table and the detail view, and refreshes them every few seconds while the tab is visible.
// Longer windows are re-read less often: their buckets are minutes or hours wide, and their
// percentiles sort every request of the window (seconds of work on a busy week's store).

import { ApiError, get } from "./js/api.js";
import { Detail } from "./js/detail.js";
import { $, fmtClock } from "./js/dom.js";
import { Interactions } from "./js/interactions.js";
import { Overview } from "./js/overview.js";

const WINDOWS = { "15m": 900, "1h": 3600, "6h": 21600, "24h": 86400, "7d": 604800 };
const WINDOW_REFRESH = { "15m": 5, "1h": 10, "6h": 30, "24h": 60, "7d": 300 }; // seconds
const TICK = 5000;
const SAVED = "ollama-metrics.window";
const TOKEN_HELP = "This page needs the analytics token: open /analytics?token=YOUR_TOKEN once.";

const overview = new Overview();
const detail = new Detail();
const interactions = new Interactions((id) => detail.open(id));
let windowName = WINDOWS[localStorage.getItem(SAVED)] ? localStorage.getItem(SAVED) : "1h";
let overviewAt = 0; // when the overview was last read (ms)
let overviewBusy = false; // one read at a time, however slow the store
const problems = new Map(); // what failed, by part of the page

function report(part, error) {
  if (error === null) problems.delete(part);
  else if (error instanceof ApiError && error.status === 401) problems.set(part, TOKEN_HELP);
  else if (error instanceof ApiError && error.status === 503) problems.set(part, error.message);
  else problems.set(part, `${part}: ${error.message}`);
  const notice = $("notice");
  notice.textContent = [...new Set(problems.values())].join(" · ");
  notice.hidden = problems.size === 0;
}

async function part(name, work) {
  try {
    await work();
    report(name, null);
  } catch (error) {
    report(name, error);
  }
}

function selectWindow(name) {
  windowName = name;
  localStorage.setItem(SAVED, name);
  for (const button of $("window").querySelectorAll("button")) {
    button.setAttribute("aria-pressed", String(button.dataset.window === name));
  }
  $("overview-range").textContent = `last ${$("window").querySelector(`[data-window="${name}"]`).textContent}`;
  overviewAt = 0;
}

async function refreshOverview() {
  const name = windowName;
  overviewBusy = true;
  try {
    const [stats, series] = await Promise.all([
      get("/analytics/stats", { since: name }),
      get("/analytics/timeseries", { since: name }),
    ]);
    if (name !== windowName) return; // the window changed while these were read
    overview.showStats(stats, WINDOWS[name]);
    overview.showSeries(series);
  } finally {
    overviewBusy = false;
  }
}

let ticking = false;

async function tick(force = false) {
  if ((document.hidden || ticking) && !force) return;
  ticking = true;
  const jobs = [
    part("Live", async () => overview.showLive(await get("/analytics/live", { recent: 0 }))),
    part("Ollama", async () => overview.showLoaded(await get("/analytics/loaded"))),
    part("Interactions", () => interactions.refresh()),
  ];
  if (force || (!overviewBusy && Date.now() - overviewAt >= WINDOW_REFRESH[windowName] * 1000)) {
    overviewAt = Date.now();
    jobs.push(part("Overview", refreshOverview), part("Models", () => interactions.fillModels()));
  }
  await Promise.all(jobs);
  ticking = false;
  $("updated").textContent = `updated ${fmtClock(Date.now() / 1000)}`;
}

for (const button of $("window").querySelectorAll("button")) {
  button.addEventListener("click", () => {
    selectWindow(button.dataset.window);
    part("Overview", refreshOverview);
  });
}
document.addEventListener("visibilitychange", () => {
  if (!document.hidden) tick(true);
});

selectWindow(windowName);
tick(true).finally(() => {
  document.body.dataset.ready = "true"; // for tests: the first complete read is done
  setInterval(() => tick(), TICK);
});
