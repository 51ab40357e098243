// Line charts over time with the vendored uPlot (a global from vendor/uPlot.iife.min.js).
// Colours come from the stylesheet's variables, so the charts follow light and dark themes.

import { DASH, el, fmtClock, fmtTick } from "./dom.js";

const HEIGHT = 200;

const cssVar = (name) => getComputedStyle(document.documentElement).getPropertyValue(name).trim();

export class TimeChart {
  // series: [{label, color (a CSS variable), format, dash?, scale?, fill?, points?}]
  // yFormat: tick labels of the left axis; percent: add a right-hand 0–100 % axis.
  constructor(box, series, { yFormat, percent = false }) {
    this.box = box;
    this.plot = null;
    if (typeof window.uPlot !== "function") {
      box.replaceChildren(el("p", { class: "muted", text: "Charts are unavailable." }));
      return;
    }
    const muted = cssVar("--muted");
    const grid = cssVar("--grid");
    const axis = {
      stroke: muted,
      grid: { stroke: grid, width: 1 },
      ticks: { stroke: grid, width: 1, size: 4 },
      font: "11px system-ui, sans-serif",
    };
    const axes = [
      { ...axis, values: (u, splits, index, space, step) => splits.map((v) => fmtTick(v, step)) },
      { ...axis, size: 64, values: (u, splits) => splits.map(yFormat) },
    ];
    if (percent) {
      axes.push({
        ...axis,
        scale: "pct",
        side: 1,
        size: 44,
        grid: { show: false },
        values: (u, splits) => splits.map((v) => `${v}%`),
      });
    }
    const options = {
      width: box.clientWidth || 480,
      height: HEIGHT,
      // Without a right-hand axis, room for half the last time label (`08:00`), else it is cut.
      padding: [10, percent ? 6 : 28, 0, 0],
      cursor: { drag: { x: false, y: false, setScale: false }, points: { size: 6 } },
      legend: { live: true },
      scales: {
        x: { time: true },
        y: { range: (u, min, max) => [0, max > 0 ? max * 1.15 : 1] },
        pct: { range: (u, min, max) => [0, Math.min(100, Math.max(5, (max || 0) * 1.15))] },
      },
      series: [
        { value: (u, v) => (v === null ? DASH : fmtClock(v)) },
        ...series.map((s) => {
          const stroke = cssVar(s.color);
          return {
            label: s.label,
            stroke,
            width: 1.6,
            dash: s.dash,
            scale: s.scale || "y",
            fill: s.fill ? `${stroke}1f` : undefined,
            spanGaps: Boolean(s.points),
            points: { show: Boolean(s.points), size: 4, fill: stroke },
            value: (u, v) => (v === null || v === undefined ? DASH : s.format(v)),
          };
        }),
      ],
      axes,
    };
    this.plot = new window.uPlot(options, [[], ...series.map(() => [])], box);
    new ResizeObserver(() => {
      const width = box.clientWidth;
      if (width > 0 && width !== this.plot.width) this.plot.setSize({ width, height: HEIGHT });
    }).observe(box);
  }

  show(xs, ys) {
    if (this.plot) this.plot.setData([xs, ...ys]);
  }
}
