// DuDoCROP viewer: start a job (upload or PACS), follow its progress, then page through the original and corrected
// slices and their difference. Slices arrive as int16 HU (.npy, from /v1/jobs/{id}/slices/{i}); windowing is done
// here on canvases, so a window change needs no request. No libraries, nothing fetched from elsewhere.
"use strict";

const $ = (id) => document.getElementById(id);
const PRESETS = {  // [width, level] in HU
  paper: [450, 50],  // the paper's display window [-175, 275] HU
  soft: [400, 40],
  bone: [1800, 400],
  brain: [80, 40],
  lung: [1500, -600],
};
const TOKEN_KEY = "dudocrop-token";
const state = {
  token: sessionStorage.getItem(TOKEN_KEY) || "",
  threshold: 2500,   // the model's metal threshold (HU), from /healthz
  job: null,         // job id
  meta: null,        // /v1/jobs/{id}/slices
  index: 0,
  cache: new Map(),  // slice index -> {original, corrected, metal, rows, cols}
  pending: new Map(),
  poll: null,
};

function showMessage(text) {
  const m = $("message");
  m.textContent = text || "";
  m.hidden = !text;
}

async function api(path, opts = {}) {
  const headers = new Headers(opts.headers || {});
  if (state.token) headers.set("Authorization", "Bearer " + state.token);
  const r = await fetch(path, { ...opts, headers });
  if (r.status === 401) {
    $("auth-panel").hidden = false;
    $("auth-msg").textContent = state.token ? "The token was refused: enter the right one."
      : "This service asks for a bearer token.";
    throw new Error("401: a bearer token is needed");
  }
  return r;
}

async function detail(r) {
  try {
    const j = await r.json();
    return typeof j.detail === "string" ? j.detail : JSON.stringify(j.detail);
  } catch (e) {
    return r.statusText;
  }
}

// ---- start-up: the model, and whether the service asks for a token ----------------------------------------------
async function init() {
  try {
    const h = await (await fetch("healthz")).json();
    state.threshold = h.metal_threshold_hu;
    $("model").textContent = `model ${h.model_version} · ${h.geometry} geometry (${h.image_size}², ` +
      `${h.pixel_size_mm} mm) · ${h.device} ${h.precision} · ${h.steps ?? "the model's"} steps · metal ≥ ${h.metal_threshold_hu} HU`;
  } catch (e) {
    showMessage("the service does not answer /healthz: " + e.message);
  }
  try {
    const cfg = await (await fetch("viewer/config")).json();
    if (cfg.auth_required) {
      $("auth-panel").hidden = false;
      if (state.token) $("auth-msg").textContent = "token set (kept for this tab)";
    }
  } catch (e) {
    showMessage("the service does not answer /viewer/config: " + e.message);
  }
  const m = /job=([0-9a-f]{32})/.exec(location.hash);
  if (m) follow(m[1]);
}

$("auth-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  state.token = $("token").value.trim();
  sessionStorage.setItem(TOKEN_KEY, state.token);
  $("auth-msg").textContent = "token set";
  showMessage("");
});

// ---- starting a job -----------------------------------------------------------------------------------------------
function params() {
  const q = new URLSearchParams();
  for (const k of ["steps", "k", "alpha", "beta", "seed"]) {
    const v = $("p-" + k).value.trim();
    if (v !== "") q.set(k, v);
  }
  return q.toString();
}

async function submitJob(body, headers) {
  showMessage("");
  let r;
  try {
    r = await api("v1/jobs?" + params(), { method: "POST", body, headers });
  } catch (e) {
    showMessage(e.message);
    return;
  }
  if (r.status !== 202) {
    showMessage(`the job was refused (${r.status}): ${await detail(r)}`);
    return;
  }
  follow((await r.json()).id);
}

$("upload-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const files = $("files").files;
  if (!files.length) {
    showMessage("choose DICOM files, a zip or a NIfTI volume first");
    return;
  }
  const fd = new FormData();
  for (const f of files) fd.append("files", f, f.name);
  submitJob(fd, {});
});

$("pacs-auth").addEventListener("change", () => {
  const kind = $("pacs-auth").value;
  document.querySelectorAll(".pacs-basic").forEach((e) => { e.hidden = kind !== "basic"; });
  document.querySelectorAll(".pacs-bearer").forEach((e) => { e.hidden = kind !== "bearer"; });
});

$("pacs-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const kind = $("pacs-auth").value;
  const auth = kind === "basic" ? { type: "basic", username: $("pacs-user").value, password: $("pacs-pass").value }
    : kind === "bearer" ? { type: "bearer", token: $("pacs-token").value } : null;
  const body = {
    dicomweb: { url: $("pacs-url").value.trim(), study: $("pacs-study").value.trim(),
      series: $("pacs-series").value.trim() || null, auth },
    store: $("pacs-store").checked,
  };
  submitJob(JSON.stringify(body), { "Content-Type": "application/json" });
});

$("open-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const id = $("open-id").value.trim().toLowerCase();
  if (!/^[0-9a-f]{32}$/.test(id)) {
    showMessage("a job id is 32 hexadecimal characters");
    return;
  }
  follow(id);
});

// ---- progress -------------------------------------------------------------------------------------------------------
function follow(id) {
  clearTimeout(state.poll);
  state.job = id;
  state.meta = null;
  state.cache.clear();
  state.pending.clear();
  history.replaceState(null, "", "#job=" + id);
  $("start").open = false;
  for (const c of document.querySelectorAll(".panels canvas")) delete c.dataset.slice;
  $("job").hidden = false;
  $("viewer").hidden = true;
  $("job-id").textContent = id;
  $("job-error").hidden = true;
  $("job-stored").hidden = true;
  $("cancel").hidden = false;
  poll(id);
}

async function poll(id) {
  if (id !== state.job) return;
  let st;
  try {
    const r = await api("v1/jobs/" + id);
    if (!r.ok) throw new Error(`${r.status}: ${await detail(r)}`);
    st = await r.json();
  } catch (e) {
    $("job-error").textContent = e.message;
    $("job-error").hidden = false;
    return;
  }
  const p = $("progress");
  p.max = st.total || 1;
  p.value = st.done || 0;
  const eta = st.eta_s === null || st.eta_s === undefined ? "" : ` · ETA ${Math.round(st.eta_s)} s`;
  $("job-text").textContent = `${st.state} · ${st.done}/${st.total} slices (${st.with_metal} with metal)` +
    ` · ${Math.round(st.elapsed_s || 0)} s${st.state === "done" ? "" : eta}`;
  if (st.error) {
    $("job-error").textContent = "error: " + st.error;
    $("job-error").hidden = false;
  }
  if (st.stored || st.store_error) {
    $("job-stored").textContent = st.stored
      ? `stored back: series ${st.stored.series} (${st.stored.instances} instances) at ${st.stored.url}`
      : "storing back failed: " + st.store_error;
    $("job-stored").hidden = false;
  }
  if (st.state === "done") {
    $("cancel").hidden = true;
    openViewer(id);
  } else if (st.state === "failed" || st.state === "cancelled") {
    $("cancel").hidden = true;
  } else {
    state.poll = setTimeout(() => poll(id), 500);
  }
}

$("cancel").addEventListener("click", async () => {
  if (!state.job) return;
  const r = await api("v1/jobs/" + state.job, { method: "DELETE" });
  if (!r.ok) showMessage(`cancel failed (${r.status}): ${await detail(r)}`);
});

// ---- slices ---------------------------------------------------------------------------------------------------------
function parseNpy(buf) {
  // NumPy .npy: magic, version, header length (uint16 v1 / uint32 v2+), a Python dict literal, then the data
  const b = new Uint8Array(buf);
  if (b[0] !== 0x93 || String.fromCharCode(...b.slice(1, 6)) !== "NUMPY") throw new Error("not an .npy answer");
  const dv = new DataView(buf);
  const major = b[6];
  const hlen = major === 1 ? dv.getUint16(8, true) : dv.getUint32(8, true);
  const start = major === 1 ? 10 : 12;
  const header = new TextDecoder("latin1").decode(b.slice(start, start + hlen));
  if (!/'descr':\s*'<i2'/.test(header) || /'fortran_order':\s*True/.test(header)) {
    throw new Error("unexpected .npy layout: " + header);
  }
  const shape = /'shape':\s*\(([^)]*)\)/.exec(header)[1].split(",").filter((s) => s.trim()).map(Number);
  return { shape, data: new Int16Array(buf.slice(start + hlen)) };
}

async function fetchSlice(i) {
  if (state.cache.has(i)) return state.cache.get(i);
  if (state.pending.has(i)) return state.pending.get(i);
  const job = state.job;
  const p = (async () => {
    const r = await api(`v1/jobs/${job}/slices/${i}`);
    if (!r.ok) throw new Error(`slice ${i}: ${r.status} ${await detail(r)}`);
    const npy = parseNpy(await r.arrayBuffer());
    const [, rows, cols] = npy.shape;
    const n = rows * cols;
    const s = { rows, cols, original: npy.data.subarray(0, n), corrected: npy.data.subarray(n, 2 * n),
      metal: Number(r.headers.get("X-Metal-Pixels")), consistency: r.headers.get("X-Consistency") };
    if (job === state.job) {
      state.cache.set(i, s);
      if (state.cache.size > 64) state.cache.delete(state.cache.keys().next().value);
    }
    return s;
  })();
  state.pending.set(i, p);
  try {
    return await p;
  } finally {
    state.pending.delete(i);
  }
}

async function openViewer(id) {
  const r = await api(`v1/jobs/${id}/slices`);
  if (!r.ok) {
    showMessage(`no previews: ${r.status} ${await detail(r)}`);
    return;
  }
  const meta = await r.json();
  if (id !== state.job) return;
  state.meta = meta;
  const aspect = (meta.cols * meta.spacing_mm[1]) / (meta.rows * meta.spacing_mm[0]);
  for (const c of document.querySelectorAll(".panels canvas")) {
    c.width = meta.cols;
    c.height = meta.rows;
    c.style.aspectRatio = String(aspect);
  }
  const slider = $("slice");
  slider.max = meta.total - 1;
  // start on the middle one of the slices with metal (the input's maximum reaches the model's threshold)
  const metal = meta.max_hu.map((v, i) => [v, i]).filter(([v]) => v >= state.threshold).map(([, i]) => i);
  const start = metal.length ? metal[Math.floor(metal.length / 2)] : Math.floor(meta.total / 2);
  $("viewer").hidden = false;
  show(start);
}

async function show(i) {
  if (!state.meta) return;
  i = Math.max(0, Math.min(state.meta.total - 1, i));
  state.index = i;
  $("slice").value = i;
  const pos = state.meta.positions_mm[i];
  let s;
  try {
    s = await fetchSlice(i);
  } catch (e) {
    showMessage(e.message);
    return;
  }
  if (state.index !== i) return;  // the user moved on while it loaded
  $("slice-text").textContent = `${i + 1} / ${state.meta.total} · ${pos} mm · ` +
    (s.metal ? `${s.metal} metal pixels` : "no metal: passed through") +
    (s.consistency ? ` · raw-data consistency ${s.consistency} (X'p = 1)` : "");
  render();
  for (const j of [i + 1, i - 1]) {  // prefetch the neighbours
    if (j >= 0 && j < state.meta.total && !state.cache.has(j)) fetchSlice(j).catch(() => {});
  }
}

// ---- rendering ------------------------------------------------------------------------------------------------------
function windowWL() {
  const w = Math.max(1, Number($("ww").value) || 1);
  const l = Number($("wl").value) || 0;
  return [w, l];
}

function paint(canvas, rows, cols, gray, outline) {
  const ctx = canvas.getContext("2d");
  const img = ctx.createImageData(cols, rows);
  const px = img.data;
  for (let k = 0; k < rows * cols; k++) {
    const g = gray[k];
    px[4 * k] = px[4 * k + 1] = px[4 * k + 2] = g;
    px[4 * k + 3] = 255;
  }
  if (outline) {
    for (const k of outline) {
      px[4 * k] = 255;
      px[4 * k + 1] = 40;
      px[4 * k + 2] = 40;
    }
  }
  ctx.putImageData(img, 0, 0);
}

function metalOutline(s) {
  // metal pixels (original ≥ the model's threshold) with a 4-neighbour that is not metal
  const { rows, cols, original } = s;
  const t = state.threshold;
  const out = [];
  for (let r = 0; r < rows; r++) {
    for (let c = 0; c < cols; c++) {
      const k = r * cols + c;
      if (original[k] < t) continue;
      if (r === 0 || c === 0 || r === rows - 1 || c === cols - 1 || original[k - 1] < t || original[k + 1] < t ||
          original[k - cols] < t || original[k + cols] < t) out.push(k);
    }
  }
  return out;
}

function render() {
  const s = state.cache.get(state.index);
  if (!s) return;
  const [w, l] = windowWL();
  const lo = l - w / 2;
  const n = s.rows * s.cols;
  const toGray = (v) => Math.max(0, Math.min(255, Math.round(((v - lo) / w) * 255)));
  const go = new Uint8ClampedArray(n), gc = new Uint8ClampedArray(n), gd = new Uint8ClampedArray(n);
  for (let k = 0; k < n; k++) {
    go[k] = toGray(s.original[k]);
    gc[k] = toGray(s.corrected[k]);
    gd[k] = Math.max(0, Math.min(255, Math.round(((s.corrected[k] - s.original[k]) / w + 0.5) * 255)));
  }
  const outline = $("outline").checked ? metalOutline(s) : null;
  paint($("cv-original"), s.rows, s.cols, go, outline);
  paint($("cv-corrected"), s.rows, s.cols, gc, outline);
  paint($("cv-difference"), s.rows, s.cols, gd, outline);
  for (const c of document.querySelectorAll(".panels canvas")) {  // for tests and scripts: what is on screen
    c.dataset.slice = String(state.index);
    c.dataset.window = `${w},${l}`;
  }
}

$("slice").addEventListener("input", () => show(Number($("slice").value)));
$("preset").addEventListener("change", () => {
  const p = PRESETS[$("preset").value];
  if (p) {
    $("ww").value = p[0];
    $("wl").value = p[1];
  }
  render();
});
for (const id of ["ww", "wl"]) {
  $(id).addEventListener("input", () => {
    $("preset").value = "custom";
    render();
  });
}
$("outline").addEventListener("change", render);

for (const c of document.querySelectorAll(".panels canvas")) {
  c.addEventListener("wheel", (ev) => {
    ev.preventDefault();
    show(state.index + (ev.deltaY > 0 ? 1 : -1));
  }, { passive: false });
  c.addEventListener("mousemove", (ev) => {
    const s = state.cache.get(state.index);
    if (!s) return;
    const rect = c.getBoundingClientRect();
    const col = Math.floor(((ev.clientX - rect.left) / rect.width) * s.cols);
    const row = Math.floor(((ev.clientY - rect.top) / rect.height) * s.rows);
    if (row < 0 || col < 0 || row >= s.rows || col >= s.cols) return;
    const k = row * s.cols + col;
    $("readout").textContent = `(${row}, ${col}): original ${s.original[k]} HU · corrected ${s.corrected[k]} HU`;
  });
}

document.addEventListener("keydown", (ev) => {
  if (!state.meta || $("viewer").hidden) return;
  const tag = (ev.target && ev.target.tagName) || "";
  if ((tag === "INPUT" && ev.target.type !== "range") || tag === "SELECT" || tag === "TEXTAREA") return;
  const step = { ArrowUp: -1, ArrowLeft: -1, ArrowDown: 1, ArrowRight: 1 }[ev.key];
  if (step === undefined) return;
  ev.preventDefault();
  show(state.index + step);
});

$("download").addEventListener("click", async () => {
  const r = await api(`v1/jobs/${state.job}/result`);
  if (!r.ok) {
    showMessage(`download failed (${r.status}): ${await detail(r)}`);
    return;
  }
  const cd = r.headers.get("Content-Disposition") || "";
  const name = (/filename="([^"]+)"/.exec(cd) || [, `${state.job}-result`])[1];
  const url = URL.createObjectURL(await r.blob());
  const a = document.createElement("a");
  a.href = url;
  a.download = name;
  document.body.appendChild(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10000);
});

init();
