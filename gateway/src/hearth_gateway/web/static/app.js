// The status page's live charts: every 2 s, fetch /api/series (same origin) and redraw the
// polylines the server rendered. Hand-written on purpose: no framework, nothing fetched from
// elsewhere (the Content-Security-Policy would refuse it anyway).
"use strict";

function points(series, index, top) {
  if (series.length === 0) { return ""; }
  const first = series[0][0];
  const span = Math.max(1e-9, series[series.length - 1][0] - first);
  return series.map(function (p) {
    const y = 80 - Math.min(80, p[index] * 80 / Math.max(1e-9, top));
    return (300 * (p[0] - first) / span).toFixed(1) + "," + y.toFixed(1);
  }).join(" ");
}

function redraw(series) {
  const topLoad = Math.max(1, ...series.map(function (p) { return p[1]; }));
  const topMs = Math.max(1, ...series.map(function (p) { return p[3]; }));
  document.getElementById("load-line").setAttribute("points", points(series, 1, topLoad));
  document.getElementById("p50-line").setAttribute("points", points(series, 2, topMs));
  document.getElementById("max-line").setAttribute("points", points(series, 3, topMs));
  document.getElementById("load-top").textContent = topLoad.toFixed(1);
  document.getElementById("ms-top").textContent = topMs.toFixed(0);
}

function poll() {
  fetch("/api/series", { credentials: "same-origin" })
    .then(function (r) { return r.ok ? r.json() : Promise.reject(r.status); })
    .then(redraw)
    .catch(function () { /* the next poll tries again */ });
}

if (document.getElementById("load-line")) {
  setInterval(poll, 2000);
}
