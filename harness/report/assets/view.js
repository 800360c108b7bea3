// The results viewer's pages, drawn from window.HARNESS (the page's data script, written by
// harness/report/site.py). Plain DOM and hand-drawn SVG: no framework, no build step, no fetch(),
// so every page opens from disk. Element ids and attributes are the contract tests/test_view.py
// selects with (see harness/report/site.py); keep them stable.
"use strict";
(function () {
  const D = window.HARNESS || {};
  const ROOT = document.body.dataset.root || "";
  const main = document.getElementById("main");
  const SVG = "http://www.w3.org/2000/svg";

  function el(tag, attrs, ...children) {
    const node = tag.startsWith("svg:") ? document.createElementNS(SVG, tag.slice(4)) : document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "text") node.textContent = v;
      else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
      else node.setAttribute(k, v);
    }
    for (const c of children) if (c !== null && c !== undefined) node.append(c);
    return node;
  }
  const fmt = (x, digits = 4) => (x === null || x === undefined) ? "—" :
    (typeof x === "number" ? (Number.isInteger(x) ? x.toLocaleString("en-US") : x.toFixed(digits)) : String(x));
  const show = (x) => (x === null || x === undefined) ? "" : (typeof x === "string" ? x : JSON.stringify(x));
  const section = (title, ...body) => el("section", {}, el("h2", { text: title }), ...body);
  const link = (href, text) => el("a", { href: ROOT + href, text });

  // --- charts ------------------------------------------------------------------------------------
  // Four significant digits: a learning rate of 1e-5 must not print as 0.000.
  const axisLabel = (y) => (y === 0 ? "0" : Number(y.toPrecision(4)).toString());

  function lineChart(id, series, title) {
    const names = Object.keys(series).filter((k) => series[k].length);
    const W = 640, H = 240, P = 40;
    const svg = el("svg:svg", { id, width: W, height: H, viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": title });
    const pts = names.flatMap((n) => series[n]);
    if (!pts.length) return svg;
    const xs = pts.map((p) => p[0]), ys = pts.map((p) => p[1]);
    const [x0, x1, y0, y1] = [Math.min(...xs), Math.max(...xs), Math.min(...ys), Math.max(...ys)];
    const sx = (x) => P + (W - 2 * P) * (x1 > x0 ? (x - x0) / (x1 - x0) : 0.5);
    const sy = (y) => H - P - (H - 2 * P) * (y1 > y0 ? (y - y0) / (y1 - y0) : 0.5);
    svg.append(el("svg:line", { x1: P, y1: H - P, x2: W - P, y2: H - P, class: "axis" }),
      el("svg:line", { x1: P, y1: P, x2: P, y2: H - P, class: "axis" }),
      el("svg:text", { x: P - 4, y: P + 4, "text-anchor": "end", text: axisLabel(y1) }),
      el("svg:text", { x: P - 4, y: H - P, "text-anchor": "end", text: axisLabel(y0) }),
      el("svg:text", { x: P, y: H - P + 16, text: `step ${x0}` }),
      el("svg:text", { x: W - P, y: H - P + 16, "text-anchor": "end", text: `${x1}` }));
    names.forEach((n, i) => {
      svg.append(el("svg:polyline", { "data-series": n, class: `series s${i}`, fill: "none",
        points: series[n].map((p) => `${sx(p[0]).toFixed(1)},${sy(p[1]).toFixed(1)}`).join(" ") }));
      svg.append(el("svg:text", { x: W - P, y: P + 14 * i, "text-anchor": "end", class: `legend s${i}`, text: n }));
    });
    return svg;
  }

  function llBars(row) {
    const W = 220, bar = 12, gap = 3, label = 70, H = row.ll.length * (bar + gap);
    const svg = el("svg:svg", { class: "ll-bars", width: W, height: H, viewBox: `0 0 ${W} ${H}` });
    const hi = Math.max(...row.ll), odds = row.ll.map((v) => Math.exp(v - hi)), total = odds.reduce((a, b) => a + b, 0);
    row.ll.forEach((v, i) => {   // bar length: the choice's share of the probability the choices got
      const width = 1 + (W - label - 8) * odds[i] / total;
      const cls = ["bar", i === row.pred_index ? "pred" : "", i === row.target_index ? "gold" : ""].join(" ").trim();
      const r = el("svg:rect", { x: label, y: i * (bar + gap), width: width.toFixed(1), height: bar, class: cls,
        "data-choice": i });
      r.append(el("svg:title", { text: `${row.choices[i]}: log-likelihood ${v.toFixed(3)}, ${(100 * odds[i] / total).toFixed(1)}% of the choices' probability` }));
      svg.append(r, el("svg:text", { x: label - 4, y: i * (bar + gap) + bar - 2, "text-anchor": "end",
        text: `${String(row.choices[i]).trim().slice(0, 9)} ${v.toFixed(1)}` }));
    });
    return svg;
  }

  // --- index -------------------------------------------------------------------------------------
  function leaderboardTable(lb) {
    const headers = ["model", ...lb.info, ...lb.columns];
    const table = el("table", { id: "leaderboard" });
    const tbody = el("tbody");
    const rows = lb.rows.map((r) => {
      const tr = el("tr", { "data-model": r.model }, el("th", { scope: "row", text: r.model }),
        ...r.info.map((v) => el("td", { class: "info", text: v })));
      r.cells.forEach((c) => tr.append(!c ? el("td", { class: "num", text: "—" }) :
        el("td", { class: "num", "data-run": c.run }, c.page ? link(`runs/${c.page}.html`, c.text) : c.text)));
      return { tr, keys: [r.model, ...r.info, ...r.cells.map((c) => (c ? c.value : null))] };
    });
    const ths = headers.map((h, i) => el("th", { "data-column": h, scope: "col", tabindex: 0, text: h,
      onclick: () => sortBy(i) }));
    function sortBy(i) {
      const th = ths[i], dir = th.getAttribute("aria-sort") === "ascending" ? -1 : 1;
      ths.forEach((t) => t.removeAttribute("aria-sort"));
      th.setAttribute("aria-sort", dir === 1 ? "ascending" : "descending");
      rows.sort((a, b) => {
        const x = a.keys[i], y = b.keys[i];
        if (x === null || y === null) return (x === null) - (y === null);   // empty cells last
        return dir * (typeof x === "number" ? x - y : String(x).localeCompare(String(y)));
      });
      rows.forEach((r) => tbody.append(r.tr));
    }
    rows.forEach((r) => tbody.append(r.tr));
    table.append(el("thead", {}, el("tr", {}, ...ths)), tbody);
    const filter = el("input", { id: "leaderboard-filter", type: "search", placeholder: "filter rows…",
      oninput: () => { const q = filter.value.toLowerCase();
        rows.forEach((r) => { r.tr.hidden = !r.tr.textContent.toLowerCase().includes(q); }); } });
    return [filter, el("div", { class: "scroll" }, table)];
  }

  function notes(text) {   // the Markdown renderer's notes: paragraphs, "- " lists and `code`
    const box = el("div", { id: "notes" });
    let list = null;
    for (const line of text.split("\n")) {
      if (!line.trim()) { list = null; continue; }
      const target = line.startsWith("- ") ? (list = list || box.appendChild(el("ul"))).appendChild(el("li")) :
        box.appendChild(el("p"));
      line.replace(/^- /, "").split("`").forEach((part, i) => target.append(i % 2 ? el("code", { text: part }) : part));
      if (!line.startsWith("- ")) list = null;
    }
    return box;
  }

  function index() {
    if (D.leaderboard) main.append(section("Leaderboard", el("p", { class: "source", text: `from ${D.leaderboard.path}` }),
      ...leaderboardTable(D.leaderboard), notes(D.leaderboard.notes)));
    else main.append(section("Leaderboard", el("p", { text: "No leaderboard CSV was found; the runs follow." })));
    main.append(section("Eval runs", el("ul", { id: "runs" }, ...D.runs.map((r) => el("li", {},
      link(`runs/${r.page}.html`, r.id), ` ${r.model || "?"} · ${r.task || "?"} · ${r.metric || ""} ${fmt(r.value)} · ${fmt(r.n)} samples`)))));
    main.append(section("Comparisons", el("ul", { id: "comparisons" }, ...D.comparisons.map((c) => el("li", {},
      link(`compare/${c.page}.html`, `${c.model_a} vs ${c.model_b}`), ` ${c.task} · ${c.a} → ${c.b}`)))));
    main.append(section("Training runs", el("ul", { id: "trainings" }, ...D.trainings.map((t) => el("li", {},
      link(`train/${t.page}.html`, t.id), ` ${t.recipe || ""}`)))));
  }

  // --- run page ----------------------------------------------------------------------------------
  function metaList(id, pairs) {
    return el("dl", { id }, ...pairs.filter(([, v]) => v !== undefined && v !== null && v !== "")
      .flatMap(([k, v]) => [el("dt", { text: k }), el("dd", { text: show(v) })]));
  }

  function runPage() {
    const k = D.key || {};
    const meta = metaList("run-meta", [["run id", D.run_id], ["model", k.model], ["task", k.task],
      ["task version", k.task_version], ["checkpoint sha", k.checkpoint_sha], ["seed", k.seed],
      ["dtype / device", [k.dtype, k.device].filter(Boolean).join(" / ")],
      ["scoring time", D.scoring_s != null ? `${fmt(D.scoring_s, 1)} s` : null],
      ["appended to", Object.entries(D.appended || {}).map(([p, t]) => `${p} at ${t}`).join("; ")], ["folder", D.path]]);
    if (D.config) meta.append(el("dt", { text: "config" }), el("dd", {}, el("details", {},
      el("summary", { text: ".hydra/config.yaml" }), el("pre", { text: D.config }))));
    main.append(section("Run", meta));
    main.append(section("Metrics", el("div", { class: "scroll tall" }, el("table", { id: "metrics" },
      el("thead", {}, el("tr", {}, ...["metric", "value", "stderr", "95% interval", "n", "n_unscored"].map((h) => el("th", { text: h })))),
      el("tbody", {}, ...D.metrics.map((m) => el("tr", { "data-metric": m.metric }, el("td", { text: m.metric }),
        el("td", { class: "num", text: fmt(m.value) }), el("td", { class: "num", text: fmt(m.stderr) }),
        el("td", { class: "num", text: m.low != null ? `[${fmt(m.low)}, ${fmt(m.high)}]` : "—" }),
        el("td", { class: "num", text: fmt(m.n) }), el("td", { class: "num", text: fmt(m.n_unscored) }))))))));
    main.append(section("Compared with", el("ul", { id: "compare-with" }, ...D.compare_with.map((c) =>
      el("li", {}, link(`compare/${c.page}.html`, `vs ${c.other}`)))),
      D.compare_with.length ? null : el("p", { text: "No other run in the site scored these samples." })));
    const subjects = Object.entries(D.subjects);
    if (subjects.length) main.append(section(`Per-subject ${D.primary}${D.binary ? " (%)" : ""}`, el("div", { class: "scroll tall" },
      subjectChart("subject-scores", subjects.map(([subject, value]) => ({ subject, value, title: `${subject}: ${fmt(value)}` })),
        false, D.binary ? 100 : 1, D.binary ? 1 : null))));
    main.append(samples());
  }

  function samples() {
    const all = D.samples, prefixes = D.prefixes || [], primary = D.primary;
    const prompt = (s) => s.prompt === undefined ? "" : (s.prefix !== undefined ? prefixes[s.prefix] : "") + s.prompt;
    const promptCell = (s) => {   // the shared few-shot context folded away, the sample's own part shown
      const cell = el("td", { class: "prompt" });
      if (s.prefix !== undefined) cell.append(el("details", { class: "context" },
        el("summary", { text: `shared context (${prefixes[s.prefix].length.toLocaleString("en-US")} characters)` }),
        el("pre", { text: prefixes[s.prefix] })));
      cell.append(el("pre", { text: s.prompt === undefined ? "(not recorded)" : s.prompt }));
      return cell;
    };
    const unscored = (s) => Object.values(s.scores).every((v) => v === null);
    const tests = { all: () => true, unscored, correct: (s) => s.scores[primary] === 1, incorrect: (s) => s.scores[primary] === 0 };
    let haystacks = null;   // lower-cased searchable text, built on the first search only
    let shown = all, page = 0;
    const search = el("input", { id: "sample-search", type: "search", placeholder: "search id, prompt, prediction, target…" });
    const filter = el("select", { id: "sample-filter" }, ...["all", "correct", "incorrect", "unscored"].map((o) =>
      el("option", { value: o, text: o, disabled: (o === "correct" || o === "incorrect") && !D.binary })));
    const size = el("select", { id: "page-size" }, ...[25, 50, 100, 500].map((n) => el("option", { value: n, text: n, selected: n === 50 })));
    const count = el("span", { id: "sample-count" }), info = el("span", { id: "page-info" });
    const prev = el("button", { id: "prev-page", type: "button", text: "‹ prev" });
    const next = el("button", { id: "next-page", type: "button", text: "next ›" });
    const tbody = el("tbody");
    const table = el("table", { id: "samples" }, el("thead", {}, el("tr", {}, ...["sample", "prompt", "target",
      "prediction", "scores"].map((h) => el("th", { text: h })))), tbody);

    function apply() {
      const q = search.value.trim().toLowerCase(), test = tests[filter.value];
      if (q && !haystacks) haystacks = all.map((s) => [s.id, prompt(s), show(s.prediction), show(s.target)].join("\n").toLowerCase());
      shown = [];
      for (let i = 0; i < all.length; i++) if (test(all[i]) && (!q || haystacks[i].includes(q))) shown.push(all[i]);
      count.dataset.count = shown.length;
      count.textContent = `${shown.length.toLocaleString("en-US")} samples`;
      page = 0;
      draw();
    }
    function draw() {
      const n = Number(size.value), pages = Math.max(1, Math.ceil(shown.length / n));
      page = Math.min(page, pages - 1);
      const first = page * n, rows = shown.slice(first, first + n);
      tbody.replaceChildren(...rows.map(sampleRow));
      info.textContent = shown.length ? `${(first + 1).toLocaleString("en-US")}–${(first + rows.length).toLocaleString("en-US")} of ${shown.length.toLocaleString("en-US")}` : "0 of 0";
      prev.disabled = page === 0;
      next.disabled = page >= pages - 1;
    }
    function sampleRow(s) {
      const pred = el("td", { class: "prediction" }, el("pre", { text: show(s.prediction) }));
      if (s.ll) pred.append(llBars(s));
      const said = s.judge && s.judge.replies.length ? s.judge.replies[0].replace(/\s+/g, " ") : "";
      if (s.judge) pred.append(el("details", { class: "judge" },
        el("summary", { text: `judge: ${said.length > 60 ? said.slice(0, 60) + "…" : said || "(no reply)"}` }),
        el("h4", { text: "judge prompt" }), el("pre", { class: "judge-prompt", text: s.judge.prompt || "(not recorded)" }),
        el("h4", { text: "judge reply" }), ...s.judge.replies.map((r) => el("pre", { class: "judge-reply", text: r }))));
      const scores = el("td", { class: "scores" }, ...Object.entries(s.scores).map(([k, v]) => el("div", { text: `${k}: ${fmt(v)}` })));
      if (s.more) scores.append(el("details", {}, el("summary", { text: "more" }), el("pre", { text: JSON.stringify(s.more, null, 1) })));
      const state = unscored(s) ? "unscored" : (D.binary ? (s.scores[primary] === 1 ? "correct" : "incorrect") : "");
      return el("tr", { "data-sample-id": s.id, class: state }, el("td", { class: "id", text: s.id }), promptCell(s),
        el("td", { class: "target" }, el("pre", { text: show(s.target) })), pred, scores);
    }
    search.addEventListener("input", apply);
    filter.addEventListener("change", apply);
    size.addEventListener("change", () => { page = 0; draw(); });
    prev.addEventListener("click", () => { page--; draw(); });
    next.addEventListener("click", () => { page++; draw(); });
    apply();
    return section("Samples", el("div", { class: "controls" }, search, filter, count, " · page size ", size, prev, info, next),
      el("div", { class: "scroll" }, table));
  }

  // --- comparison page ---------------------------------------------------------------------------
  // One bar per subject: accuracy on a run page, a − b (centred on 0) on a comparison page.
  function subjectChart(id, rows, signed, scale, full) {   // full: the value of a whole-width bar (default: the largest)
    const bar = 14, gap = 3, W = 640, label = 220, room = W - label - 50;
    const zero = signed ? label + room / 2 + 25 : label;
    const svg = el("svg:svg", { id, width: W, height: rows.length * (bar + gap) + 4 });
    const most = full || Math.max(...rows.map((r) => Math.abs(r.value)), 1e-9);
    rows.forEach((r, i) => {
      const w = (signed ? room / 2 : room) * Math.abs(r.value) / most, y = i * (bar + gap), neg = r.value < 0;
      const rect = el("svg:rect", { "data-subject": r.subject, x: (neg ? zero - w : zero).toFixed(1), y, height: bar,
        width: Math.max(w, 1).toFixed(1), class: signed ? (neg ? "neg" : "pos") : "plain" });
      rect.append(el("svg:title", { text: r.title }));
      const text = (signed && r.value >= 0 ? "+" : "") + (scale * r.value).toFixed(1);
      svg.append(rect, el("svg:text", { x: label - 6, y: y + bar - 3, "text-anchor": "end", text: r.subject }),
        el("svg:text", { x: neg ? zero - w - 4 : zero + w + 4, y: y + bar - 3, "text-anchor": neg ? "end" : "start", text }));
    });
    svg.append(el("svg:line", { x1: zero, x2: zero, y1: 0, y2: rows.length * (bar + gap), class: "axis" }));
    return svg;
  }

  function comparePage() {
    main.append(section("Comparison", el("p", {}, "a: ", link(`runs/${D.page_a}.html`, `${D.model_a} (${D.a})`), " · b: ",
      link(`runs/${D.page_b}.html`, `${D.model_b} (${D.b})`)), el("pre", { id: "compare-report", text: D.report })));
    const scale = D.binary ? 100 : 1;
    if (D.subjects.length) main.append(section(`Per-subject ${D.metric}, a − b${D.binary ? " (points)" : ""}`,
      subjectChart("subject-diff", D.subjects.map((s) => ({ subject: s.subject, value: s.diff,
        title: `${s.subject}: a ${fmt(s.a)}, b ${fmt(s.b)}, a − b ${fmt(s.diff)}` })), true, scale)));
    main.append(section(`Discordant samples (${D.discordant.length})`, el("table", { id: "discordant" },
      el("thead", {}, el("tr", {}, ...["sample", "target", `a: ${D.model_a}`, `b: ${D.model_b}`].map((h) => el("th", { text: h })))),
      el("tbody", {}, ...D.discordant.map((d) => el("tr", { "data-sample-id": d.id }, el("td", { text: d.id }),
        el("td", { class: "target", text: show(d.target) }),
        el("td", { class: d.a > d.b ? "better" : "worse" }, el("pre", { text: show(d.prediction_a) }), `${D.metric} ${fmt(d.a)}`),
        el("td", { class: d.b > d.a ? "better" : "worse" }, el("pre", { text: show(d.prediction_b) }), `${D.metric} ${fmt(d.b)}`)))))));
  }

  // --- training page -----------------------------------------------------------------------------
  function trainPage() {
    const m = D.meta || {}, last = D.last || {};
    const meta = metaList("train-meta", [["id", D.id], ["recipe", m.recipe], ["seed", m.seed], ["steps", m.steps],
      ["params", m.n_params], ["tokens seen", m.tokens ?? last.tokens_seen],
      ["final train loss", last.train_loss ?? m.train_loss], ["final val loss", m.val_loss ?? last.val_loss],
      ["model config", D.model], ["folder", D.path]]);
    meta.append(el("dt", { text: "data files" }), el("dd", {}, el("ul", {}, ...D.files.map(([p, sha]) =>
      el("li", {}, el("code", { text: p || "(not found)" }), ` sha256 ${sha}`)))));
    meta.append(el("dt", { text: "provenance" }), el("dd", {}, el("details", {}, el("summary", { text: "provenance.json (without parent)" }),
      el("pre", { text: JSON.stringify({ ...m, config: D.config }, null, 1) }))));
    main.append(section("Training run", meta));
    main.append(section("Loss", lineChart("loss-chart", { train_loss: D.series.train_loss, val_loss: D.series.val_loss }, "loss")));
    main.append(section("Learning rate", lineChart("lr-chart", { lr: D.series.lr }, "learning rate")));
    main.append(section("Lineage (this checkpoint first)", el("ol", { id: "lineage" }, ...D.lineage.map((s) =>
      el("li", {}, s.page ? link(`train/${s.page}.html`, s.label) : s.label, s.id && s.id !== s.label ? ` (${s.id})` : "")))));
  }

  ({ index, run: runPage, compare: comparePage, train: trainPage })[document.body.dataset.page]();
})();
