// personal-retrieval's page: plain DOM, no framework, no build step. Every string from the server or the user
// reaches the page through textContent or an attribute set by property, never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const state = {
  key: sessionStorage.getItem("apiKey") || "",
  results: [],          // the hits shown
  current: null,        // the hit shown in the detail panel
  selected: new Set(),  // gallery ids chosen for a new token
  gair: null,           // the last GAIR run
  job: null,            // the token job being watched
  history: JSON.parse(sessionStorage.getItem("history") || "[]"),
};

// ----- talking to the API
async function api(path, options = {}) {
  const headers = Object.assign({}, options.headers || {});
  if (state.key) headers["X-API-Key"] = state.key;
  const response = await fetch(path, Object.assign({}, options, { headers }));
  const type = response.headers.get("content-type") || "";
  const body = type.includes("application/json") ? await response.json() : null;
  if (response.status === 401) $("key-form").hidden = false;
  if (!response.ok) throw new Error((body && body.error) || `${response.status} ${response.statusText}`);
  return body;
}

function postJSON(path, data) {
  return api(path, { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(data) });
}

// An image of the API: a plain src without a key; with a key, fetched with the header and shown as a blob: URL.
function setImage(img, url) {
  if (!state.key) { img.src = url; return; }
  fetch(url, { headers: { "X-API-Key": state.key } })
    .then((r) => (r.ok ? r.blob() : Promise.reject(new Error(r.statusText))))
    .then((b) => { img.src = URL.createObjectURL(b); })
    .catch(() => { img.alt = "image unavailable"; });
}

function el(tag, props = {}, children = []) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (k === "text") node.textContent = v;
    else if (k === "class") node.className = v;
    else node[k] = v;
  }
  for (const c of children) node.appendChild(c);
  return node;
}

function showError(message) {
  $("error").textContent = message || "";
  $("error").hidden = !message;
}

function status(message) { $("status").textContent = message || ""; }

async function busy(button, work) {
  button.disabled = true;
  showError("");
  try { return await work(); } catch (e) { showError(e.message); } finally { button.disabled = false; }
}

// ----- results
function renderResults(title, results) {
  state.results = results || [];
  $("results-title").textContent = title;
  const grid = $("results");
  grid.replaceChildren();
  for (const hit of state.results) {
    const img = el("img", { alt: hit.path, loading: "lazy" });
    setImage(img, hit.thumb);
    const pick = el("input", { type: "checkbox", class: "pick", title: "select for a token", checked: state.selected.has(hit.id) });
    pick.addEventListener("click", (ev) => { ev.stopPropagation(); toggleSelected(hit.id, pick.checked); });
    const card = el("div", { class: "card" + (state.selected.has(hit.id) ? " selected" : "") }, [
      img,
      el("div", { class: "meta" }, [el("span", { class: "rank", text: `#${hit.rank}` }), el("span", { class: "score", text: hit.score.toFixed(4) })]),
      el("div", { class: "path", text: hit.path, title: hit.path }),
      pick,
    ]);
    card.dataset.id = String(hit.id);
    card.addEventListener("click", () => showDetail(hit));
    grid.appendChild(card);
  }
  if (!state.results.length) grid.appendChild(el("p", { class: "muted", text: "no results" }));
}

function showDetail(hit) {
  state.current = hit;
  $("detail").hidden = false;
  setImage($("detail-img"), hit.image);
  $("detail-path").textContent = hit.path;
  $("detail-id").textContent = String(hit.id);
  $("detail-rank").textContent = String(hit.rank);
  $("detail-score").textContent = hit.score.toFixed(4);
  $("detail-select").textContent = state.selected.has(hit.id) ? "Unselect" : "Select for a token";
}

function toggleSelected(id, on) {
  if (on) state.selected.add(id); else state.selected.delete(id);
  $("learn-selected").textContent = String(state.selected.size);
  for (const card of $("results").querySelectorAll(".card")) {
    const chosen = state.selected.has(Number(card.dataset.id));
    card.classList.toggle("selected", chosen);
    card.querySelector(".pick").checked = chosen;
  }
  if (state.current && state.current.id === id) showDetail(state.current);
}

// ----- searching, history and links
function searchParams() {
  const p = new URLSearchParams();
  const q = $("q").value.trim();
  if (q) p.set("q", q);
  p.set("k", $("k").value || "20");
  if ($("token").value) p.set("token", $("token").value);
  return p;
}

function remember(label, params) {
  const url = "?" + params.toString();
  if (location.search !== url) history.pushState(null, "", url);
  state.history = [{ label, url }].concat(state.history.filter((h) => h.url !== url)).slice(0, 30);
  sessionStorage.setItem("history", JSON.stringify(state.history));
  renderHistory();
}

function renderHistory() {
  const list = $("history");
  list.replaceChildren();
  for (const h of state.history) {
    const a = el("a", { href: h.url, text: h.label });
    a.addEventListener("click", (ev) => { ev.preventDefault(); history.pushState(null, "", h.url); runFromURL(); });
    list.appendChild(el("li", {}, [a]));
  }
}

// Upload names the mix parser reads: letters, digits, . _ - only, and an image extension.
function safeName(file, i) {
  const ext = (file.name.match(/\.(jpe?g|png|webp|bmp|gif|tiff?)$/i) || [".png"])[0].toLowerCase();
  const stem = file.name.replace(/\.[^.]*$/, "").replace(/[^A-Za-z0-9._-]+/g, "_").slice(0, 40) || "photo";
  return `${stem}-${i}${ext}`;
}

async function search() {
  const q = $("q").value.trim();
  const files = Array.from($("photo").files || []);
  const k = $("k").value || "20";
  const token = $("token").value;
  if (!q && !files.length) { showError("type a query, or choose a photo"); return; }
  await busy($("search-btn"), async () => {
    const t0 = performance.now();
    let out;
    if (files.length) {
      const form = new FormData();
      const names = files.map((f, i) => safeName(f, i));
      files.forEach((f, i) => form.append("images", f, names[i]));
      form.append("k", k);
      if (token) form.append("token", token);
      if (!q && files.length === 1) {
        form.delete("images");
        form.append("image", files[0], names[0]);
        out = await api("/api/search/image", { method: "POST", body: form });
      } else {
        const quoted = q ? (q.includes('"') ? q : JSON.stringify(q)) : "";
        form.append("q", [quoted].concat(names.filter((n) => !q.includes(n))).filter(Boolean).join(" + "));
        out = await api("/api/search", { method: "POST", body: form });
      }
      status(`searched by ${files.length} photo(s) in ${Math.round(performance.now() - t0)} ms`);
      renderResults(`Results for ${out.query}`, out.results);
      return;
    }
    const params = searchParams();
    out = await api("/api/search?" + params.toString());
    status(`${out.results.length} results in ${Math.round(performance.now() - t0)} ms` + (out.composed ? ` · encoded as: ${out.composed}` : ""));
    renderResults(`Results for ${q}`, out.results);
    remember(q + (token ? `  [${token}]` : ""), params);
  });
}

async function moreLikeThis(id) {
  await busy($("more-like"), async () => {
    const k = $("k").value || "20";
    const out = await api(`/api/similar/${id}?k=${encodeURIComponent(k)}`);
    renderResults(`More like #${id}`, out.results);
    status(`${out.results.length} images like #${id}`);
    const p = new URLSearchParams({ similar: String(id), k });
    remember(`more like #${id}`, p);
  });
}

function runFromURL() {
  const p = new URLSearchParams(location.search);
  if (p.get("k")) $("k").value = p.get("k");
  if (p.get("token") !== null) ensureTokenOption(p.get("token"));
  if (p.get("similar")) { moreLikeThis(Number(p.get("similar"))); return; }
  if (p.get("q")) { $("q").value = p.get("q"); search(); }
}

// ----- tokens
function ensureTokenOption(name) {
  const select = $("token");
  if (name && ![...select.options].some((o) => o.value === name)) select.appendChild(el("option", { value: name, text: name }));
  select.value = name || "";
  showToken(select.value);
}

async function loadTokens(selectName) {
  const out = await api("/api/tokens");
  const select = $("token");
  const keep = selectName !== undefined ? selectName : select.value;
  select.replaceChildren(el("option", { value: "", text: "no token" }));
  for (const t of out.tokens) {
    const label = t.readable ? `${t.name} (${t.parent}, ${t.method})` + (t.usable ? "" : " – other model") : `${t.name} (unreadable)`;
    select.appendChild(el("option", { value: t.name, text: label, disabled: !t.readable || !t.usable }));
  }
  if ([...select.options].some((o) => o.value === keep)) select.value = keep;
}

async function showToken(name) {
  const panel = $("token-panel");
  if (!name) { panel.hidden = true; return; }
  try {
    const t = await api(`/api/tokens/${encodeURIComponent(name)}`);
    panel.hidden = false;
    $("token-title").textContent = t.placeholder;
    const rows = [["parent", t.parent], ["method", t.method], ["vectors", String(t.n_vectors)], ["model", t.model],
      ["diffusion", t.diffusion || "–"], ["steps", String((t.training || {}).steps ?? "?")],
      ["last loss", (t.training || {}).last_loss != null ? Number(t.training.last_loss).toFixed(4) : "–"],
      ["created", t.created], ["photos", t.concept_images || "–"]];
    $("token-meta").replaceChildren(...rows.flatMap(([k, v]) => [el("dt", { text: k }), el("dd", { text: v })]));
    const strip = $("token-images");
    strip.replaceChildren();
    for (const url of t.images) { const img = el("img", { alt: "concept image" }); setImage(img, url); strip.appendChild(img); }
    $("token-note").textContent = t.images.length ? "" : "its concept images are not on this machine";
    if (!$("q").value.includes("*") && !$("q").value.includes(`<${name}>`)) status(`write * in the query where ${t.placeholder} goes`);
  } catch (e) { showError(e.message); }
}

// ----- learning a token: a background job with a progress bar
async function learn() {
  await busy($("learn-start"), async () => {
    const form = new FormData();
    form.append("name", $("learn-name").value.trim());
    form.append("parent", $("learn-parent").value.trim());
    form.append("method", $("learn-method").value);
    if ($("learn-steps").value !== "") form.append("steps", $("learn-steps").value);
    form.append("ids", [...state.selected].join(","));
    Array.from($("learn-photos").files || []).forEach((f, i) => form.append("images", f, safeName(f, i)));
    const job = await api("/api/tokens", { method: "POST", body: form });
    watchJob(job);
  });
}

function renderJob(job) {
  const bar = $("learn-progress");
  bar.hidden = false;
  bar.max = Math.max(job.total, 1);
  bar.value = job.state === "done" ? bar.max : job.step;
  const loss = job.loss && job.loss.L != null ? ` · loss ${job.loss.L.toFixed(4)}` : "";
  const eta = job.eta_s != null ? ` · ETA ${Math.round(job.eta_s)} s` : "";
  const text = {
    running: `${job.token}: ${job.phase} · step ${job.step} / ${job.total}${loss}${eta}`,
    done: `${job.token}: learned in ${Math.round(job.elapsed_s)} s (${job.step} steps${loss})`,
    failed: `${job.token}: failed: ${job.error}`,
    cancelled: `${job.token}: cancelled`,
  }[job.state] || `${job.token}: ${job.state}`;
  $("learn-status").textContent = text;
  $("learn-cancel").hidden = job.state !== "running";
}

function watchJob(job) {
  state.job = job;
  renderJob(job);
  const tick = async () => {
    if (!state.job || state.job.id !== job.id) return;
    try {
      const now = await api(`/api/jobs/${encodeURIComponent(job.id)}`);
      state.job = now;
      renderJob(now);
      if (now.state === "running" || now.state === "queued") { setTimeout(tick, 400); return; }
      if (now.state === "done") { await loadTokens(now.token); ensureTokenOption(now.token); }
    } catch (e) { showError(e.message); }
  };
  setTimeout(tick, 300);
}

// ----- GAIR: one image per w, w* framed, choose another w by looking; a progress bar while the images come
function gairProgress() {
  let bar = $("gair-progress");
  if (!bar) {
    bar = el("progress", { id: "gair-progress", max: 1, value: 0 });
    $("gair-form").after(bar);
  }
  return bar;
}

function renderGairProgress(run) {
  const bar = gairProgress();
  bar.hidden = run.state !== "running";
  bar.max = Math.max(run.images_total, 1);
  bar.value = run.images_done;
  if (run.state === "running") status(`GAIR: generating images ${run.images_done} / ${run.images_total} ...`);
}

const pause = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

async function runGair() {
  const token = $("token").value;
  const q = $("q").value.trim();
  if (!token || !q.includes("*")) { showError("GAIR needs a token (pick one) and a query with * where it goes"); return; }
  await busy($("gair-run"), async () => {
    const t0 = performance.now();
    const body = { q, token, weights: $("gair-weights").value.trim(), k: Number($("k").value || 20), async: true };
    if ($("gair-steps").value) body.steps = Number($("gair-steps").value);
    let run = await postJSON("/api/gair", body);  // 202: the run id; its images done / total while it generates
    try {
      renderGairProgress(run);
      while (run.state === "running") {
        await pause(300);
        run = await api(`/api/gair/${encodeURIComponent(run.run)}`);
        renderGairProgress(run);
      }
    } finally { gairProgress().hidden = true; }
    if (run.state !== "done") throw new Error(`GAIR failed: ${run.error}`);
    state.gair = run;
    renderGair(run);
    renderResults(`GAIR results for ${q} (w* = ${run.w})`, run.results);
    status(`GAIR: ${run.images.length} images in ${Math.round(performance.now() - t0)} ms · w* = ${run.w} · encoded as: ${run.composed}`);
  });
}

function renderGair(run) {
  $("gair-out").hidden = false;
  const strip = $("gair-images");
  strip.replaceChildren();
  run.weights.forEach((w, i) => {
    const img = el("img", { alt: `generated for w=${w}`, title: `score ${run.scores[i].toFixed(4)} (concept ${run.concept_similarity[i].toFixed(3)}, context ${run.context_similarity[i].toFixed(3)})` });
    setImage(img, run.images[i]);
    const fig = el("figure", { class: "gair-w" + (i === run.best ? " best" : "") }, [img, el("figcaption", { text: `w=${w}` })]);
    fig.dataset.w = String(w);
    fig.addEventListener("click", () => { $("gair-slider").value = String(w); showChosen(w); choose(w); });
    strip.appendChild(fig);
  });
  const ctx = $("gair-context");
  ctx.replaceChildren();
  run.context_images.forEach((url) => {
    const img = el("img", { alt: "context image" });
    setImage(img, url);
    ctx.appendChild(el("figure", { class: "context" }, [img, el("figcaption", { text: "context x_c" })]));
  });
  $("gair-slider").value = String(run.w);
  showChosen(run.w);
}

function showChosen(w) {
  $("gair-w").textContent = `w = ${Number(w).toFixed(2)}`;
  for (const fig of $("gair-images").querySelectorAll("figure")) fig.classList.toggle("chosen", Math.abs(Number(fig.dataset.w) - w) < 1e-9);
}

async function choose(w) {
  if (!state.gair) return;
  await busy($("gair-choose"), async () => {
    const out = await postJSON(`/api/gair/${encodeURIComponent(state.gair.run)}/choose`, { w: Number(w) });
    renderResults(`GAIR results for ${state.gair.query} with w = ${out.w} (w* = ${out.w_star})`, out.results);
    $("gair-chosen").textContent = `searching with w = ${out.w} (GAIR chose w* = ${out.w_star})`;
  });
}

// ----- wiring
async function start() {
  $("search-form").addEventListener("submit", (ev) => { ev.preventDefault(); search(); });
  $("more-like").addEventListener("click", () => state.current && moreLikeThis(state.current.id));
  $("detail-select").addEventListener("click", () => state.current && toggleSelected(state.current.id, !state.selected.has(state.current.id)));
  $("detail-close").addEventListener("click", () => { $("detail").hidden = true; });
  $("token").addEventListener("change", () => showToken($("token").value));
  $("gair-form").addEventListener("submit", (ev) => { ev.preventDefault(); runGair(); });
  $("gair-slider").addEventListener("input", () => showChosen(Number($("gair-slider").value)));
  $("gair-choose").addEventListener("click", () => choose(Number($("gair-slider").value)));
  $("learn-form").addEventListener("submit", (ev) => { ev.preventDefault(); learn(); });
  $("learn-clear").addEventListener("click", () => { for (const id of [...state.selected]) toggleSelected(id, false); });
  $("learn-cancel").addEventListener("click", async () => {
    if (state.job) { try { renderJob(await api(`/api/jobs/${encodeURIComponent(state.job.id)}`, { method: "DELETE" })); } catch (e) { showError(e.message); } }
  });
  $("key-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    state.key = $("api-key").value;
    sessionStorage.setItem("apiKey", state.key);
    location.reload();
  });
  window.addEventListener("popstate", runFromURL);
  renderHistory();
  try {
    const info = await api("/api/info");
    $("info").textContent = `${info.count} images · ${info.model} · ${info.tokens.length} token(s)`;
    await loadTokens();
    const jobs = await api("/api/jobs");
    const live = jobs.jobs.find((j) => j.state === "running");
    if (live) watchJob(live);
    runFromURL();
  } catch (e) { showError(e.message); }
}

document.addEventListener("DOMContentLoaded", start);
