// A small line chart on a canvas: time on x, one or more series on y. No library, no build step.
"use strict";
function lineChart(canvas, series, options) {
  options = options || {};
  const ratio = window.devicePixelRatio || 1;
  const width = canvas.clientWidth || 320, height = canvas.clientHeight || 180;
  canvas.width = width * ratio; canvas.height = height * ratio;
  const g = canvas.getContext("2d");
  g.scale(ratio, ratio);
  g.clearRect(0, 0, width, height);
  const left = 44, right = 8, top = 18, bottom = 20;
  const points = series.flatMap((line) => line.points);
  canvas.dataset.points = String(points.length);
  g.font = "11px system-ui, sans-serif";
  g.fillStyle = "#8a99a8";
  if (options.title) g.fillText(options.title, left, 12);
  if (!points.length) { g.fillText("no points yet", left + 8, height / 2); return; }
  let x0 = Math.min(...points.map((p) => p[0])), x1 = Math.max(...points.map((p) => p[0]));
  if (x1 === x0) { x0 -= 30; x1 += 30; }
  let y1 = options.yMax !== undefined ? options.yMax : Math.max(1, ...points.map((p) => p[1])) * 1.1;
  const y0 = 0;
  const x = (t) => left + (t - x0) / (x1 - x0) * (width - left - right);
  const y = (v) => top + (1 - (v - y0) / (y1 - y0)) * (height - top - bottom);
  g.strokeStyle = "#2a3541"; g.lineWidth = 1;
  for (let i = 0; i <= 4; i++) {
    const v = y0 + (y1 - y0) * i / 4;
    g.beginPath(); g.moveTo(left, y(v)); g.lineTo(width - right, y(v)); g.stroke();
    g.fillText((options.format || ((n) => n.toFixed(0)))(v), 2, y(v) + 4);
  }
  const span = x1 - x0;
  for (let i = 0; i <= 3; i++) {
    const t = x0 + span * i / 3;
    const date = new Date(t * 1000);
    const label = span > 2 * 86400 ? date.toLocaleDateString([], { month: "short", day: "numeric" })
      : date.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: span < 600 ? "2-digit" : undefined });
    g.fillText(label, Math.min(x(t), width - 50), height - 5);
  }
  let legend = left + 120;
  for (const line of series) {
    g.strokeStyle = line.color; g.lineWidth = 1.6; g.beginPath();
    line.points.forEach((p, i) => (i ? g.lineTo(x(p[0]), y(p[1])) : g.moveTo(x(p[0]), y(p[1]))));
    g.stroke();
    if (line.points.length <= 60) {  // few points (a fresh history): dots, so a single one shows
      g.fillStyle = line.color;
      for (const p of line.points) { g.beginPath(); g.arc(x(p[0]), y(p[1]), 2.5, 0, 2 * Math.PI); g.fill(); }
    }
    if (line.name) { g.fillStyle = line.color; g.fillText(line.name, legend, 12); legend += g.measureText(line.name).width + 14; }
  }
}
