// Enrol page: Capture and Discard without a page reload (what is typed in the form stays);
// the capture views answer JSON. Without JavaScript the forms post and redirect.
(() => {
  "use strict";
  const panel = document.getElementById("capture-panel");
  if (!panel) return;
  const csrf = document.querySelector('meta[name="csrf-token"]').content;
  const list = document.getElementById("captures");
  const clear = document.getElementById("clear-captures");
  const message = document.getElementById("capture-message");

  function say(text, kind) {
    message.textContent = text;
    message.className = `small ${kind}`;
  }

  function render(captures) {
    list.replaceChildren(...captures.map((c) => {
      const li = document.createElement("li");
      li.dataset.n = c.n;
      const img = document.createElement("img");
      img.src = c.url;
      img.alt = `Capture ${c.n}`;
      const form = document.createElement("form");
      form.method = "post";
      form.action = c.discard;
      form.className = "capture-action";
      const button = document.createElement("button");
      button.type = "submit";
      button.className = "link";
      button.textContent = "Discard";
      form.append(button);
      li.append(img, form);
      return li;
    }));
    clear.hidden = captures.length === 0;
  }

  panel.addEventListener("submit", async (e) => {
    const form = e.target.closest("form.capture-action");
    if (!form) return;
    e.preventDefault();
    const button = form.querySelector("button");
    button.disabled = true;
    try {
      const response = await fetch(form.action, {
        method: "POST", headers: { "X-CSRF-Token": csrf, Accept: "application/json" },
      });
      // the staff session expired: the answer is the login page, which a reload shows
      if (!(response.headers.get("Content-Type") || "").includes("json")) { location.reload(); return; }
      const body = await response.json();
      if (!response.ok) { say(body.error, "error"); return; }
      render(body.captures);
      say(`${body.message} (${body.captures.length} of ${body.limit})`, "ok");
    } catch {
      say("The kiosk did not answer: try again.", "error");
    } finally {
      button.disabled = false;
    }
  });
})();
