// The pylandmark web page: pick or drop a photo, POST it to /recognize or /search, show the answer.
"use strict";
(() => {
  const $ = (id) => document.getElementById(id);
  const drop = $("drop"), fileInput = $("file"), preview = $("preview"), hint = $("hint");
  const statusBox = $("status"), answer = $("answer"), grid = $("neighbours");
  let current = null;   // the File being shown
  let seq = 0;          // ignores answers to requests superseded by a newer one
  let previewUrl = null;

  function setStatus(text, kind) {
    statusBox.textContent = text;
    statusBox.className = "status" + (kind ? " " + kind : "");
  }

  async function loadInfo() {
    try {
      const res = await fetch("/info");
      const info = await res.json();
      if (!res.ok) throw new Error(info.error || res.statusText);
      const idx = info.index, net = info.network;
      const parts = [`${idx.count.toLocaleString()} indexed photos`];
      if (idx.labelled) parts.push(`${idx.classes} landmarks`);
      parts.push(`network ${net.weights} on ${net.device}`, `image size ${net.image_size}`);
      $("facts").textContent = parts.join(" · ");
      $("k").max = String(info.limits.max_k);
      if (!idx.labelled) { $("mode").value = "search"; $("mode").querySelector("[value=recognize]").disabled = true; }
      syncMode();
    } catch (err) {
      $("facts").textContent = "service unreachable: " + err.message;
    }
  }

  function syncMode() {
    document.body.classList.toggle("search-mode", $("mode").value === "search");
  }

  function pick(file) {
    if (!file) return;
    current = file;
    if (previewUrl) URL.revokeObjectURL(previewUrl);
    previewUrl = URL.createObjectURL(file);
    preview.src = previewUrl;
    preview.hidden = false;
    hint.hidden = true;
    drop.classList.add("has-image");
    $("qname").textContent = file.name;
    run();
  }

  async function run() {
    if (!current) return;
    const mine = ++seq;
    const mode = $("mode").value;
    const params = new URLSearchParams({ k: $("k").value || "5" });
    if (mode === "recognize") {
      params.set("vote", $("vote").value);
      if ($("minscore").value !== "") params.set("min_score", $("minscore").value);
    }
    const body = new FormData();
    body.append("image", current, current.name || "photo");
    setStatus(mode === "recognize" ? "Recognising…" : "Searching…", "busy");
    let res, data;
    const t0 = performance.now();
    try {
      res = await fetch(`/${mode}?${params}`, { method: "POST", body });
      data = await res.json();
    } catch (err) {
      if (mine === seq) setStatus("The service did not answer: " + err.message, "error");
      return;
    }
    if (mine !== seq) return;
    if (!res.ok) {
      answer.hidden = true; grid.replaceChildren(); $("nbtitle").hidden = true;
      setStatus(data.error || `error ${res.status}`, "error");
      return;
    }
    const ms = Math.round(performance.now() - t0);
    render(data[0], mode);
    setStatus(`Answered in ${ms} ms.`);
  }

  function render(r, mode) {
    const rec = mode === "recognize";
    answer.hidden = false;
    $("eyebrow").textContent = rec ? "Landmark" : "Nearest landmark";
    const label = rec ? r.label : (r.neighbours.length ? r.neighbours[0].label : null);
    $("label").textContent = label === null || label === undefined ? "—" : String(label);
    $("label").classList.toggle("unknown", rec && !r.known);
    const conf = rec ? r.confidence : (r.neighbours.length ? r.neighbours[0].score : 0);
    $("meter").style.width = `${Math.max(0, Math.min(1, conf)) * 100}%`;
    $("conf").textContent = rec
      ? `confidence ${conf.toFixed(2)} · ${r.votes} of ${r.neighbours.length} neighbours agree` + (r.known ? "" : " · below the minimum score")
      : `best similarity ${conf.toFixed(4)}`;
    $("nbtitle").hidden = r.neighbours.length === 0;
    grid.replaceChildren(...r.neighbours.map((h, i) => tile(h, i, rec && r.known ? r.label : undefined)));
  }

  function tile(h, i, winner) {
    const li = document.createElement("li");
    li.className = "hit" + (winner !== undefined && h.label === winner ? " voted" : "");
    li.dataset.id = String(h.id);
    const frame = document.createElement("div");
    frame.className = "frame";
    const img = document.createElement("img");
    img.alt = h.label === null ? `photo ${h.id}` : String(h.label);
    img.loading = "lazy";
    img.src = `/images/${encodeURIComponent(h.id)}?size=256`;
    img.addEventListener("error", () => li.classList.add("broken"));
    frame.append(img);
    const cap = document.createElement("figcaption");
    const left = document.createElement("span");
    const rank = document.createElement("span");
    rank.className = "rank"; rank.textContent = `${h.rank || i + 1}.`;
    const score = document.createElement("span");
    score.className = "score"; score.textContent = h.score.toFixed(4);
    left.append(rank, score);
    const lab = document.createElement("span");
    lab.className = "lab"; lab.textContent = h.label === null ? "" : String(h.label);
    lab.title = h.path || "";
    cap.append(left, lab);
    const fig = document.createElement("figure");
    fig.append(frame, cap);
    li.append(fig);
    return li;
  }

  fileInput.addEventListener("change", () => pick(fileInput.files[0]));
  ["dragenter", "dragover"].forEach((t) => drop.addEventListener(t, (e) => { e.preventDefault(); drop.classList.add("over"); }));
  ["dragleave", "drop"].forEach((t) => drop.addEventListener(t, (e) => { e.preventDefault(); drop.classList.remove("over"); }));
  drop.addEventListener("drop", (e) => pick(e.dataTransfer.files[0]));
  $("mode").addEventListener("change", () => { syncMode(); run(); });
  ["k", "vote", "minscore"].forEach((id) => $(id).addEventListener("change", run));
  loadInfo();
})();
