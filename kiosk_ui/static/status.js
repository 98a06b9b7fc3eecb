// Status page: the figures refresh every few seconds from /api/status.
(() => {
  "use strict";
  const root = document.getElementById("status");
  if (!root) return;
  const pick = (obj, path) => path.split(".").reduce((o, k) => (o == null ? o : o[k]), obj);

  function show(node, value) {
    if (value === null || value === undefined) { node.textContent = "–"; return; }
    if (Array.isArray(value)) { node.textContent = value.join(" "); return; }
    if (typeof value === "object") {
      const parts = Object.entries(value).map(([k, v]) => `${k} ${v} °C`);
      node.textContent = parts.length ? parts.join(" · ") : "not available";
      return;
    }
    const unit = node.dataset.unit;
    if (typeof value === "number" && unit === "ms") node.textContent = `${Math.round(value)} ms`;
    else if (unit) node.textContent = `${value} ${unit}`;
    else node.textContent = value;
  }

  async function tick() {
    try {
      const response = await fetch(root.dataset.api, { headers: { Accept: "application/json" } });
      if (response.status === 401) { location.reload(); return; } // the session expired
      if (response.ok) {
        const status = await response.json();
        document.querySelectorAll("[data-field]").forEach((node) => show(node, pick(status, node.dataset.field)));
      }
    } finally {
      setTimeout(tick, 3000);
    }
  }
  setTimeout(tick, 3000);
})();
