"""The built-in dashboard: a page of plain HTML, CSS and JavaScript served by the proxy at
/analytics, reading the /analytics/* JSON API. `routes` serves it; `static/` holds the page,
its script and style, and the vendored chart library (uPlot, MIT) with its licence."""
