// latent-tap logit-lens view. Plain JS, no dependencies, public API only:
// GET /props, POST /tokenize, POST /apply-template, POST /completion with
// "stream": true and the "lens" (and optionally "latents") request fields.
"use strict";
(function () {
  const $ = (id) => document.getElementById(id);
  const VIRIDIS = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];
  const METRICS = {
    prob: { lo: "p=0", hi: "p=1", label: "p(next token)" },
    entropy: { lo: "0 nats", hi: "max", label: "entropy" },
    kl: { lo: "KL 0", hi: "KL large", label: "KL(final ‖ layer)" },
    rank: { lo: "rank low", hi: "rank 0", label: "rank of next token" },
  };
  const st = {
    layers: [], cols: [], inputs: new Map(), nVocab: 0, metric: "prob",
    latents: new Map(), prompt: "", ctrl: null, selected: -1, focus: null,
  };

  // ---- text helpers --------------------------------------------------------
  function pieceText(p) {
    if (p === null || p === undefined) return "";
    if (Array.isArray(p)) return p.map((b) => "\\x" + (b & 255).toString(16).padStart(2, "0")).join("");
    return String(p);
  }
  function shown(p) {
    return pieceText(p).replace(/ /g, "\u2423").replace(/\n/g, "\u21b5").replace(/\t/g, "\u21e5");
  }
  function fmt(x, d) { return x === null || x === undefined ? "–" : Number(x).toFixed(d); }

  // ---- colours -------------------------------------------------------------
  function viridis(t) {
    t = Math.min(1, Math.max(0, t));
    const x = t * (VIRIDIS.length - 1), i = Math.min(VIRIDIS.length - 2, Math.floor(x)), f = x - i;
    const c = VIRIDIS[i].map((v, k) => Math.round(v + (VIRIDIS[i + 1][k] - v) * f));
    return c;
  }
  function metricValue(cell) {
    switch (st.metric) {
      case "prob": return cell.target_logprob == null ? null : Math.exp(cell.target_logprob);
      case "entropy": return cell.entropy == null ? null : cell.entropy / Math.log(Math.max(2, st.nVocab));
      case "kl": return cell.kl == null ? null : 1 - cell.kl / (cell.kl + 1);
      case "rank": return cell.target_rank == null ? null : 1 - Math.log10(cell.target_rank + 1) / Math.log10(Math.max(10, st.nVocab));
    }
    return null;
  }
  function paint(td, cell) {
    const v = metricValue(cell);
    if (v === null) { td.style.background = "#d8d8e0"; td.style.color = "#222"; return; }
    const [r, g, b] = viridis(v);
    td.style.background = `rgb(${r},${g},${b})`;
    td.style.color = (0.299 * r + 0.587 * g + 0.114 * b) > 140 ? "#111" : "#fff";
  }
  function updateLegend() {
    const m = METRICS[st.metric];
    $("legend-lo").textContent = m.lo;
    $("legend-hi").textContent = m.hi;
  }

  // ---- the grid ------------------------------------------------------------
  function resetGrid(layers) {
    st.layers = layers; st.cols = []; st.inputs = new Map(); st.selected = -1; st.focus = null;
    const head = $("head-row");
    while (head.children.length > 1) head.removeChild(head.lastChild);
    const body = $("grid-body");
    body.textContent = "";
    const tr = document.createElement("tr");
    tr.className = "target";
    const th = document.createElement("th");
    th.scope = "row"; th.textContent = "next";
    tr.appendChild(th);
    body.appendChild(tr);
    // Deepest layer first: the answer forms towards the top.
    for (let i = layers.length - 1; i >= 0; i--) {
      const r = document.createElement("tr");
      r.dataset.li = String(i);
      const h = document.createElement("th");
      h.scope = "row"; h.textContent = "L" + layers[i];
      r.appendChild(h);
      body.appendChild(r);
    }
    $("details").innerHTML = '<p class="muted">Hover or focus a cell to see its top-k.</p>';
    $("curve").innerHTML = '<p class="muted">Click a token to see its probability across layers.</p>';
  }
  function inputPiece(pos) { return st.inputs.has(pos) ? st.inputs.get(pos) : ""; }
  function refreshHeaders() {
    const ths = $("head-row").children;
    st.cols.forEach((col, j) => {
      const b = ths[j + 1].firstChild;
      b.firstChild.textContent = shown(inputPiece(col.pos)) || "\u00a0";
      b.setAttribute("aria-label", `position ${col.pos}, input ${JSON.stringify(pieceText(inputPiece(col.pos)))}: show the next token across layers`);
    });
  }
  function addRow(row) {
    const j = st.cols.length;
    st.cols.push(row);
    if (row.target !== null && row.target !== undefined) st.inputs.set(row.pos + 1, row.target_piece);
    const th = document.createElement("th");
    th.scope = "col";
    const b = document.createElement("button");
    b.type = "button";
    b.appendChild(document.createElement("span"));
    const ps = document.createElement("span");
    ps.className = "pos"; ps.textContent = String(row.pos);
    b.appendChild(ps);
    b.addEventListener("click", () => selectColumn(j));
    th.appendChild(b);
    $("head-row").appendChild(th);
    const trs = $("grid-body").children;
    const t = document.createElement("td");
    t.textContent = shown(row.target_piece);
    trs[0].appendChild(t);
    for (let k = 1; k < trs.length; k++) {
      const li = Number(trs[k].dataset.li);
      const cell = row.cells ? row.cells[li] : null;
      const td = document.createElement("td");
      td.className = "cell " + (cell ? "filled" : "none");
      td.dataset.li = String(li); td.dataset.col = String(j);
      td.tabIndex = -1;
      if (cell) {
        const top = cell.top && cell.top[0];
        td.textContent = top ? shown(top.piece) : "";
        paint(td, cell);
      } else {
        td.textContent = "·";
        td.title = "no row at this layer and position";
      }
      trs[k].appendChild(td);
    }
    if (!st.focus) {
      const first = $("grid-body").querySelector("td.cell.filled");
      if (first) { first.tabIndex = 0; st.focus = first; }
    }
    refreshHeaders();
  }
  function repaint() {
    for (const td of $("grid-body").querySelectorAll("td.cell.filled")) {
      paint(td, st.cols[Number(td.dataset.col)].cells[Number(td.dataset.li)]);
    }
    updateLegend();
  }
  function filledCount() { return $("grid-body").querySelectorAll("td.cell.filled").length; }

  // ---- details and the per-layer curve ------------------------------------
  function showDetails(td) {
    const col = st.cols[Number(td.dataset.col)], li = Number(td.dataset.li);
    const cell = col.cells[li];
    const d = $("details");
    d.textContent = "";
    const h = document.createElement("h2");
    h.textContent = `Layer ${st.layers[li]}, position ${col.pos}: input ${JSON.stringify(pieceText(inputPiece(col.pos)))}, next ${JSON.stringify(pieceText(col.target_piece))}`;
    d.appendChild(h);
    const t = document.createElement("table");
    t.className = "topk";
    t.innerHTML = "<caption class='sr-only'>Top tokens of this layer</caption><thead><tr><th scope='col'>#</th><th scope='col'>token</th><th scope='col'>p</th><th scope='col'>log p</th></tr></thead>";
    const tb = document.createElement("tbody");
    (cell.top || []).forEach((e, i) => {
      const tr = document.createElement("tr");
      const cells = [String(i), null, fmt(Math.exp(e.logprob), 3), fmt(e.logprob, 3)];
      cells.forEach((c, k) => {
        const x = document.createElement("td");
        if (k === 1) { const s = document.createElement("span"); s.className = "tok"; s.textContent = shown(e.piece); x.appendChild(s); x.appendChild(document.createTextNode(" #" + e.id)); }
        else { x.textContent = c; x.className = "num"; }
        tr.appendChild(x);
      });
      tb.appendChild(tr);
    });
    t.appendChild(tb);
    d.appendChild(t);
    const p = document.createElement("p");
    p.textContent = `entropy ${fmt(cell.entropy, 3)} nats · next token: p ${cell.target_logprob == null ? "–" : fmt(Math.exp(cell.target_logprob), 4)}, rank ${cell.target_rank == null ? "–" : cell.target_rank} · KL to final ${fmt(cell.kl, 4)} nats`;
    d.appendChild(p);
  }
  function selectColumn(j) {
    st.selected = j;
    for (const th of $("head-row").children) th.classList.remove("selected");
    $("head-row").children[j + 1].classList.add("selected");
    for (const td of $("grid-body").querySelectorAll("td.selected-col")) td.classList.remove("selected-col");
    for (const td of $("grid-body").querySelectorAll(`td[data-col="${j}"]`)) td.classList.add("selected-col");
    const col = st.cols[j];
    const c = $("curve");
    c.textContent = "";
    const h = document.createElement("h2");
    const pts = [];
    st.layers.forEach((l, i) => {
      const cell = col.cells ? col.cells[i] : null;
      if (cell && cell.target_logprob != null) pts.push({ l, i, p: Math.exp(cell.target_logprob), rank: cell.target_rank });
    });
    h.textContent = col.target == null
      ? `Position ${col.pos}: no token came after it`
      : `p(${JSON.stringify(pieceText(col.target_piece))}) across layers at position ${col.pos}`;
    c.appendChild(h);
    if (!pts.length) {
      const p = document.createElement("p");
      p.textContent = "Nothing to follow across layers here.";
      c.appendChild(p);
      return;
    }
    const first = pts.find((q) => q.rank === 0);
    const s = document.createElement("p");
    s.textContent = first ? `It becomes the top-1 token at layer ${first.l}.` : "It is never the top-1 token in the lens.";
    c.appendChild(s);
    const W = 480, H = 160, L = 34, B = 22, n = st.layers.length;
    const x = (i) => L + (n > 1 ? (i * (W - L - 8)) / (n - 1) : 0);
    const y = (p) => 8 + (1 - p) * (H - B - 8);
    let svg = `<svg class="curve" viewBox="0 0 ${W} ${H}" role="img" aria-label="probability by layer"><line class="axis" x1="${L}" y1="${y(0)}" x2="${W - 8}" y2="${y(0)}"/><line class="axis" x1="${L}" y1="8" x2="${L}" y2="${y(0)}"/>`;
    svg += `<text x="2" y="${y(1) + 4}">1</text><text x="2" y="${y(0.5) + 4}">0.5</text><text x="2" y="${y(0) + 4}">0</text>`;
    st.layers.forEach((l, i) => { if (n <= 24 || i % Math.ceil(n / 24) === 0) svg += `<text x="${x(i) - 4}" y="${H - 6}">${l}</text>`; });
    svg += `<polyline class="line" points="${pts.map((q) => x(q.i).toFixed(1) + "," + y(q.p).toFixed(1)).join(" ")}"/>`;
    for (const q of pts) svg += `<circle cx="${x(q.i).toFixed(1)}" cy="${y(q.p).toFixed(1)}" r="2.5" fill="#2750b8"/>`;
    svg += "</svg>";
    const wrap = document.createElement("div");
    wrap.innerHTML = svg;
    c.appendChild(wrap);
    const t = document.createElement("table");
    t.className = "curve-table";
    t.innerHTML = "<caption class='sr-only'>Probability of the next token by layer</caption><thead><tr><th scope='col'>layer</th><th scope='col'>p</th><th scope='col'>rank</th></tr></thead>";
    const tb = document.createElement("tbody");
    for (const q of pts) {
      const tr = document.createElement("tr");
      for (const v of [String(q.l), fmt(q.p, 4), String(q.rank)]) { const td = document.createElement("td"); td.className = "num"; td.textContent = v; tr.appendChild(td); }
      tb.appendChild(tr);
    }
    t.appendChild(tb);
    const det = document.createElement("details");
    const sum = document.createElement("summary");
    sum.textContent = "Values";
    det.appendChild(sum); det.appendChild(t);
    c.appendChild(det);
  }
  function moveFocus(td) {
    if (!td) return;
    if (st.focus) st.focus.tabIndex = -1;
    td.tabIndex = 0; st.focus = td; td.focus();
  }
  function onGridKey(e) {
    const td = e.target.closest("td.cell");
    if (!td) return;
    const tr = td.parentElement, idx = Array.prototype.indexOf.call(tr.children, td);
    let next = null;
    if (e.key === "ArrowLeft") next = tr.children[idx - 1];
    else if (e.key === "ArrowRight") next = tr.children[idx + 1];
    else if (e.key === "ArrowUp") next = tr.previousElementSibling && tr.previousElementSibling.children[idx];
    else if (e.key === "ArrowDown") next = tr.nextElementSibling && tr.nextElementSibling.children[idx];
    else if (e.key === "Home") next = tr.children[1];
    else if (e.key === "End") next = tr.children[tr.children.length - 1];
    else if (e.key === "Enter" || e.key === " ") { selectColumn(Number(td.dataset.col)); e.preventDefault(); return; }
    else return;
    e.preventDefault();
    if (next && next.matches("td.cell")) moveFocus(next);
  }
  function hookGrid() {
    const body = $("grid-body");
    body.addEventListener("mouseover", (e) => { const td = e.target.closest("td.cell.filled"); if (td) showDetails(td); });
    body.addEventListener("focusin", (e) => { const td = e.target.closest("td.cell.filled"); if (td) showDetails(td); });
    body.addEventListener("click", (e) => { const td = e.target.closest("td.cell"); if (td) { moveFocus(td); selectColumn(Number(td.dataset.col)); } });
    body.addEventListener("keydown", onGridKey);
    $("metric").addEventListener("change", () => { st.metric = $("metric").value; repaint(); });
  }

  // ---- status --------------------------------------------------------------
  function status(text, state) { const s = $("status"); s.textContent = text; s.dataset.state = state; }
  function fail(msg) { $("error").textContent = msg; status("Stopped: " + msg, "error"); }

  // ---- static data (lens.html) --------------------------------------------
  function renderStatic(el) {
    const data = JSON.parse(el.textContent);
    $("gen-form").hidden = true;
    $("static-info").hidden = false;
    $("static-prompt").textContent = data.prompt || "";
    const lens = data.lens || {};
    st.nVocab = lens.n_vocab || 0;
    resetGrid(lens.layers || []);
    for (const t of data.tokens || []) st.inputs.set(t.pos, t.piece);
    for (const r of lens.rows || []) addRow(r);
    status(`${st.cols.length} positions × ${st.layers.length} layers (static file).`, "done");
  }

  // ---- live generation -----------------------------------------------------
  function headers() {
    const h = { "Content-Type": "application/json" };
    const k = $("api_key").value;
    if (k) h.Authorization = "Bearer " + k;
    return h;
  }
  async function postJson(path, body) {
    const r = await fetch(path, { method: "POST", headers: headers(), body: JSON.stringify(body) });
    const j = await r.json().catch(() => null);
    if (!r.ok) throw new Error((j && j.error && j.error.message) || `${path}: HTTP ${r.status}`);
    return j;
  }
  // "all" → null; "4..12" (12 excluded), "4..=12", "3,5,8" → [ids]
  function parseLayers(s) {
    s = s.trim();
    if (s === "" || s === "all") return null;
    const out = [];
    for (const part of s.split(",")) {
      const p = part.trim();
      let m;
      if ((m = /^(\d+)\.\.(=?)(\d+)$/.exec(p))) {
        const a = Number(m[1]), b = Number(m[3]) + (m[2] ? 1 : 0);
        if (b <= a) throw new Error(`layer range '${p}' is empty`);
        for (let i = a; i < b; i++) out.push(i);
      } else if (/^\d+$/.test(p)) out.push(Number(p));
      else throw new Error(`layers: '${p}' is not a layer number or range (e.g. 4..12, 4..=12, 3,5,8)`);
    }
    return out;
  }
  function num(id) { const v = $(id).value; return v === "" ? undefined : Number(v); }
  async function promptText() {
    const text = $("prompt").value;
    if (!document.querySelector("input[name=mode][value=chat]").checked) return text;
    const r = await postJson("/apply-template", { messages: [{ role: "user", content: text }] });
    return r.prompt;
  }
  function b64bytes(s) {
    const bin = atob(s), out = new Uint8Array(bin.length);
    for (let i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
    return out;
  }
  function keepLatents(obj) {
    for (const [name, t] of Object.entries(obj)) {
      let e = st.latents.get(name);
      if (!e) { e = { dtype: t.dtype, width: t.shape[1], parts: [], pos: [], step: [] }; st.latents.set(name, e); }
      e.parts.push(b64bytes(t.data));
      e.pos.push(...t.pos); e.step.push(...t.step);
    }
  }
  async function generate(ev) {
    ev.preventDefault();
    if (st.ctrl) return;
    $("error").textContent = "";
    let layers;
    try { layers = parseLayers($("layers").value); } catch (e) { fail(e.message); return; }
    const lens = { top_k: num("lens_top_k"), rows: $("rows").value };
    if (layers) lens.layers = layers;
    const req = {
      stream: true, lens, n_predict: num("n_predict"), temperature: num("temperature"),
      top_k: num("top_k"), top_p: num("top_p"), seed: num("seed"),
    };
    if ($("want_latents").checked) {
      req.latents = { tensors: "l_out-*", rows: $("rows").value };
      if (layers) req.latents.layers = layers.join(",");
    }
    st.latents = new Map();
    $("download").disabled = true;
    st.ctrl = new AbortController();
    $("generate").disabled = true; $("stop").disabled = false;
    const t0 = performance.now();
    let nTok = 0;
    try {
      status("Tokenizing…", "running");
      req.prompt = await promptText();
      st.prompt = req.prompt;
      const tk = await postJson("/tokenize", { content: req.prompt, add_special: true, with_pieces: true });
      resetGrid(layers || st.propsLayers || []);
      tk.tokens.forEach((t, i) => st.inputs.set(i, t.piece));
      const out = $("output");
      out.textContent = req.prompt;
      const gen = document.createElement("span");
      gen.className = "gen";
      out.appendChild(gen);
      status("Generating…", "running");
      const r = await fetch("/completion", { method: "POST", headers: headers(), body: JSON.stringify(req), signal: st.ctrl.signal });
      if (!r.ok) {
        const j = await r.json().catch(() => null);
        throw new Error((j && j.error && j.error.message) || `/completion: HTTP ${r.status}`);
      }
      const reader = r.body.getReader(), dec = new TextDecoder();
      let buf = "", first = true;
      const onEvent = (data) => {
        const o = JSON.parse(data);
        if (o.error) throw new Error(o.error.message || JSON.stringify(o.error));
        if (o.lens) {
          if (first) {
            first = false;
            if (o.lens.n_vocab) st.nVocab = o.lens.n_vocab;
            const same = o.lens.layers.length === st.layers.length && o.lens.layers.every((l, i) => l === st.layers[i]);
            if (!same) { const inputs = st.inputs; resetGrid(o.lens.layers); st.inputs = inputs; }
          }
          for (const row of o.lens.rows) addRow(row);
        }
        if (o.latents) keepLatents(o.latents);
        if (o.tokens && o.tokens.length) nTok += o.tokens.length;
        if (o.content) gen.textContent += o.content;
        status(`Generating… ${nTok} tokens, ${filledCount()} cells`, "running");
      };
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buf += dec.decode(value, { stream: true });
        let k;
        while ((k = buf.indexOf("\n\n")) >= 0) {
          const ev = buf.slice(0, k); buf = buf.slice(k + 2);
          for (const line of ev.split("\n")) if (line.startsWith("data: ")) onEvent(line.slice(6));
        }
      }
      const s = (performance.now() - t0) / 1000;
      status(`Done: ${nTok} tokens, ${st.cols.length} positions × ${st.layers.length} layers, ${filledCount()} cells in ${s.toFixed(2)} s.`, "done");
      $("download").disabled = st.latents.size === 0;
    } catch (e) {
      if (e.name === "AbortError") status(`Stopped after ${nTok} tokens.`, "done");
      else fail(e.message);
    } finally {
      st.ctrl = null;
      $("generate").disabled = false; $("stop").disabled = true;
    }
  }

  // ---- latents download: safetensors built here ----------------------------
  function safetensors() {
    const DT = { f32: ["F32", 4], f16: ["F16", 2], bf16: ["BF16", 2] };
    const header = {}, meta = { producer: "latent-tap view", prompt: st.prompt };
    const blobs = [];
    let off = 0;
    for (const [name, e] of st.latents) {
      const [dt, size] = DT[e.dtype] || ["F32", 4];
      const n = e.parts.reduce((a, p) => a + p.length, 0);
      header[name] = { dtype: dt, shape: [n / (size * e.width), e.width], data_offsets: [off, off + n] };
      blobs.push(...e.parts); off += n;
      meta["pos:" + name] = JSON.stringify(e.pos);
      meta["step:" + name] = JSON.stringify(e.step);
    }
    header.__metadata__ = meta;
    let h = JSON.stringify(header);
    const enc = new TextEncoder();
    let hb = enc.encode(h);
    const pad = (8 - (hb.length % 8)) % 8;
    if (pad) hb = enc.encode(h + " ".repeat(pad));
    const len = new Uint8Array(8);
    new DataView(len.buffer).setBigUint64(0, BigInt(hb.length), true);
    return new Blob([len, hb, ...blobs], { type: "application/octet-stream" });
  }
  function download() {
    const url = URL.createObjectURL(safetensors());
    const a = document.createElement("a");
    a.href = url; a.download = "latents.safetensors";
    document.body.appendChild(a); a.click(); a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 10000);
  }

  // ---- start ---------------------------------------------------------------
  async function loadProps() {
    try {
      const r = await fetch("/props", { headers: headers() });
      const p = await r.json();
      if (!r.ok) {
        const hint = r.status === 401 ? " (enter the server's API key under \u201cServer key\u201d)" : "";
        throw new Error(((p.error && p.error.message) || `HTTP ${r.status}`) + hint);
      }
      const lens = p.lens || {};
      const n = lens.n_layer || (p.latents && p.latents.n_layer) || 0;
      st.propsLayers = lens.layers || Array.from({ length: n }, (_, i) => i);
      $("model-line").textContent = `${p.model_alias || "model"} · ${n} layers${lens.available === false ? " · the lens is not available for this model" : ""}`;
      resetGrid(st.propsLayers);
    } catch (e) {
      $("model-line").textContent = "Server properties unavailable: " + e.message;
    }
  }
  function start() {
    hookGrid();
    updateLegend();
    const data = document.getElementById("lens-data");
    if (data) { renderStatic(data); return; }
    $("gen-form").addEventListener("submit", generate);
    $("stop").addEventListener("click", () => { if (st.ctrl) st.ctrl.abort(); });
    $("download").addEventListener("click", download);
    $("api_key").addEventListener("change", loadProps);
    loadProps();
  }
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
