// The feature browser's only script. Corpus text arrives as JSON in <script type="application/json">
// and enters the DOM through textContent (never innerHTML), so it always shows as inert text.
(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("data").textContent);

  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }
  function fmt(x, digits) {
    if (x === null || x === undefined || typeof x !== "number") return "-";
    if (x === 0) return "0";
    var a = Math.abs(x);
    if (a < 1e-3 || a >= 1e4) return x.toExponential(digits === undefined ? 2 : digits - 1);
    return x.toPrecision(digits === undefined ? 3 : digits).replace(/\.?0+$/, "");
  }
  function side(s) { return s === "neg" ? "negative" : "positive"; }
  function stat(x) {
    if (!x || typeof x.mean !== "number") return "-";
    return fmt(x.mean, 3) + (x.ci95 ? " [" + fmt(x.ci95[0], 2) + ", " + fmt(x.ci95[1], 2) + "]" : "");
  }
  function typing(ev) {
    var t = ev.target;
    return t && (t.tagName === "INPUT" || t.tagName === "SELECT" || t.tagName === "TEXTAREA");
  }

  // ---- index ----------------------------------------------------------------------------------
  function index() {
    // one array per unit, its slots named by data.columns (tools.html.site.IndexRow)
    var rows = data.rows;
    var C = {};  // column name -> slot of an index row (data.columns)
    data.columns.forEach(function (n, i) { C[n] = i; });
    var view = rows.slice();
    var sortCol = C.unit, sortDir = 1, page = 0;
    var q = {search: "", klass: "all", dmin: null, dmax: null, size: 100};
    var unitWord = data.unit === "neuron" ? "neurons" : "features";
    var layerWord = data.layer === null || data.layer === undefined ? "" : ", layer " + data.layer;
    document.getElementById("summary").textContent =
      data.n_units + " " + unitWord + " (" + data.alive + " alive, " + data.dead + " dead)" + layerWord +
      (data.negative_side ? ", both signs" : "") + ", over " +
      (data.tokens_scanned || 0).toLocaleString("en") + " tokens of the " + (data.split || "?") + " split; " +
      data.described + " described. Ultra-low density: below " + data.ultra_low + ".";
    var dict = data.dictionary, prov = document.getElementById("provenance");
    if (prov && (dict || data.hook_name)) {
      var parts = [];
      if (dict) {
        parts.push("Dictionary: " + (dict.source || "?") + " (" + (dict.format || "?") + ", " +
          (dict.architecture || "?") + ", sha256 " + String(dict.sha256 || "?").slice(0, 12) + "…)" +
          (dict.model_name ? ", trained on " + dict.model_name : ""));
        parts.push("hook " + dict.hook_in + (dict.hook_out && dict.hook_out !== dict.hook_in ? " → " + dict.hook_out : ""));
      } else {
        parts.push("hook " + data.hook_name);
      }
      if (data.logit_effects) parts.push("logit effects: " + data.logit_effects);
      prov.textContent = parts.join(" · ") + ".";
      prov.hidden = false;
    }
    if (data.negative_side) document.querySelector('th button[data-sort="max_act"]').textContent = "max / min act";
    document.getElementById("dead-note").textContent = data.dead + " dead units are not in the histogram.";
    var mt = document.querySelector("#metrics tbody");
    var keys = Object.keys(data.sae_metrics || {});
    if (!keys.length) mt.appendChild(el("tr")).appendChild(el("td", "muted", "none (neurons or no metrics)"));
    keys.forEach(function (k) {
      var tr = el("tr");
      tr.appendChild(el("th", null, k));
      tr.appendChild(el("td", "num", fmt(data.sae_metrics[k], 4)));
      mt.appendChild(tr);
    });

    var runs = data.runs || [], rb = document.querySelector("#runs tbody");
    document.getElementById("runs-section").hidden = !runs.length;
    runs.forEach(function (r) {
      var tr = el("tr"), c = r.controls || {};
      tr.appendChild(el("th", null, r.run)).scope = "row";
      tr.appendChild(el("td", "side " + r.side, side(r.side)));
      tr.appendChild(el("td", null, r.explainer));
      tr.appendChild(el("td", null, r.simulator + (r.modes ? ", " + r.modes : "")));
      tr.appendChild(el("td", "num", r.described + " of " + r.units + (r.failed ? ", " + r.failed + " failed" : "") +
        (r.skipped ? ", " + r.skipped + " skipped" : "") + (r.complete ? "" : " (incomplete)")));
      tr.appendChild(el("td", "num", stat(r.scores.simulation_all)));
      tr.appendChild(el("td", "num", stat((c.random_description || {}).simulation_all)));
      tr.appendChild(el("td", "num", stat((c.shuffled_tokens || {}).simulation_all)));
      tr.appendChild(el("td", "num", stat(r.scores.detection_auc)));
      rb.appendChild(tr);
    });

    function chips(list) {
      var td = el("td", "toks");
      list.forEach(function (t) { td.appendChild(el("span", "chip", t)); });
      return td;
    }
    function klassOf(r) {
      if (r[C.density] <= 0) return "dead";
      return r[C.density] < data.ultra_low ? "ultralow" : "alive";
    }
    function apply() {
      var s = q.search.toLowerCase();
      view = rows.filter(function (r) {
        var k = klassOf(r);
        if (q.klass === "dead" && k !== "dead") return false;
        if (q.klass === "alive" && k === "dead") return false;
        if (q.klass === "ultralow" && k !== "ultralow") return false;
        if (q.klass === "several" && !r[C.other_runs].length) return false;
        var ld = r[C.density] > 0 ? Math.log10(r[C.density]) : -Infinity;
        if (q.dmin !== null && ld < q.dmin) return false;
        if (q.dmax !== null && ld > q.dmax) return false;
        if (s && (r[C.top_tokens].join("\u0000") + "\u0000" + r[C.logits].join("\u0000") + "\u0000" + r[C.description] + "\u0000" + r[C.other_runs].join("\u0000"))
            .toLowerCase().indexOf(s) < 0 &&
            String(r[C.unit]) !== s) return false;
        return true;
      });
      view.sort(function (a, b) {
        var x = a[sortCol], y = b[sortCol];
        if (x === null || x === "") return 1;
        if (y === null || y === "") return -1;
        if (x < y) return -sortDir;
        if (x > y) return sortDir;
        return a[0] - b[0];
      });
      page = Math.min(page, Math.max(0, Math.ceil(view.length / q.size) - 1));
      draw();
    }
    function draw() {
      var tbody = document.getElementById("rows");
      var frag = document.createDocumentFragment();
      var start = page * q.size, end = Math.min(view.length, start + q.size);
      for (var i = start; i < end; i++) {
        var r = view[i], tr = el("tr", klassOf(r));
        var td = el("td", "num");
        if (r[C.has_page]) {
          var a = el("a", null, String(r[C.unit]));
          a.href = "feature/" + r[C.unit] + ".html";
          td.appendChild(a);
        } else td.textContent = String(r[C.unit]);
        tr.appendChild(td);
        tr.appendChild(el("td", "num", fmt(r[C.density])));
        tr.appendChild(el("td", "num", fmt(r[C.max_act]) + (r[C.min_act] === null || r[C.min_act] === undefined ? "" : " / " + fmt(r[C.min_act]))));
        tr.appendChild(chips(r[C.top_tokens]));
        tr.appendChild(chips(r[C.logits]));
        var dc = el("td", "descr", r[C.description] || (r[C.status] && r[C.status] !== "ok" ? "(" + r[C.status] + ")" : ""));
        r[C.other_runs].forEach(function (lab) {
          var chip = el("span", "also", "+" + lab);
          chip.title = "also described by the tagged run " + lab + " (see the unit's page)";
          dc.appendChild(chip);
        });
        tr.appendChild(dc);
        tr.appendChild(el("td", "num", fmt(r[C.score], 2)));
        frag.appendChild(tr);
      }
      tbody.replaceChildren(frag);
      var pages = Math.max(1, Math.ceil(view.length / q.size));
      document.getElementById("pageinfo").textContent = "page " + (page + 1) + " of " + pages;
      document.getElementById("status").textContent = view.length ?
        "showing " + (start + 1) + "–" + end + " of " + view.length + " matching (" + rows.length + " in all)" :
        "no unit matches";
      document.getElementById("prevpage").disabled = page === 0;
      document.getElementById("nextpage").disabled = page >= pages - 1;
      document.querySelectorAll("th button").forEach(function (b) {
        var on = C[b.dataset.sort] === sortCol;
        b.parentNode.setAttribute("aria-sort", on ? (sortDir > 0 ? "ascending" : "descending") : "none");
      });
    }
    function num(id) {
      var v = document.getElementById(id).value;
      return v === "" || isNaN(Number(v)) ? null : Number(v);
    }
    function onControls() {
      q.search = document.getElementById("search").value.trim();
      q.klass = document.getElementById("klass").value;
      q.dmin = num("dmin");
      q.dmax = num("dmax");
      q.size = Number(document.getElementById("pagesize").value) || 100;
      page = 0;
      apply();
    }
    ["search", "dmin", "dmax"].forEach(function (id) {
      document.getElementById(id).addEventListener("input", onControls);
    });
    ["klass", "pagesize"].forEach(function (id) {
      document.getElementById(id).addEventListener("change", onControls);
    });
    document.getElementById("controls").addEventListener("submit", function (ev) { ev.preventDefault(); });
    document.querySelectorAll("th button").forEach(function (b) {
      b.addEventListener("click", function () {
        var c = C[b.dataset.sort];
        // numbers start descending (strongest first) except the index; text starts ascending
        if (c === sortCol) sortDir = -sortDir;
        else { sortCol = c; sortDir = (c === C.unit || c === C.description) ? 1 : -1; }
        apply();
      });
    });
    document.getElementById("prevpage").addEventListener("click", function () { page--; draw(); });
    document.getElementById("nextpage").addEventListener("click", function () { page++; draw(); });
    document.addEventListener("keydown", function (ev) {
      if (typing(ev) || ev.altKey || ev.ctrlKey || ev.metaKey) return;
      if (ev.key === "/") { ev.preventDefault(); document.getElementById("search").focus(); }
    });
    apply();
  }

  // ---- feature page -------------------------------------------------------------------------
  function feature() {
    var maxAct = data.max_act > 0 ? data.max_act : 1;
    var detail = document.getElementById("detail");
    var word = data.unit === "neuron" ? "Neuron " : "Feature ";
    var layer = data.layer === null || data.layer === undefined ? "" : " · layer " + data.layer;
    document.getElementById("heading").textContent = word + data.index + " of " + data.n_units + layer +
      " · " + data.name;
    document.getElementById("stats").textContent = "density " + fmt(data.density) + " · max act " +
      fmt(data.max_act) + " · mean act (firing) " + fmt(data.mean_act) + " · " +
      (data.tokens_scanned || 0).toLocaleString("en") + " tokens scanned" +
      (data.neg ? " · below 0: density " + fmt(data.neg.density) + ", min act " + fmt(data.neg.min_act) +
        ", mean " + fmt(data.neg.mean_act) : "");
    var aq = data.act_quantiles || {p: [], v: []};
    if (aq.p.length) {
      document.getElementById("act-quantiles").textContent = "activation quantiles (all tokens): " +
        aq.p.map(function (p, i) { return "q" + p + " " + (aq.v[i] === null ? "?" : fmt(aq.v[i])); }).join(" · ");
    }
    var box = document.getElementById("desc");
    var labels = {simulation_all: "simulation_all", simulation_top: "simulation_top", detection_auc: "detection AUC"};
    if (!data.descs.length) box.appendChild(el("p", "muted", "No description yet (run tools.describe)."));
    data.descs.forEach(function (d) {
      var card = el("article", "dcard " + d.side);
      card.setAttribute("aria-label", side(d.side) + " side, " + d.run);
      var head = el("p", "dhead");
      head.appendChild(el("span", "side " + d.side, side(d.side) + " side"));
      head.appendChild(el("span", "run", d.run));
      head.appendChild(el("span", "muted", "explainer " + (d.explainer || "?") +
        (d.simulator ? " · simulator " + d.simulator + (d.mode ? ", " + d.mode : "") : "")));
      card.appendChild(head);
      card.appendChild(el("p", "description" + (d.status === "ok" ? "" : " muted"), d.status === "ok" ?
        d.description : "(" + d.status + (d.reason ? ": " + d.reason : "") + ")"));
      var keys = Object.keys(labels).filter(function (k) {
        return k in d.scores || Object.keys(d.controls).some(function (c) { return k in d.controls[c]; });
      });
      if (keys.length) {
        var t = el("table", "scores"), hr = el("tr");
        hr.appendChild(el("th", null, "score"));
        keys.forEach(function (k) { hr.appendChild(el("th", "num", labels[k])).scope = "col"; });
        t.appendChild(el("thead")).appendChild(hr);
        var tb = t.appendChild(el("tbody"));
        [["this description", d.scores],
         ["random description" + (d.control_from === null ? "" : " (unit " + d.control_from + "'s)"),
          d.controls.random_description],
         ["shuffled tokens", d.controls.shuffled_tokens]].forEach(function (row) {
          if (!row[1]) return;
          var tr = el("tr");
          tr.appendChild(el("th", null, row[0])).scope = "row";
          keys.forEach(function (k) { tr.appendChild(el("td", "num", fmt(row[1][k], 3))); });
          tb.appendChild(tr);
        });
        card.appendChild(t);
      }
      box.appendChild(card);
    });

    ["prev", "next"].forEach(function (k) {
      var a = document.getElementById(k);
      if (data[k] === null || data[k] === undefined) { a.removeAttribute("href"); a.setAttribute("aria-disabled", "true"); }
      else a.href = data[k] + ".html";
    });

    ["pos", "neg"].forEach(function (side) {
      var tb = document.querySelector("#logits-" + side + " tbody");
      data.logits[side].forEach(function (row) {
        var tr = el("tr");
        var t = el("td", "tok-cell");
        t.appendChild(el("span", "tok logit-tok", row[0]));
        t.title = "token " + row[2] + " · bytes " + (data.vocab[row[2]] || "");
        tr.appendChild(t);
        tr.appendChild(el("td", "num", fmt(row[1])));
        tb.appendChild(tr);
      });
    });

    var minAct = data.neg && data.neg.min_act < 0 ? -data.neg.min_act : 0;
    function shade(a) {
      if (a > 0) return "rgba(255,128,0," + Math.min(1, a / maxAct).toFixed(3) + ")";
      if (a < 0 && minAct) return "rgba(60,120,255," + Math.min(1, -a / minAct).toFixed(3) + ")";
      if (a < 0) return "rgba(60,120,255," + Math.min(0.6, -a / maxAct * 4).toFixed(3) + ")";
      return "";
    }
    function describeTok(ex, i) {
      var id = ex.t[i];
      return "token " + (i + 1) + "/" + ex.t.length + " · “" + ex.s[i] + "” · id " + id + " · bytes " +
        (data.vocab[id] || "") + " · activation " + fmt(ex.a[i], 4);
    }
    function example(ex) {
      var row = el("div", "ex");
      row.tabIndex = 0;
      row.setAttribute("role", "group");
      row.setAttribute("aria-label", "context " + ex.c + ", max activation " + fmt(Math.max.apply(null, ex.a)) +
        "; arrow keys move between tokens");
      var spans = [];
      for (var i = 0; i < ex.t.length; i++) {
        var special = data.vocab[ex.t[i]] === "special";
        var s = el("span", "tok" + (special ? " special" : "") + (ex.s[i] === "" ? " empty" : "") +
          (i === ex.p ? " hit" : ""), ex.s[i]);
        var bg = shade(ex.a[i]);
        if (bg) s.style.backgroundColor = bg;
        s.title = describeTok(ex, i);
        s.dataset.i = String(i);
        spans.push(s);
        row.appendChild(s);
      }
      var cur = -1;
      function activate(i) {
        if (cur >= 0) spans[cur].classList.remove("active");
        cur = Math.max(0, Math.min(spans.length - 1, i));
        spans[cur].classList.add("active");
        detail.textContent = describeTok(ex, cur);
      }
      row.addEventListener("focus", function () { activate(cur >= 0 ? cur : ex.p || 0); });
      row.addEventListener("blur", function () { if (cur >= 0) spans[cur].classList.remove("active"); });
      row.addEventListener("mouseover", function (ev) {
        var i = ev.target && ev.target.dataset ? ev.target.dataset.i : undefined;
        if (i !== undefined) detail.textContent = describeTok(ex, Number(i));
      });
      row.addEventListener("keydown", function (ev) {
        var step = {ArrowLeft: -1, ArrowRight: 1}[ev.key];
        if (step) { activate(cur + step); ev.preventDefault(); ev.stopPropagation(); }
        else if (ev.key === "Home") { activate(0); ev.preventDefault(); }
        else if (ev.key === "End") { activate(spans.length - 1); ev.preventDefault(); }
      });
      return row;
    }
    function fill(id, list, empty) {
      var box = document.getElementById(id);
      if (!list.length) box.appendChild(el("p", "muted", empty));
      list.forEach(function (ex) { box.appendChild(example(ex)); });
    }
    function bins(id, list, word) {
      var qbox = document.getElementById(id);
      if (!list.length) qbox.appendChild(el("p", "muted", "No " + word + " tokens."));
      list.forEach(function (q) {
        var sec = el("div", "bin");
        sec.appendChild(el("h3", null, "activation " + fmt(q.lo) + " – " + fmt(q.hi) +
          (q.count !== undefined ? " · ≈" + q.count + " " + word + " tokens" : "")));
        var box = el("div", "examples");
        if (!q.examples.length) box.appendChild(el("p", "muted", "none"));
        q.examples.forEach(function (ex) { box.appendChild(example(ex)); });
        sec.appendChild(box);
        qbox.appendChild(sec);
      });
    }
    fill("top", data.top, "This unit never fired on the scanned tokens.");
    document.getElementById("bins-note").textContent = "(equal-width over (0, max act]; examples drawn uniformly within a bin)";
    bins("quantiles", data.quantiles.slice().reverse(), "firing");
    fill("random", data.random, "This unit fires in every scanned context.");
    document.querySelectorAll(".neg-only").forEach(function (s) { s.hidden = !data.neg; });
    if (data.neg) {
      fill("bottom", data.neg.bottom, "This unit is never below 0 on the scanned tokens.");
      bins("neg-quantiles", data.neg.quantiles, "negative");
      fill("neg-random", data.neg.random, "This unit is below the threshold in every scanned context.");
    }

    document.addEventListener("keydown", function (ev) {
      if (typing(ev) || ev.altKey || ev.ctrlKey || ev.metaKey || ev.shiftKey) return;
      var k = {ArrowLeft: "prev", ArrowRight: "next"}[ev.key];
      if (!k) return;
      var a = document.getElementById(k);
      if (a.hasAttribute("href")) { ev.preventDefault(); window.location.href = a.href; }
    });
  }

  if (document.body.dataset.page === "index") index(); else feature();
})();
