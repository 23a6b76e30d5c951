// PatchCore operator console: plain JavaScript on the public REST API, no build step,
// no outside resources. Everything the service sends back is shown with textContent,
// never parsed as HTML, and the page's Content-Security-Policy allows no inline code.
"use strict";

(() => {
  const ROOT = new URL("../", window.location.href); // the service root, also behind a path prefix
  const KEY_STORAGE = "patchcore.adminKey";
  const VIEWS = ["products", "try", "build", "health"];
  const FINISHED = ["succeeded", "failed", "cancelled", "interrupted"];
  const HEALTH_EVERY_MS = 3000;
  const JOB_POLL_MS = 500;
  // Staging uploads go in several requests so that none passes the service's body limit
  // (PATCHCORE_MAX_UPLOAD_MB, 32 MB by default) or its file count per request.
  const UPLOAD_BATCH_FILES = 16;
  const UPLOAD_BATCH_BYTES = 3 * 1024 * 1024;

  const $ = (id) => document.getElementById(id);
  const state = {
    adminKey: sessionStorage.getItem(KEY_STORAGE),
    adminOpen: false,
    products: [],
    failed: [],
    stored: [],
    selected: null,
    jobId: null,
    jobTimer: null,
    healthTimer: null,
    lastMetrics: null,
  };

  // ------------------------------------------------------------------ helpers
  class ApiError extends Error {
    constructor(status, code, message) {
      super(message);
      this.status = status;
      this.code = code;
    }
  }

  function apiUrl(path) {
    return new URL(path.replace(/^\//, ""), ROOT).toString();
  }

  function el(tag, opts = {}, children = []) {
    const node = document.createElement(tag);
    if (opts.cls) node.className = opts.cls;
    if (opts.text !== undefined && opts.text !== null) node.textContent = String(opts.text);
    if (opts.data) for (const [k, v] of Object.entries(opts.data)) node.dataset[k] = v;
    if (opts.title) node.title = opts.title;
    for (const child of children) node.append(child);
    return node;
  }

  function show(node, message) {
    node.textContent = message;
    node.hidden = !message;
  }

  function errorText(err) {
    if (err instanceof ApiError) return `${err.message} (${err.status ? err.status + " " : ""}${err.code})`;
    return String(err && err.message ? err.message : err);
  }

  function pad(n) {
    return String(n).padStart(2, "0");
  }

  function fmtDate(value) {
    if (value === null || value === undefined || value === "") return "-";
    const date = typeof value === "number" ? new Date(value * 1000) : new Date(value);
    if (Number.isNaN(date.getTime())) return String(value);
    return `${date.getFullYear()}-${pad(date.getMonth() + 1)}-${pad(date.getDate())} ` +
      `${pad(date.getHours())}:${pad(date.getMinutes())}:${pad(date.getSeconds())}`;
  }

  // Version names are UTC timestamps plus a random suffix: 20261130T131100Z-a1b2c3.
  function versionDate(version) {
    const m = /^(\d{4})(\d{2})(\d{2})T(\d{2})(\d{2})(\d{2})Z/.exec(version || "");
    if (!m) return "-";
    const [year, month, day, hour, minute, second] = m.slice(1).map(Number);
    return fmtDate(Date.UTC(year, month - 1, day, hour, minute, second) / 1000);
  }

  function fmtNumber(value, digits = 3) {
    return typeof value === "number" && Number.isFinite(value) ? value.toFixed(digits) : "-";
  }

  function isAdmin() {
    return Boolean(state.adminKey) || state.adminOpen;
  }

  function adminHeaders(headers = {}) {
    const out = { ...headers };
    if (state.adminKey) out["X-API-Key"] = state.adminKey;
    return out;
  }

  async function parseError(response) {
    let code = `http_${response.status}`;
    let message = response.statusText || "request failed";
    try {
      const body = await response.json();
      if (body && body.error) {
        code = body.error.code || code;
        message = body.error.message || message;
      }
    } catch (_) {
      // not JSON: keep the status text
    }
    return new ApiError(response.status, code, message);
  }

  async function api(path, { method = "GET", json, body, admin = false, raw = false } = {}) {
    const headers = admin ? adminHeaders() : {};
    if (json !== undefined) {
      headers["Content-Type"] = "application/json";
      body = JSON.stringify(json);
    }
    let response;
    try {
      response = await fetch(apiUrl(path), { method, headers, body, cache: "no-store" });
    } catch (err) {
      throw new ApiError(0, "network_error", `service unreachable (${err.message})`);
    }
    if (!response.ok) {
      const error = await parseError(response);
      if (admin && (response.status === 401 || response.status === 403)) adminRejected(error);
      throw error;
    }
    if (raw) return response.text();
    if (response.status === 204) return null;
    return response.json();
  }

  // fetch() reports no upload progress; XMLHttpRequest does.
  function uploadWithProgress(path, formData, onProgress) {
    return new Promise((resolve, reject) => {
      const xhr = new XMLHttpRequest();
      xhr.open("POST", apiUrl(path));
      for (const [k, v] of Object.entries(adminHeaders())) xhr.setRequestHeader(k, v);
      xhr.responseType = "json";
      xhr.upload.onprogress = (e) => { if (e.lengthComputable) onProgress(e.loaded); };
      xhr.onerror = () => reject(new ApiError(0, "network_error", "upload failed: service unreachable"));
      xhr.onload = () => {
        const body = xhr.response;
        if (xhr.status >= 200 && xhr.status < 300) {
          resolve(body);
          return;
        }
        const err = body && body.error ? body.error : { code: `http_${xhr.status}`, message: xhr.statusText };
        const error = new ApiError(xhr.status, err.code, err.message);
        if (xhr.status === 401 || xhr.status === 403) adminRejected(error);
        reject(error);
      };
      xhr.send(formData);
    });
  }

  function confirmDialog(text, okLabel = "Confirm") {
    const dialog = $("confirm");
    $("confirm-text").textContent = text;
    $("confirm-ok").textContent = okLabel;
    return new Promise((resolve) => {
      const done = (answer) => {
        $("confirm-ok").onclick = null;
        $("confirm-cancel").onclick = null;
        dialog.oncancel = null;
        if (dialog.open) dialog.close();
        resolve(answer);
      };
      $("confirm-ok").onclick = () => done(true);
      $("confirm-cancel").onclick = () => done(false);
      dialog.oncancel = () => done(false);
      dialog.showModal();
    });
  }

  function wireDropZone(zone, input, onFiles) {
    zone.addEventListener("dragover", (e) => {
      e.preventDefault();
      zone.classList.add("over");
    });
    zone.addEventListener("dragleave", () => zone.classList.remove("over"));
    zone.addEventListener("drop", (e) => {
      e.preventDefault();
      zone.classList.remove("over");
      if (e.dataTransfer && e.dataTransfer.files.length) onFiles(Array.from(e.dataTransfer.files));
    });
    input.addEventListener("change", () => {
      const files = Array.from(input.files || []);
      input.value = ""; // choosing the same files again fires change again
      if (files.length) onFiles(files);
    });
  }

  // ------------------------------------------------------------------ admin key
  function applyAdmin() {
    document.body.classList.toggle("admin", isAdmin());
    $("admin-label").textContent = state.adminKey ? "admin" : "admin open (no key configured)";
    $("key-forget").hidden = !state.adminKey;
  }

  function adminRejected(error) {
    if (!state.adminKey) return;
    state.adminKey = null;
    sessionStorage.removeItem(KEY_STORAGE);
    applyAdmin();
    show($("key-error"), `Admin key refused: ${error.message}`);
    if (document.body.dataset.view === "build") route();
  }

  async function probeAdmin(key) {
    const headers = key ? { "X-API-Key": key } : {};
    const response = await fetch(apiUrl("/v1/admin/jobs"), { headers, cache: "no-store" });
    if (response.ok) return null;
    return parseError(response);
  }

  async function unlock(event) {
    event.preventDefault();
    const key = $("admin-key").value.trim();
    if (!key) {
      show($("key-error"), "Enter the admin API key.");
      return;
    }
    $("key-submit").disabled = true;
    show($("key-error"), "");
    try {
      const error = await probeAdmin(key);
      if (error) {
        show($("key-error"), `Admin key refused: ${error.message}`);
        return;
      }
      state.adminKey = key;
      sessionStorage.setItem(KEY_STORAGE, key);
      $("admin-key").value = "";
      applyAdmin();
      route();
    } catch (err) {
      show($("key-error"), errorText(err));
    } finally {
      $("key-submit").disabled = false;
    }
  }

  function lock() {
    state.adminKey = null;
    sessionStorage.removeItem(KEY_STORAGE);
    applyAdmin();
    route();
  }

  async function initAdmin() {
    try {
      if (state.adminKey) {
        const error = await probeAdmin(state.adminKey);
        if (error && (error.status === 401 || error.status === 403)) adminRejected(error);
      } else {
        // Development services may leave the admin API open; then no key is needed.
        state.adminOpen = (await probeAdmin(null)) === null;
      }
    } catch (_) {
      // unreachable service: the views say so
    }
    applyAdmin();
  }

  // ------------------------------------------------------------------ views
  function route() {
    let view = window.location.hash.replace(/^#/, "") || "products";
    if (!VIEWS.includes(view) || (view === "build" && !isAdmin())) view = "products";
    for (const name of VIEWS) $(`view-${name}`).hidden = name !== view;
    for (const link of document.querySelectorAll("#tabs a")) {
      link.classList.toggle("active", link.dataset.view === view);
    }
    document.body.dataset.view = view;
    if (view === "health") startHealth();
    else stopHealth();
    if (view === "products") loadProducts();
    if (view === "try" && !state.products.length) loadProducts();
    if (view === "build") enterBuild();
  }

  // ------------------------------------------------------------------ products
  function cell(text, cls) {
    return el("td", { text, cls });
  }

  // Several loads can overlap (a route change, an activation): only the latest one renders.
  let productsSeq = 0;
  let detailSeq = 0;

  async function loadProducts() {
    const seq = ++productsSeq;
    let data;
    try {
      data = await api("/v1/products");
    } catch (err) {
      if (seq !== productsSeq) return;
      $("products-body").replaceChildren(el("tr", {}, [el("td", { cls: "reason", text: errorText(err) })]));
      return;
    }
    if (seq !== productsSeq) return;
    state.products = data.products;
    state.failed = data.failed;
    state.stored = data.stored || [];
    const rows = [];
    for (const p of data.products) {
      const row = el("tr", { cls: "clickable", data: { product: p.name } }, [
        cell(p.name),
        el("td", {}, [el("span", { cls: "pill loaded", text: "loaded" })]),
        cell(p.version, "version"),
        cell(p.backbone),
        cell(p.bank_size === null ? "-" : p.bank_size.toLocaleString("en")),
        cell(fmtNumber(p.threshold, 4)),
        cell(fmtDate(p.created_at)),
        cell(fmtDate(p.loaded_at)),
      ]);
      row.addEventListener("click", () => selectProduct(p.name));
      rows.push(row);
    }
    for (const f of data.failed) {
      const reason = el("td", { cls: "reason", text: `${f.error_code || "error"}: ${f.reason || ""}` });
      reason.colSpan = 5;
      const row = el("tr", { cls: "clickable", data: { product: f.name } }, [
        cell(f.name),
        el("td", {}, [el("span", { cls: "pill failed", text: "failed" })]),
        cell(f.version || "-", "version"),
        reason,
      ]);
      row.addEventListener("click", () => selectProduct(f.name));
      rows.push(row);
    }
    for (const s of state.stored) {
      const note = el("td", { cls: "reason", text: "in the bank store, not loaded by the process that answered" });
      note.colSpan = 5;
      const row = el("tr", { cls: "clickable", data: { product: s.name } }, [
        cell(s.name),
        el("td", {}, [el("span", { cls: "pill stored", text: "stored" })]),
        cell("-", "version"),
        note,
      ]);
      row.addEventListener("click", () => selectProduct(s.name));
      rows.push(row);
    }
    $("products-body").replaceChildren(...rows);
    $("products-empty").hidden = rows.length > 0;
    for (const row of rows) row.classList.toggle("selected", row.dataset.product === state.selected);
    fillProductPickers();
    if (state.selected) loadDetail(state.selected);
  }

  function fillProductPickers() {
    const select = $("try-product");
    const previous = select.value;
    const names = state.products.map((p) => p.name);
    select.replaceChildren(...names.map((n) => el("option", { text: n })));
    if (names.includes(previous)) select.value = previous;
    else if (names.includes("demo")) select.value = "demo";
    const all = names.concat(state.failed.map((f) => f.name), state.stored.map((s) => s.name));
    $("product-names").replaceChildren(...all.map((n) => {
      const option = el("option");
      option.value = n;
      return option;
    }));
  }

  function selectProduct(name) {
    state.selected = name;
    for (const row of $("products-body").children) row.classList.toggle("selected", row.dataset.product === name);
    loadDetail(name);
  }

  async function loadDetail(name) {
    const panel = $("product-detail");
    const seq = ++detailSeq;
    let info;
    try {
      info = await api(`/v1/products/${encodeURIComponent(name)}`);
    } catch (err) {
      if (seq !== detailSeq) return;
      if (err.status === 404) {
        state.selected = null;
        panel.hidden = true;
        return;
      }
      show($("detail-reason"), errorText(err));
      panel.hidden = false;
      return;
    }
    if (seq !== detailSeq) return;
    panel.hidden = false;
    $("detail-name").textContent = name;
    show($("detail-reason"), info.status === "failed" ? `${info.error_code}: ${info.reason}`
      : info.status === "stored" ? "in the bank store, not loaded by the process that answered" : "");
    const versions = (info.versions || []).slice().reverse(); // newest first
    const rows = versions.map((version) => {
      const active = version === info.version && info.status === "loaded";
      const action = el("td", { cls: "admin-only" });
      if (!active) {
        const button = el("button", { text: "Activate", cls: "secondary", data: { version } });
        button.type = "button";
        button.addEventListener("click", () => activateVersion(name, version));
        action.append(button);
      }
      return el("tr", { data: { version } }, [
        el("td", {}, [el("code", { text: version })]),
        cell(versionDate(version)),
        el("td", {}, [active ? el("span", { cls: "pill active", text: "active" }) : el("span", { text: "" })]),
        action,
      ]);
    });
    $("versions-body").replaceChildren(...rows);
  }

  async function activateVersion(product, version) {
    const ok = await confirmDialog(
      `Serve version ${version} of "${product}"? Requests switch to it at once; the current version stays on disk.`,
      "Activate");
    if (!ok) return;
    try {
      await api(`/v1/admin/products/${encodeURIComponent(product)}/activate`, {
        method: "POST", json: { version }, admin: true });
    } catch (err) {
      show($("detail-reason"), `Activate failed: ${errorText(err)}`);
      return;
    }
    await loadProducts();
  }

  async function deleteProduct() {
    const name = state.selected;
    if (!name) return;
    const ok = await confirmDialog(
      `Delete product "${name}": every version of its bank, its staged images, and its serving model? ` +
      "This cannot be undone.", "Delete");
    if (!ok) return;
    try {
      await api(`/v1/admin/products/${encodeURIComponent(name)}`, { method: "DELETE", admin: true });
    } catch (err) {
      show($("detail-reason"), `Delete failed: ${errorText(err)}`);
      return;
    }
    state.selected = null;
    $("product-detail").hidden = true;
    await loadProducts();
  }

  // ------------------------------------------------------------------ try an image
  function isImageFile(file) {
    return (file.type || "").startsWith("image/") || /\.(png|jpe?g|bmp|tiff?|webp)$/i.test(file.name);
  }

  function applyOpacity() {
    const opacity = Number($("opacity").value) / 100;
    for (const img of document.querySelectorAll("#try-results img.heat")) img.style.opacity = String(opacity);
  }

  function applyBoxes() {
    const on = $("show-boxes").checked;
    for (const stage of document.querySelectorAll("#try-results .stage")) stage.classList.toggle("no-boxes", !on);
  }

  async function tryFiles(files) {
    const product = $("try-product").value;
    show($("try-error"), "");
    if (!product) {
      show($("try-error"), "No product is loaded: build one first.");
      return;
    }
    const images = files.filter(isImageFile);
    if (images.length < files.length) show($("try-error"), `Skipped ${files.length - images.length} file(s) that are not images.`);
    const jobs = images.map((file) => ({ file, card: newCard(file) }));
    // Two requests in flight: enough to overlap upload and compute, polite to a shared line.
    let next = 0;
    const worker = async () => {
      while (next < jobs.length) {
        const job = jobs[next++];
        await predictOne(product, job.file, job.card);
      }
    };
    await Promise.all([worker(), worker()]);
  }

  function newCard(file) {
    const card = $("result-card").content.firstElementChild.cloneNode(true);
    card.classList.add("pending");
    card.dataset.state = "pending";
    card.querySelector(".filename").textContent = file.name;
    card.querySelector(".score-text").textContent = "scoring...";
    const photo = card.querySelector("img.photo");
    const stage = card.querySelector(".stage");
    photo.onerror = () => stage.classList.add("no-photo"); // e.g. TIFF: the heatmap alone
    photo.src = URL.createObjectURL(file);
    card.querySelector("img.heat").hidden = true;
    stage.classList.toggle("no-boxes", !$("show-boxes").checked);
    $("try-results").prepend(card);
    return card;
  }

  async function predictOne(product, file, card) {
    const form = new FormData();
    form.append("files", file, file.name);
    let result;
    try {
      const data = await api(`/v1/products/${encodeURIComponent(product)}/predict?heatmap=png&regions=true`,
        { method: "POST", body: form });
      result = data.results[0];
    } catch (err) {
      card.classList.replace("pending", "failed");
      card.dataset.state = "failed";
      card.querySelector(".score-text").textContent = errorText(err);
      return;
    }
    fillCard(card, product, result);
  }

  function fillCard(card, product, r) {
    card.classList.remove("pending");
    card.classList.toggle("anomalous", r.is_anomalous);
    card.dataset.state = "done";
    card.dataset.anomalous = String(r.is_anomalous);
    const decision = card.querySelector(".decision");
    decision.textContent = r.is_anomalous ? "ANOMALOUS" : "OK";
    decision.classList.add(r.is_anomalous ? "bad" : "ok");
    const heat = card.querySelector("img.heat");
    if (r.heatmap) {
      heat.src = `data:${r.heatmap.media_type};base64,${r.heatmap.data}`;
      heat.hidden = false;
      heat.style.opacity = String(Number($("opacity").value) / 100);
    }
    const boxes = card.querySelector(".boxes");
    for (const region of r.regions || []) {
      const b = region.bbox;
      const box = el("div", { cls: "box", title: `area ${region.area} px, peak ${fmtNumber(region.max_score)}` });
      box.style.left = `${(100 * b.x) / r.width}%`;
      box.style.top = `${(100 * b.y) / r.height}%`;
      box.style.width = `${(100 * b.width) / r.width}%`;
      box.style.height = `${(100 * b.height) / r.height}%`;
      boxes.append(box);
    }
    // The normalised score puts the product's threshold at 0.5: the bar's middle mark.
    const fill = card.querySelector(".scorebar .fill");
    fill.style.width = `${Math.max(0, Math.min(1, r.score)) * 100}%`;
    fill.classList.toggle("bad", r.is_anomalous);
    card.querySelector(".score-text").textContent =
      `score ${fmtNumber(r.score)} vs threshold 0.500 (raw ${fmtNumber(r.raw_score)} vs ${fmtNumber(r.threshold)})`;
    const regions = (r.regions || []).length;
    const t = r.timings || {};
    card.querySelector(".meta").textContent =
      `${product} ${r.bank_version} | ${r.width}x${r.height} px | ${regions} region${regions === 1 ? "" : "s"} | ` +
      `compute ${fmtNumber(t.compute_ms, 0)} ms, batch ${t.batch_size ?? "-"}`;
  }

  // ------------------------------------------------------------------ build
  const PRODUCT_NAME = /^[a-z0-9][a-z0-9_-]{0,63}$/;

  function buildProduct() {
    const name = $("build-product").value.trim();
    return PRODUCT_NAME.test(name) ? name : null;
  }

  function enterBuild() {
    if (!state.products.length) loadProducts();
    refreshStaged();
    loadJobs();
  }

  async function refreshStaged() {
    const product = buildProduct();
    if (!product) {
      $("staged-count").textContent = "-";
      return;
    }
    try {
      const data = await api(`/v1/admin/products/${product}/nominal`, { admin: true });
      $("staged-count").textContent = String(data.count);
    } catch (err) {
      $("staged-count").textContent = "-";
      show($("build-error"), errorText(err));
    }
  }

  function uploadBatches(files) {
    const batches = [];
    let current = [];
    let bytes = 0;
    for (const file of files) {
      const zip = /\.zip$/i.test(file.name) || (file.type || "").includes("zip");
      if (zip) {
        batches.push([file]); // an archive always travels alone
        continue;
      }
      if (current.length && (current.length >= UPLOAD_BATCH_FILES || bytes + file.size > UPLOAD_BATCH_BYTES)) {
        batches.push(current);
        current = [];
        bytes = 0;
      }
      current.push(file);
      bytes += file.size;
    }
    if (current.length) batches.push(current);
    return batches;
  }

  async function uploadNominal(files) {
    const product = buildProduct();
    show($("build-error"), "");
    if (!product) {
      show($("build-error"), "Enter a product name first: lower-case letters, digits, - and _.");
      return;
    }
    const total = files.reduce((sum, f) => sum + f.size, 0) || 1;
    let done = 0;
    let added = 0;
    const bar = $("upload-bar");
    const status = $("upload-status");
    bar.style.width = "0%";
    status.textContent = `uploading ${files.length} file(s)...`;
    for (const batch of uploadBatches(files)) {
      const form = new FormData();
      for (const file of batch) form.append("files", file, file.name);
      const batchBytes = batch.reduce((sum, f) => sum + f.size, 0);
      try {
        const result = await uploadWithProgress(`/v1/admin/products/${product}/nominal`, form, (loaded) => {
          bar.style.width = `${Math.min(100, (100 * (done + Math.min(loaded, batchBytes))) / total)}%`;
        });
        added += result.added;
        $("staged-count").textContent = String(result.count);
      } catch (err) {
        status.textContent = "";
        show($("build-error"), `Upload failed: ${errorText(err)}`);
        return;
      }
      done += batchBytes;
      bar.style.width = `${(100 * done) / total}%`;
    }
    bar.style.width = "100%";
    status.textContent = `uploaded ${files.length} file(s): ${added} new image(s) staged for ${product}`;
  }

  async function clearStaging() {
    const product = buildProduct();
    if (!product) return;
    const ok = await confirmDialog(`Remove every staged image of "${product}"? Built banks are not touched.`, "Clear");
    if (!ok) return;
    try {
      await api(`/v1/admin/products/${product}/nominal`, { method: "DELETE", admin: true });
    } catch (err) {
      show($("build-error"), errorText(err));
    }
    $("upload-bar").style.width = "0%";
    $("upload-status").textContent = "";
    refreshStaged();
  }

  async function startBuild() {
    const product = buildProduct();
    show($("build-error"), "");
    if (!product) {
      show($("build-error"), "Enter a product name first: lower-case letters, digits, - and _.");
      return;
    }
    const params = {};
    const ratio = $("opt-coreset").value.trim();
    const backbone = $("opt-backbone").value.trim();
    const seed = $("opt-seed").value.trim();
    if (ratio) params.coreset_ratio = Number(ratio);
    if (backbone) params.backbone = backbone;
    if (seed) params.seed = Number(seed);
    params.activate = $("opt-activate").checked;
    $("build-start").disabled = true;
    try {
      const job = await api(`/v1/admin/products/${product}/builds`, { method: "POST", json: params, admin: true });
      watchJob(job.id, job);
      loadJobs();
    } catch (err) {
      show($("build-error"), `Build not started: ${errorText(err)}`);
    } finally {
      $("build-start").disabled = false;
    }
  }

  function watchJob(id, first) {
    state.jobId = id;
    clearTimeout(state.jobTimer);
    $("job-panel").hidden = false;
    if (first) renderJob(first);
    pollJob(id);
  }

  async function pollJob(id) {
    if (state.jobId !== id) return;
    let job;
    try {
      job = await api(`/v1/admin/jobs/${id}`, { admin: true });
    } catch (err) {
      $("job-detail").textContent = errorText(err);
      if (err.status === 404 || err.status === 401 || err.status === 403) return;
      state.jobTimer = setTimeout(() => pollJob(id), JOB_POLL_MS * 4);
      return;
    }
    if (state.jobId !== id) return;
    renderJob(job);
    if (FINISHED.includes(job.state)) {
      await loadProducts();
      renderJob(job); // now with the product's active version known
      loadJobs();
      return;
    }
    state.jobTimer = setTimeout(() => pollJob(id), JOB_POLL_MS);
  }

  function renderJob(job) {
    $("job-panel").dataset.jobId = job.id;
    $("job-id").textContent = job.id;
    const pill = $("job-state");
    pill.textContent = job.state;
    pill.className = `pill ${job.state}`;
    $("job-phase").textContent = job.phase;
    $("job-progress-text").textContent = `${fmtNumber(job.progress, 1)} %`;
    $("job-bar").style.width = `${Math.max(0, Math.min(100, job.progress))}%`;
    const t = job.timings_s || {};
    const phases = Object.entries(t.phases || {}).map(([k, v]) => `${k} ${fmtNumber(v, 1)} s`).join(", ");
    const parts = [`product ${job.product}`];
    if (job.image_count !== null && job.image_count !== undefined) parts.push(`${job.image_count} images`);
    if (t.running !== null && t.running !== undefined) parts.push(`running ${fmtNumber(t.running, 1)} s`);
    if (phases) parts.push(phases);
    if (job.version) parts.push(`version ${job.version}`);
    if (job.error) parts.push(`error: ${job.error.message} (${job.error.code})`);
    $("job-detail").textContent = parts.join(" | ");
    $("job-cancel").hidden = FINISHED.includes(job.state);
    $("job-cancel").disabled = Boolean(job.cancel_requested);
    const activate = $("job-activate");
    activate.hidden = !(job.state === "succeeded" && job.version);
    const product = state.products.find((p) => p.name === job.product);
    const active = Boolean(product && product.version === job.version);
    activate.disabled = active;
    activate.textContent = active ? "Active (serving this version)" : "Activate this version";
    activate.dataset.product = job.product;
    activate.dataset.version = job.version || "";
  }

  async function cancelJob() {
    const id = state.jobId;
    if (!id) return;
    const ok = await confirmDialog("Cancel this build? The bank being built is discarded.", "Cancel build");
    if (!ok) return;
    try {
      renderJob(await api(`/v1/admin/jobs/${id}`, { method: "DELETE", admin: true }));
    } catch (err) {
      $("job-detail").textContent = `Cancel failed: ${errorText(err)}`;
    }
  }

  async function activateJobResult() {
    const button = $("job-activate");
    const { product, version } = button.dataset;
    if (!product || !version) return;
    try {
      await api(`/v1/admin/products/${encodeURIComponent(product)}/activate`, {
        method: "POST", json: { version }, admin: true });
    } catch (err) {
      $("job-detail").textContent = `Activate failed: ${errorText(err)}`;
      return;
    }
    await loadProducts();
    pollJob(state.jobId);
  }

  async function loadJobs() {
    let data;
    try {
      data = await api("/v1/admin/jobs", { admin: true });
    } catch (_) {
      return;
    }
    const rows = data.jobs.slice(0, 20).map((job) => {
      const row = el("tr", { cls: "clickable", data: { jobId: job.id } }, [
        el("td", {}, [el("code", { text: job.id.slice(0, 8) })]),
        cell(job.product),
        el("td", {}, [el("span", { cls: `pill ${job.state}`, text: job.state })]),
        cell(job.phase),
        cell(`${fmtNumber(job.progress, 0)} %`),
        cell(job.image_count ?? "-"),
        cell(job.version || "-"),
        cell(fmtDate(job.created_at)),
      ]);
      row.addEventListener("click", () => watchJob(job.id, job));
      return row;
    });
    $("jobs-body").replaceChildren(...rows);
  }

  // ------------------------------------------------------------------ health
  function parseMetrics(text) {
    const samples = [];
    const line = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)/;
    const label = /([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g;
    for (const raw of text.split("\n")) {
      if (!raw || raw.startsWith("#")) continue;
      const m = line.exec(raw);
      if (!m) continue;
      const labels = {};
      for (const l of (m[2] || "").matchAll(label)) labels[l[1]] = l[2];
      samples.push({ name: m[1], labels, value: promNumber(m[3]) });
    }
    return samples;
  }

  function promNumber(text) {
    if (text === "+Inf") return Infinity;
    if (text === "-Inf") return -Infinity;
    return Number(text);
  }

  function total(samples, name, match = () => true) {
    return samples.filter((s) => s.name === name && match(s.labels)).reduce((sum, s) => sum + s.value, 0);
  }

  const isPredict = (labels) => (labels.route || "").endsWith("/predict");

  function latencyBuckets(samples) {
    const buckets = new Map();
    for (const s of samples) {
      if (s.name !== "patchcore_http_request_duration_seconds_bucket" || !isPredict(s.labels)) continue;
      const le = promNumber(s.labels.le);
      buckets.set(le, (buckets.get(le) || 0) + s.value);
    }
    return buckets;
  }

  // The 95th percentile's bucket: the smallest upper bound that holds 95 % of the requests.
  function p95(buckets, previous) {
    const bounds = [...buckets.keys()].sort((a, b) => a - b);
    const counts = bounds.map((b) => buckets.get(b) - ((previous && previous.get(b)) || 0));
    const all = counts[counts.length - 1] || 0;
    if (!all) return null;
    for (let i = 0; i < bounds.length; i++) if (counts[i] >= 0.95 * all) return bounds[i];
    return null;
  }

  function tile(id, text, cls) {
    const node = $(id);
    node.textContent = text;
    node.classList.toggle("ok", cls === "ok");
    node.classList.toggle("bad", cls === "bad");
  }

  function ms(seconds) {
    return seconds === Infinity ? "> 30 s" : `${(seconds * 1000).toFixed(seconds < 0.1 ? 1 : 0)} ms`;
  }

  async function refreshHealth() {
    const [live, ready, metrics] = await Promise.allSettled([
      api("/health/live"), api("/health/ready"), api("/metrics", { raw: true })]);
    tile("h-live", live.status === "fulfilled" ? live.value.status : "down", live.status === "fulfilled" ? "ok" : "bad");
    if (ready.status === "fulfilled") {
      tile("h-ready", "ready", "ok");
      $("h-ready-detail").textContent = Object.keys(ready.value.checks || {}).join(", ");
    } else {
      tile("h-ready", "not ready", "bad");
      $("h-ready-detail").textContent = ready.reason.message;
    }
    $("health-updated").textContent = `updated ${fmtDate(Date.now() / 1000).slice(11)}`;
    if (metrics.status !== "fulfilled") {
      tile("h-queue", "-", "bad");
      $("h-queue-cap").textContent = `metrics: ${metrics.reason.message}`;
      return;
    }
    const samples = parseMetrics(metrics.value);
    const now = performance.now() / 1000;
    const current = {
      at: now,
      requests: total(samples, "patchcore_http_requests_total"),
      predicts: total(samples, "patchcore_http_requests_total", isPredict),
      latencySum: total(samples, "patchcore_http_request_duration_seconds_sum", isPredict),
      latencyCount: total(samples, "patchcore_http_request_duration_seconds_count", isPredict),
      buckets: latencyBuckets(samples),
    };
    const depth = total(samples, "patchcore_queue_depth");
    const capacity = total(samples, "patchcore_queue_capacity");
    tile("h-queue", String(depth), capacity && depth >= capacity ? "bad" : undefined);
    $("h-queue-cap").textContent = `of ${capacity} (429 above)`;
    const images = total(samples, "patchcore_images_predicted_total");
    const anomalous = total(samples, "patchcore_images_anomalous_total");
    tile("h-images", `${images} / ${anomalous}`);
    const jobs = {};
    for (const s of samples) if (s.name === "patchcore_build_jobs") jobs[s.labels.state] = s.value;
    tile("h-jobs", `${jobs.running || 0} running, ${jobs.queued || 0} queued`);
    const banks = samples.filter((s) => s.name === "patchcore_bank_size").length;
    const failed = total(samples, "patchcore_failed_banks");
    tile("h-banks", `${banks} / ${failed}`, failed ? "bad" : undefined);

    const prev = state.lastMetrics;
    state.lastMetrics = current;
    if (!prev || now <= prev.at) {
      tile("h-rps", "...");
      tile("h-predict-rps", "...");
      tile("h-latency", current.latencyCount ? ms(current.latencySum / current.latencyCount) : "-");
      $("h-latency-note").textContent = "mean since start";
      return;
    }
    const dt = now - prev.at;
    tile("h-rps", ((current.requests - prev.requests) / dt).toFixed(2));
    tile("h-predict-rps", ((current.predicts - prev.predicts) / dt).toFixed(2));
    const count = current.latencyCount - prev.latencyCount;
    if (count > 0) {
      tile("h-latency", ms((current.latencySum - prev.latencySum) / count));
      const q = p95(current.buckets, prev.buckets);
      $("h-latency-note").textContent = `mean over the last ${dt.toFixed(0)} s; p95 <= ${q === null ? "-" : ms(q)}`;
    } else {
      tile("h-latency", current.latencyCount ? ms(current.latencySum / current.latencyCount) : "-");
      $("h-latency-note").textContent = `mean since start (no predictions in the last ${dt.toFixed(0)} s)`;
    }
  }

  function startHealth() {
    if (state.healthTimer) return;
    const tick = () => refreshHealth().catch(() => {});
    tick();
    state.healthTimer = setInterval(tick, HEALTH_EVERY_MS);
  }

  function stopHealth() {
    clearInterval(state.healthTimer);
    state.healthTimer = null;
    state.lastMetrics = null;
  }

  // ------------------------------------------------------------------ start
  function init() {
    $("key-form").addEventListener("submit", unlock);
    $("key-forget").addEventListener("click", lock);
    $("products-refresh").addEventListener("click", loadProducts);
    $("product-delete").addEventListener("click", deleteProduct);
    $("opacity").addEventListener("input", applyOpacity);
    $("show-boxes").addEventListener("change", applyBoxes);
    $("try-clear").addEventListener("click", () => {
      for (const img of document.querySelectorAll("#try-results img.photo")) URL.revokeObjectURL(img.src);
      $("try-results").replaceChildren();
      show($("try-error"), "");
    });
    wireDropZone($("try-drop"), $("try-files"), tryFiles);
    wireDropZone($("build-drop"), $("build-files"), uploadNominal);
    $("build-product").addEventListener("change", refreshStaged);
    $("staging-clear").addEventListener("click", clearStaging);
    $("build-start").addEventListener("click", startBuild);
    $("job-cancel").addEventListener("click", cancelJob);
    $("job-activate").addEventListener("click", activateJobResult);
    window.addEventListener("hashchange", route);
    applyAdmin();
    initAdmin().then(route);
  }

  init();
})();
