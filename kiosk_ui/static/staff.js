// Staff inventory page: +/- without a page reload (through the JSON API), and counts that move
// as the kiosk scans (Server-Sent Events). Without JavaScript the forms post and redirect.
(() => {
  "use strict";
  const root = document.getElementById("session");
  if (!root) return;
  const csrf = document.querySelector('meta[name="csrf-token"]').content;
  const table = document.getElementById("inventory-table");

  function setRow(sku, counted, expected) {
    const row = table.querySelector(`tr[data-sku="${CSS.escape(sku)}"]`);
    if (!row) return false;
    row.querySelector(".counted").textContent = counted;
    if (expected !== undefined) row.querySelector(".expected").textContent = expected ?? "–";
    const exp = row.querySelector(".expected").textContent;
    const diff = counted - (exp === "–" ? 0 : Number(exp));
    row.querySelector(".difference").textContent = diff > 0 ? `+${diff}` : `${diff}`;
    row.classList.toggle("off", diff !== 0);
    row.classList.toggle("ok", diff === 0);
    row.classList.remove("flash-row");
    void row.offsetWidth;
    row.classList.add("flash-row");
    return true;
  }

  async function refresh() {
    const response = await fetch(root.dataset.api, { headers: { Accept: "application/json" } });
    if (!response.ok) return;
    const body = await response.json();
    let missing = false;
    for (const r of body.counts) missing = !setRow(r.sku, r.counted, r.expected) || missing;
    document.getElementById("total-counted").textContent = body.session.counted;
    document.getElementById("total-discrepancies").textContent = body.session.discrepancies;
    if (missing && !location.search.includes("discrepancies")) location.reload(); // a new product
  }

  table.addEventListener("submit", async (e) => {
    const form = e.target.closest("form.adjust-form");
    if (!form) return;
    e.preventDefault();
    const data = new FormData(form);
    const response = await fetch(root.dataset.countsApi, {
      method: "POST",
      headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf, Accept: "application/json" },
      body: JSON.stringify({ sku: data.get("sku"), delta: Number(data.get("delta")) }),
    });
    if (response.ok) refresh(); else form.submit();
  });

  if (root.dataset.open === "true") {
    const events = new EventSource("/events");
    events.addEventListener("scan", (e) => {
      const c = JSON.parse(e.data);
      if (c.scan.mode === "inventory" && c.scan.session === root.dataset.session) refresh();
    });
  }
})();
