// stimage-embed viewer: OpenSeadragon over the app's deep-zoom tiles, with a run's spots as
// an overlay tile layer. State lives in the URL (slide, run, gene, layer, sbs, viewport x/y/z).
"use strict";
(function () {
  const LABELS = {
    predicted: "predicted log1p(CP10k)",
    measured: "measured log1p(CP10k)",
    epistemic: "epistemic variance (counts\u00b2)",
    prob_high: "P(high)",
    leiden: "Leiden clusters",
    prob_class: "P(class)",
    label: "predicted class",
    observed_label: "observed class",
  };
  // the layers offered for a run of each kind (a label run's "genes" are its classes)
  const KIND_LAYERS = {
    expression: ["predicted", "measured", "epistemic", "prob_high", "leiden"],
    label: ["prob_class", "label", "observed_label"],
  };
  const SBS = { expression: ["predicted", "measured"], label: ["label", "observed_label"] };
  const S = { slide: null, run: null, gene: null, layer: "predicted", sbs: false, opacity: 0.8,
              slides: [], runs: [], values: null, info: null, spot: null, pendingView: null,
              pendingSpot: null, loading: 0, epoch: 0, leader: "a" };
  const $ = (id) => document.getElementById(id);
  const enc = encodeURIComponent;
  const viewers = {};
  let syncing = false;

  function api(url) {
    S.loading++;
    return fetch(url).then((r) => r.json().then((j) => {
      if (!r.ok) throw new Error(j.detail || r.statusText);
      return j;
    })).finally(() => { S.loading--; });
  }
  function status(msg) { $("status").textContent = msg || ""; }
  function fmt(v) { return v === null || v === undefined ? "\u2013" : (typeof v === "number" ? v.toFixed(3) : String(v)); }

  function makeViewer(key) {
    const v = OpenSeadragon({
      id: "view-" + key, prefixUrl: "/static/openseadragon/images/", drawer: "canvas",
      showNavigator: false, maxZoomPixelRatio: 4, animationTime: 0.4, imageLoaderLimit: 8,
      gestureSettingsMouse: { clickToZoom: false }, showRotationControl: false,
    });
    v.addHandler("canvas-click", (e) => { if (e.quick) onClick(key, e.position); });
    for (const ev of ["canvas-press", "canvas-scroll", "canvas-pinch"]) v.addHandler(ev, () => { S.leader = key; });
    v.addHandler("viewport-change", () => syncFrom(key));
    v.addHandler("animation-finish", () => { if (key === "a") writeUrl(); });
    viewers[key] = v;
    return v;
  }

  function tileSource(urlOf) {
    const i = S.info;
    return { width: i.width, height: i.height, tileSize: i.tile_size, tileOverlap: i.overlap,
             minLevel: 0, maxLevel: i.max_level, getTileUrl: urlOf };
  }
  function kind() { return S.values && S.values.kind === "label" ? "label" : "expression"; }
  function layerOf(key) { return key === "b" ? SBS[kind()][1] : (S.sbs ? SBS[kind()][0] : S.layer); }

  // the pane the user last touched leads; the other copies its centre and zoom (equal widths)
  function syncFrom(key) {
    if (syncing || !S.sbs || key !== S.leader) return;
    const other = viewers[key === "a" ? "b" : "a"];
    if (!other || !other.world.getItemCount()) return;
    syncing = true;
    const vp = viewers[key].viewport;
    other.viewport.zoomTo(vp.getZoom(), null, true);
    other.viewport.panTo(vp.getCenter(), true);
    syncing = false;
  }
  function applyView(p) {
    viewers.a.viewport.zoomTo(p.z, null, true);
    viewers.a.viewport.panTo(new OpenSeadragon.Point(p.x, p.y), true);
  }

  // ---- URL state ---------------------------------------------------------------------
  function readUrl() {
    const q = new URLSearchParams(location.search);
    S.slide = q.get("slide"); S.run = q.get("run"); S.gene = q.get("gene");
    S.layer = q.get("layer") || "predicted"; S.sbs = q.get("sbs") === "1";
    if (q.get("z")) S.pendingView = { x: +q.get("x"), y: +q.get("y"), z: +q.get("z") };
    S.pendingSpot = q.get("spot");
  }
  function writeUrl() {
    const q = new URLSearchParams();
    for (const k of ["slide", "run", "gene", "layer"]) if (S[k]) q.set(k, S[k]);
    if (S.sbs) q.set("sbs", "1");
    const vp = viewers.a && viewers.a.world.getItemCount() ? viewers.a.viewport : null;
    if (vp) {
      const c = vp.getCenter();
      q.set("x", c.x.toFixed(5)); q.set("y", c.y.toFixed(5)); q.set("z", vp.getZoom().toFixed(4));
    }
    history.replaceState(null, "", "?" + q.toString());
  }

  // ---- slides, runs, genes -----------------------------------------------------------
  function renderSlides() {
    const body = $("slides").tBodies[0];
    body.innerHTML = "";
    for (const s of S.slides) {
      const tr = body.insertRow();
      tr.dataset.slide = s.slide_id;
      for (const v of [s.slide_id, s.dataset, s.patient, s.has_counts ? "yes" : "no"]) tr.insertCell().textContent = v;
      tr.className = s.slide_id === S.slide ? "active" : "";
      tr.addEventListener("click", () => { S.slide = s.slide_id; S.pendingView = null; renderSlides(); chooseRun().then(openSlide); });
    }
  }
  function chooseRun() {
    const sel = $("run");
    const runs = S.runs.filter((r) => !S.slide || r.slides.includes(S.slide));
    sel.innerHTML = "";
    for (const r of runs) sel.add(new Option(`${r.head} \u00b7 ${r.backbone} \u00b7 ${r.gene_spec} \u00b7 ${r.run_id.slice(0, 8)}`, r.run_id));
    if (!runs.some((r) => r.run_id === S.run)) S.run = runs.length ? runs[0].run_id : null;
    sel.value = S.run || "";
    return loadGenes();
  }
  async function loadGenes() {
    const sel = $("gene");
    sel.innerHTML = "";
    if (!S.run) { S.values = null; return; }
    const run = S.runs.find((r) => r.run_id === S.run);
    $("gene-label").textContent = run && run.kind === "label" ? "Class" : "Gene";
    const g = await api(`/api/runs/${enc(S.run)}/genes`);
    for (const name of g.genes) sel.add(new Option(name, name));
    if (!g.genes.includes(S.gene)) S.gene = g.genes[0] || null;
    sel.value = S.gene || "";
  }

  // ---- the slide and its overlay -----------------------------------------------------
  async function openSlide() {
    if (!S.slide) return;
    status("");
    S.info = await api(`/api/slides/${enc(S.slide)}/tiles`);
    $("pane-b").hidden = !S.sbs;
    const keys = S.sbs ? ["a", "b"] : ["a"];
    const slide = S.slide;
    await Promise.all(keys.map((k) => new Promise((resolve) => {
      const v = viewers[k] || makeViewer(k);
      v.addOnceHandler("open", resolve);
      v.open(tileSource((l, x, y) => `/tiles/${enc(slide)}_files/${l}/${x}_${y}.jpeg`));
    })));
    const saved = S.pendingView;
    S.pendingView = null;
    S.leader = "a";
    if (saved) applyView(saved);
    syncFrom("a");
    const spot = S.pendingSpot;
    S.pendingSpot = null;
    await loadValues();
    if (saved) applyView(saved);  // again, once the page layout has settled
    else if (spot) await focusSpot(spot);  // a link to a spot (e.g. a similar spot)
    else fitSpots();
    syncFrom("a");
    writeUrl();
  }

  function fitSpots() {
    if (!S.values || !S.values.spots.length) return;
    const xs = S.values.spots.map((s) => s.pixel_x), ys = S.values.spots.map((s) => s.pixel_y);
    const m = S.values.radius_px * 3;
    const x0 = Math.min(...xs) - m, y0 = Math.min(...ys) - m;
    const item = viewers.a.world.getItemAt(0);
    viewers.a.viewport.fitBounds(item.imageToViewportRectangle(x0, y0, Math.max(...xs) + m - x0, Math.max(...ys) + m - y0), true);
    syncFrom("a");
  }

  async function loadValues() {
    S.values = null; S.spot = null;
    for (const [k, v] of Object.entries(viewers)) {
      const old = document.getElementById("ring-" + k);
      if (old) v.removeOverlay(old);
    }
    $("spot-info").textContent = "Click a spot."; $("similar").textContent = "";
    const epoch = ++S.epoch;
    if (S.run && S.gene && S.slide) {
      try {
        S.values = await api(`/api/runs/${enc(S.run)}/slides/${enc(S.slide)}/values?gene=${enc(S.gene)}`);
      } catch (err) { status(err.message); }
    }
    if (epoch !== S.epoch) return;
    if (S.values && !S.values.layers.includes(S.layer)) S.layer = S.values.layers[0] || S.layer;
    renderLayers(); renderLegend(); drawOverlays(); writeUrl();
  }

  function drawOverlays() {
    const keys = S.sbs ? ["a", "b"] : ["a"];
    for (const k of keys) {
      const v = viewers[k];
      while (v.world.getItemCount() > 1) v.world.removeItem(v.world.getItemAt(1));
      const layer = layerOf(k);
      $("title-" + k).textContent = `${S.slide} \u00b7 ${S.gene || ""} \u00b7 ${LABELS[layer]}`;
      if (!S.values || !S.values.layers.includes(layer)) continue;
      const base = `/overlay/${enc(S.run)}/${enc(S.slide)}/${layer}`;
      const q = `?gene=${enc(S.gene)}&e=${S.epoch}`;
      v.addTiledImage({ tileSource: tileSource((l, x, y) => `${base}/${l}/${x}_${y}.png${q}`), opacity: S.opacity });
    }
  }

  function renderLayers() {
    const box = $("layers");
    box.innerHTML = "";
    const have = S.values ? S.values.layers : [];
    for (const layer of KIND_LAYERS[kind()]) {
      const lab = document.createElement("label");
      const r = document.createElement("input");
      Object.assign(r, { type: "radio", name: "layer", value: layer, checked: layer === S.layer, disabled: !have.includes(layer) });
      r.addEventListener("change", () => { S.layer = layer; renderLegend(); drawOverlays(); writeUrl(); });
      lab.append(r, " " + LABELS[layer]);
      box.append(lab);
    }
  }

  function renderLegend() {
    const box = $("legend");
    box.innerHTML = "";
    const layer = layerOf("a");
    const lg = S.values && S.values.legend[layer];
    if (!lg) return;
    const title = document.createElement("div");
    const both = kind() === "label" ? "predicted and observed class, one palette" : "predicted and measured log1p(CP10k), one scale";
    title.textContent = S.sbs ? both : LABELS[layer];
    box.append(title);
    if (lg.labels) {
      lg.labels.forEach((name, i) => {
        const sw = document.createElement("span");
        sw.className = "swatch"; sw.style.background = lg.colors[i];
        box.append(sw, name);
      });
      return;
    }
    const c = document.createElement("canvas");
    c.width = lg.colors.length; c.height = 1;
    const ctx = c.getContext("2d");
    lg.colors.forEach((col, i) => { ctx.fillStyle = col; ctx.fillRect(i, 0, 1, 1); });
    const ticks = document.createElement("div");
    ticks.className = "ticks";
    ticks.innerHTML = `<span id="legend-lo">${fmt(lg.lo)}</span><span id="legend-hi">${fmt(lg.hi)}</span>`;
    box.append(c, ticks);
  }

  // ---- clicks ------------------------------------------------------------------------
  function nearestSpot(ix, iy) {
    if (!S.values) return null;
    let best = null, bestD = Infinity;
    for (const s of S.values.spots) {
      const d = Math.hypot(s.pixel_x - ix, s.pixel_y - iy);
      if (d < bestD) { bestD = d; best = s; }
    }
    return bestD <= S.values.radius_px ? best : null;
  }
  function onClick(key, pos) {
    const item = viewers[key].world.getItemAt(0);
    if (!item) return;
    const p = item.viewerElementToImageCoordinates(pos);
    const s = nearestSpot(p.x, p.y);
    if (s) showSpot(s);
  }
  function ring(s) {
    for (const [k, v] of Object.entries(viewers)) {
      const old = document.getElementById("ring-" + k);
      if (old) v.removeOverlay(old);
      const item = v.world.getItemAt(0);
      if (!item || (k === "b" && !S.sbs)) continue;
      const el = document.createElement("div");
      el.id = "ring-" + k; el.className = "ring";
      const r = S.values.radius_px * 1.25;
      v.addOverlay({ element: el, location: item.imageToViewportRectangle(s.pixel_x - r, s.pixel_y - r, 2 * r, 2 * r) });
    }
  }
  function showSpot(s) {
    S.spot = s.spot_id;
    ring(s);
    const rows = kind() === "label"
      ? [["spot", "spot_id"], [`P(${S.gene})`, "prob_class"], ["predicted class", "label"], ["observed class", "observed_label"]]
      : [["spot", "spot_id"], ["predicted", "predicted"], ["measured", "measured"],
         ["epistemic", "epistemic"], ["P(high)", "prob_high"], ["cluster", "cluster"]];
    const html = rows.map(([label, f]) =>
      `<tr><th>${label}</th><td data-field="${f}" data-value="${s[f] === null ? "" : s[f]}">${f === "spot_id" ? s[f] : fmt(s[f])}</td></tr>`);
    $("spot-info").innerHTML = `<table>${html.join("")}</table>`;
    loadSimilar(s.spot_id);
  }
  async function loadSimilar(spotId) {
    const box = $("similar");
    box.textContent = "";
    const r = await api(`/api/slides/${enc(S.slide)}/similar/${enc(spotId)}?k=5`).catch((err) => ({ error: err.message }));
    if (r.error) { box.textContent = `Similar spots: ${r.error}`; return; }
    if (!r.available) { box.textContent = "Similar spots: unavailable (no image vectors, or search not installed)."; return; }
    box.textContent = `Similar spots on other slides (${r.backbone}, cosine distance):`;
    for (const m of r.spots) {
      const q = new URLSearchParams({ slide: m.slide_id, spot: m.spot_id, run: S.run || "", gene: S.gene || "" });
      const a = document.createElement("a");
      a.href = "?" + q.toString();
      a.className = "similar";
      const img = document.createElement("img");
      img.alt = ""; img.src = `/thumb/${enc(m.slide_id)}/${enc(m.spot_id)}.jpeg`;
      a.append(img, `${m.slide_id} ${m.spot_id} (${fmt(m.distance)})`);
      box.append(a);
    }
  }
  async function focusSpot(spotId) {
    // a spot of the run's values, or (a slide the run did not predict) its centre from the store
    const s = S.values && S.values.spots.find((x) => x.spot_id === spotId);
    const at = s ? { ...s, radius_px: S.values.radius_px }
      : await api(`/api/slides/${enc(S.slide)}/spots/${enc(spotId)}`).catch((err) => { status(err.message); return null; });
    if (!at) return;
    const item = viewers.a.world.getItemAt(0);
    const r = at.radius_px * 6;
    viewers.a.viewport.fitBounds(item.imageToViewportRectangle(at.pixel_x - r, at.pixel_y - r, 2 * r, 2 * r), true);
    syncFrom("a");
    if (s) showSpot(s);
  }

  // ---- hooks for scripts and tests ---------------------------------------------------
  window.stviewer = {
    state: S,
    viewers,
    ready() {
      const keys = S.sbs ? ["a", "b"] : ["a"];
      if (S.loading || !S.info) return false;
      return keys.every((k) => {
        const w = viewers[k] && viewers[k].world;
        if (!w || !w.getItemCount()) return false;
        const want = S.values && S.values.layers.includes(layerOf(k)) ? 2 : 1;
        if (w.getItemCount() !== want) return false;
        for (let i = 0; i < w.getItemCount(); i++) if (!w.getItemAt(i).getFullyLoaded()) return false;
        return true;
      });
    },
    // CSS px of a spot centre relative to the top-left of viewer "a" (or "b")
    spotPoint(spotId, key) {
      const v = viewers[key || "a"], s = S.values.spots.find((x) => x.spot_id === spotId);
      const p = v.world.getItemAt(0).imageToViewerElementCoordinates(new OpenSeadragon.Point(s.pixel_x, s.pixel_y));
      return { x: p.x, y: p.y };
    },
  };

  // ---- wiring ------------------------------------------------------------------------
  $("run").addEventListener("change", async (e) => { S.run = e.target.value; await loadGenes(); loadValues(); });
  $("gene").addEventListener("change", (e) => { S.gene = e.target.value; loadValues(); });
  $("sbs").addEventListener("change", (e) => { S.sbs = e.target.checked; S.pendingView = null; openSlide(); });
  $("opacity").addEventListener("input", (e) => {
    S.opacity = e.target.value / 100;
    for (const v of Object.values(viewers)) if (v.world.getItemCount() > 1) v.world.getItemAt(1).setOpacity(S.opacity);
  });

  async function start() {
    readUrl();
    $("sbs").checked = S.sbs;
    [S.slides, S.runs] = await Promise.all([api("/api/slides"), api("/api/runs")]);
    if (!S.slide || !S.slides.some((s) => s.slide_id === S.slide)) {
      const predicted = S.runs.length ? S.runs[0].slides : [];
      S.slide = (S.slides.find((s) => predicted.includes(s.slide_id)) || S.slides[0] || {}).slide_id || null;
    }
    renderSlides();
    await chooseRun();
    if (!S.slide) { status("The store has no slides (run `stimage-embed ingest`)."); return; }
    await openSlide();
  }
  start().catch((err) => status(err.message));
})();
