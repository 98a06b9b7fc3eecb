// The shopper's screen: idle with the live preview; a result card when the kiosk recognises a
// product (pushed by Server-Sent Events, no polling); "Not this one?" corrections; photo upload;
// the language switch. Text from the server only ever goes in through textContent.
(() => {
  "use strict";
  const page = JSON.parse(document.getElementById("page-data").textContent);
  const csrf = document.querySelector('meta[name="csrf-token"]').content;
  const $ = (id) => document.getElementById(id);
  const codes = page.languages.map((l) => l.code);
  let lang = localStorage.getItem("storyscan.lang");
  if (!codes.includes(lang)) lang = codes[0] || "en";
  let card = null;      // the card on screen
  let idleTimer = null;
  let corrected = false;

  const t = (key) => (page.strings[lang] || {})[key] ?? page.strings.en[key] ?? key;
  const locale = () => ({ zh: "zh-CN", en: "en-GB" })[lang] || lang;

  function el(tag, props = {}, children = []) {
    const node = document.createElement(tag);
    Object.assign(node, props);
    for (const child of children) node.append(child);
    return node;
  }

  function formatPrice(p) {
    if (p.price === null || p.price === undefined) return "";
    try {
      return new Intl.NumberFormat(locale(), { style: "currency", currency: p.currency || "EUR" })
        .format(p.price);
    } catch (e) {
      return `${Number(p.price).toFixed(2)} ${p.currency || ""}`;
    }
  }

  function storyOf(p) {
    const s = p.stories || {};
    return s[lang] || s.en || Object.values(s).find(Boolean) || "";
  }

  // --- language ----------------------------------------------------------------------------
  function applyLanguage() {
    document.documentElement.lang = lang;
    document.querySelectorAll("[data-i18n]").forEach((node) => {
      node.textContent = t(node.dataset.i18n);
    });
    document.querySelectorAll("#lang-switch button").forEach((b) => {
      b.classList.toggle("active", b.dataset.lang === lang);
      b.setAttribute("aria-pressed", b.dataset.lang === lang ? "true" : "false");
    });
    if (card) render(card);
  }
  $("lang-switch").addEventListener("click", (e) => {
    const button = e.target.closest("button[data-lang]");
    if (!button) return;
    lang = button.dataset.lang;
    localStorage.setItem("storyscan.lang", lang);
    applyLanguage();
    armTimer();
  });

  // --- the card ------------------------------------------------------------------------------
  function render(c) {
    const product = c.product;
    const root = $("result-card");
    root.dataset.state = product ? "product" : "unknown";
    root.dataset.scan = c.scan.id;
    root.dataset.sku = product ? product.sku : "";
    $("card-product").hidden = !product;
    $("card-unknown").hidden = !!product;
    const photo = $("card-photo");
    if (product && product.photo) {
      photo.src = product.photo;
      photo.alt = product.name;
      photo.hidden = false;
      $("card-photo-empty").hidden = true;
    } else {
      photo.removeAttribute("src");
      photo.hidden = true;
      $("card-photo-empty").hidden = false;
    }
    if (product) {
      $("card-name").textContent = product.name;
      $("card-price").textContent = formatPrice(product);
      const story = $("card-story");
      story.replaceChildren(...storyOf(product).split(/\n{2,}/).map((para) => el("p", { textContent: para })));
      $("card-attributes").replaceChildren(...(product.attributes || []).map((a) => el("li", { textContent: a })));
    }
    const badge = $("card-badge");
    if (c.scan.mode === "inventory") {
      badge.textContent = c.counted !== null && c.counted !== undefined
        ? `${t("inventory")} · ${t("counted")}: ${c.counted}` : t("inventory");
      badge.hidden = false;
    } else {
      badge.hidden = true;
    }
    const alternatives = c.alternatives || [];
    $("not-this").hidden = !product || alternatives.length === 0 || corrected;
    $("alternatives-title").textContent = product ? t("pick_right") : t("is_it_one");
    $("alternatives-list").replaceChildren(...alternatives.map((a) => {
      const button = el("button", { type: "button" }, [
        a.photo ? el("img", { src: a.photo, alt: "" }) : el("span"),
        el("span", { textContent: a.name }),
      ]);
      button.dataset.sku = a.sku;
      button.addEventListener("click", () => correct(c, a.sku));
      return el("li", {}, [button]);
    }));
    // an unknown item offers its best guesses at once; a product behind "Not this one?"
    if (!product) $("alternatives").hidden = alternatives.length === 0 || corrected;
    $("thanks").hidden = !corrected;
  }

  function show(c) {
    card = c;
    corrected = false;
    $("alternatives").hidden = true;
    render(c);
    $("idle").hidden = true;
    $("result-card").hidden = false;
    armTimer();
  }

  function goIdle() {
    clearTimeout(idleTimer);
    card = null;
    $("result-card").hidden = true;
    $("idle").hidden = false;
  }

  function armTimer() {
    clearTimeout(idleTimer);
    if (!card) return;
    idleTimer = setTimeout(goIdle, page.card_seconds * 1000);
    const bar = $("card-timer-bar");
    bar.style.setProperty("--card-seconds", `${page.card_seconds}s`);
    bar.classList.remove("running");
    void bar.offsetWidth; // restart the animation
    bar.classList.add("running");
  }

  $("done").addEventListener("click", goIdle);
  $("not-this").addEventListener("click", () => {
    $("alternatives").hidden = !$("alternatives").hidden;
    armTimer();
  });
  $("result-card").addEventListener("pointerdown", armTimer);

  async function api(url, options = {}) {
    const response = await fetch(url, {
      credentials: "same-origin", ...options,
      headers: { "X-CSRF-Token": csrf, Accept: "application/json", ...(options.headers || {}) },
    });
    const body = await response.json().catch(() => ({ error: response.statusText }));
    if (!response.ok) throw new Error(body.error || response.statusText);
    return body;
  }

  async function correct(c, sku) {
    try {
      await api(`/api/scans/${c.scan.id}/correction`, {
        method: "POST", headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ sku }),
      });
      const product = await api(`/api/products/${encodeURIComponent(sku)}`);
      card = { ...c, product, alternatives: [] };
      corrected = true;
      $("alternatives").hidden = true;
      render(card);
      armTimer();
    } catch (e) {
      toast(e.message);
    }
  }

  function toast(message) {
    const node = $("toast");
    node.textContent = message;
    node.hidden = false;
    clearTimeout(toast.timer);
    toast.timer = setTimeout(() => { node.hidden = true; }, 5000);
  }

  // --- scans pushed by the kiosk ---------------------------------------------------------------
  function listen() {
    const events = new EventSource("/events");
    events.addEventListener("scan", (e) => {
      const c = JSON.parse(e.data);
      if (c.scan.mode === "upload") return; // someone's phone: their own screen shows it
      show(c);
    });
    events.addEventListener("open", () => { $("offline").hidden = true; });
    events.addEventListener("error", () => { $("offline").hidden = false; }); // it reconnects
  }

  // --- photo upload ----------------------------------------------------------------------------
  $("upload-input").addEventListener("change", async (e) => {
    const file = e.target.files[0];
    if (!file) return;
    const form = new FormData();
    form.append("photo", file);
    $("busy").hidden = false;
    try {
      show(await api("/api/scans", { method: "POST", body: form }));
    } catch (err) {
      toast(`${t("upload_failed")}: ${err.message}`);
    } finally {
      $("busy").hidden = true;
      e.target.value = "";
    }
  });

  // --- live preview: when the stream breaks, a calm placeholder, and a retry ---------------------
  const preview = $("preview"); // absent where the picture is not shown (a phone)
  if (preview) {
    const previewSrc = preview.getAttribute("src");
    preview.addEventListener("error", () => {
      preview.parentElement.classList.add("no-camera");
      setTimeout(() => { preview.src = `${previewSrc}?t=${Date.now()}`; }, 5000);
    });
    preview.addEventListener("load", () => preview.parentElement.classList.remove("no-camera"));
  }

  applyLanguage();
  listen();
})();
