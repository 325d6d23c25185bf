"""The static feature browser: `site/index.html` plus one page per unit, opened from `file://`.

Everything from the corpus (token text, descriptions) is untrusted. It reaches the page only as
JSON inside `<script type="application/json">` with `<`, `>`, `&` (and U+2028/9) escaped, and the
page's one script (`static/site.js`) puts it into the DOM with `textContent` only. Numbers-only
markup (the histograms' SVG) is built here. A Content-Security-Policy meta tag allows scripts and
styles only from the site's own files and forbids every network load.
"""

from __future__ import annotations

import hashlib
import html
import json
import math
import os
import shutil
from collections import Counter
from pathlib import Path
from string import Template
from typing import Any, NamedTuple

from tqdm.auto import tqdm

from tools.core.config import UserError
from tools.core.files import read_json
from tools.core.layout import RunLayout
from tools.describe.records import FILE as DESCRIPTIONS
from tools.features.records import FILE as FEATURES
from tools.features.records import iter_records
from tools.html.descriptions import find_runs, run_view, short_label, unit_views

HERE = Path(__file__).resolve().parent
TEMPLATES = HERE / "templates"
STATIC = HERE / "static"
# 'self' and file: cover the site's own css/js under file://; nothing else loads, nothing inline runs.
CSP = ("default-src 'none'; script-src 'self' file:; style-src 'self' file:; img-src data:; "
       "connect-src 'none'; font-src 'none'; media-src 'none'; object-src 'none'; frame-src 'none'; "
       "base-uri 'none'; form-action 'none'")
RENDER_FORMAT = "monosemantic.site_render/1"
ULTRA_LOW = 1e-5  # density below which a live unit counts as "ultra-low" in the index filter


class IndexRow(NamedTuple):
    """One unit's row of the index table (shipped as a JSON array; `columns` names the slots)."""

    unit: int
    density: float
    max_act: float
    top_tokens: list[str]
    logits: list[str]
    description: str
    score: float | None
    status: str
    has_page: int
    min_act: float | None
    other_runs: list[str]


def embed_json(obj: Any) -> str:
    """JSON safe inside a <script> element: no `<`, `>`, `&` or line separators survive literally."""
    s = json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    for ch, esc in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"),
                    ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        s = s.replace(ch, esc)
    return s


def _num(x: float) -> str:
    if x == 0:
        return "0"
    if abs(x) >= 1000 or abs(x) < 0.01:
        return f"{x:.2g}"
    return f"{x:.3g}"


def svg_histogram(edges: list[float], counts: list[int], *, label: str, title: str,
                  width: int = 560, height: int = 150, log_x_label: bool = False) -> str:
    """A bar chart as inline SVG from numbers only (so no escaping of corpus text is involved)."""
    if not counts or not edges:
        return '<p class="muted">no data</p>'
    pad_l, pad_b, pad_t = 44, 30, 8
    w, h = width - pad_l - 8, height - pad_b - pad_t
    top = max(counts) or 1
    bw = w / len(counts)
    parts = [f'<svg class="hist" role="img" viewBox="0 0 {width} {height}" width="{width}" '
             f'height="{height}" aria-label="{html.escape(title)}">', f"<title>{html.escape(title)}</title>"]
    for i, c in enumerate(counts):
        bh = h * c / top
        x, y = pad_l + i * bw, pad_t + h - bh
        lo, hi = edges[i], edges[i + 1]
        parts.append(f'<rect x="{x:.2f}" y="{y:.2f}" width="{max(bw - 1, 0.5):.2f}" height="{bh:.2f}" '
                     f'fill="#e07b00"><title>{_num(lo)} to {_num(hi)}: {c}</title></rect>')
    axis_y = pad_t + h
    parts.append(f'<line x1="{pad_l}" y1="{axis_y}" x2="{pad_l + w}" y2="{axis_y}" stroke="#555"/>')
    parts.append(f'<text x="{pad_l - 4}" y="{pad_t + 10}" text-anchor="end" class="tick">{top}</text>')
    parts.append(f'<text x="{pad_l - 4}" y="{axis_y}" text-anchor="end" class="tick">0</text>')
    for frac, anchor in ((0, "start"), (0.5, "middle"), (1, "end")):
        v = edges[0] + frac * (edges[-1] - edges[0])
        txt = f"10^{v:.2g}" if log_x_label else _num(v)
        parts.append(f'<text x="{pad_l + frac * w:.1f}" y="{axis_y + 14}" text-anchor="{anchor}" '
                     f'class="tick">{txt}</text>')
    parts.append(f'<text x="{pad_l + w / 2:.1f}" y="{height - 2}" text-anchor="middle" '
                 f'class="axis">{html.escape(label)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _density_svg(meta: dict) -> str:
    h = meta.get("density_log10_histogram") or {}
    edges, counts = h.get("edges") or [], h.get("counts") or []
    nz = [i for i, c in enumerate(counts) if c]
    if not nz:
        return '<p class="muted">no unit fired</p>'
    a, b = max(0, nz[0] - 1), min(len(counts), nz[-1] + 2)
    return svg_histogram(edges[a:b + 1], counts[a:b], label="log10 feature density (alive units)",
                         title="Histogram of log10 feature density", log_x_label=True)


def _alone(s: str) -> str:
    """A token shown out of context (logit tables, index cells): a whitespace-only token would be
    invisible there, so its spaces show as ␣."""
    from tools.tokens import visible

    v = visible(s)
    return v.replace(" ", "␣") if not v.strip() else v


def _example(ex: dict, vocab: dict[int, str], text) -> dict:
    from tools.tokens import visible

    ids = [int(t) for t in ex.get("tokens", [])]
    for t in ids:
        if t not in vocab:
            vocab[t] = text.hex_bytes(t)
    return {"c": ex.get("ctx"), "p": ex.get("pos"), "t": ids, "s": [visible(s) for s in ex.get("strs", [])],
            "a": [0 if a == 0 else a for a in ex.get("acts", [])]}


def _top_tokens(rec: dict, n: int = 3) -> list[str]:

    c = Counter()
    for ex in rec.get("top", []):
        p, strs = ex.get("pos"), ex.get("strs", [])
        if isinstance(p, int) and 0 <= p < len(strs):
            c[_alone(strs[p])] += 1
    return [s for s, _ in c.most_common(n)]


def _page(rec: dict, meta: dict, descs: list[dict], prev: int | None, nxt: int | None, text) -> dict:

    vocab: dict[int, str] = {}
    logits = {side: [[_alone(e.get("str", "")), e.get("value"), e.get("id")]
                     for e in (rec.get("logits") or {}).get(side, [])] for side in ("pos", "neg")}
    for side in logits.values():
        for row in side:
            if isinstance(row[2], int) and row[2] not in vocab:
                vocab[row[2]] = text.hex_bytes(row[2])
    neg = rec.get("neg")
    neg_view = None if not neg else {
        "density": neg.get("density"), "min_act": neg.get("min_act"), "mean_act": neg.get("mean_act"),
        "bottom": [_example(e, vocab, text) for e in neg.get("bottom", [])],
        "quantiles": [{"lo": q.get("lo"), "hi": q.get("hi"), "count": q.get("count"),
                       "examples": [_example(e, vocab, text) for e in q.get("examples", [])]}
                      for q in neg.get("quantiles", [])],
        "random": [_example(e, vocab, text) for e in neg.get("random", [])],
    }
    probs = meta.get("act_quantiles") or []
    vals = rec.get("act_quantiles") or []
    return {
        "index": rec["index"], "n_units": meta.get("n_units"), "unit": meta.get("unit"),
        "name": meta.get("name"), "layer": meta.get("layer"), "prev": prev, "next": nxt,
        "neg": neg_view, "act_quantiles": {"p": probs[:len(vals)], "v": vals[:len(probs)]},
        "density": rec.get("density"), "max_act": rec.get("max_act"), "mean_act": rec.get("mean_act"),
        "tokens_scanned": meta.get("tokens_scanned"), "descs": descs, "logits": logits,
        "top": [_example(e, vocab, text) for e in rec.get("top", [])],
        "quantiles": [{"lo": q.get("lo"), "hi": q.get("hi"), "count": q.get("count"),
                       "examples": [_example(e, vocab, text) for e in q.get("examples", [])]}
                      for q in rec.get("quantiles", [])],
        "random": [_example(e, vocab, text) for e in rec.get("random", [])],
        "vocab": {str(k): v for k, v in vocab.items()},
    }


def _fill(template: str, *, title: str, static: str = "", **values: str) -> str:
    """A page from `template` and the shared `head.html`; `static` is the path up to the site root."""
    head = Template((TEMPLATES / "head.html").read_text(encoding="utf-8"))
    head_html = head.substitute(csp=html.escape(CSP), title=title, static=static)
    page = Template((TEMPLATES / template).read_text(encoding="utf-8"))
    return page.substitute(head=head_html, title=title, **values)


def _tokenizer(meta: dict):
    """The tokenizer the features were written with (meta's `tokenizer_info`; GPT-2 before it existed)."""
    from transformer.tokenizer import TiktokenTokenizer, tokenizer_from_record

    info = meta.get("tokenizer_info")
    return tokenizer_from_record(info) if isinstance(info, dict) else TiktokenTokenizer()


def _layer_label(meta: dict) -> str:
    return f" · layer {int(meta['layer'])}" if isinstance(meta.get("layer"), int) else ""


def _stamp(path: Path) -> list | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


def _code_hash() -> str:
    h = hashlib.sha256()
    files = [HERE / "site.py", HERE / "descriptions.py", *sorted(TEMPLATES.iterdir()),
             *sorted(STATIC.iterdir())]
    for f in files:
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]


def _state(lay: RunLayout, name: str) -> tuple[dict, dict]:
    """What every page depends on (features, meta, this code) and what the description files are now."""
    feat_dir = lay.features(name)
    base = {"format": RENDER_FORMAT, "code": _code_hash(), "features": _stamp(feat_dir / FEATURES),
            "meta": _stamp(feat_dir / "meta.json")}
    inputs = {d.name: [_stamp(d / DESCRIPTIONS), _stamp(d / "summary.json")]
              for d in lay.description_candidates(name)}
    return base, inputs


def is_current(run_dir: Path, name: str) -> bool:
    """Whether `features/<name>/site/` was rendered from the features and description runs as they are now."""
    lay = RunLayout(Path(run_dir))
    site = lay.site(name)
    old = _read_state(site / "render.json")
    base, inputs = _state(lay, name)
    return (site / "index.html").is_file() and old.get("base") == base and old.get("inputs") == inputs


def render_site(run_dir: Path, name: str) -> Path:
    """(Re)build `run_dir/features/<name>/site/` from features.jsonl + meta.json (+ every description run).

    Built in a temporary folder and swapped in whole, so a reader never sees a half-written site; the
    caller holds the site's lock (`tools.site.run`). `site/render.json` records what each page was
    made from: nothing changed returns at once, and a page whose inputs did not change is linked from
    the old site instead of rebuilt (a describe run of a few units rebuilds a few pages). Returns
    index.html.
    """
    from tools.tokens import TokenText

    lay = RunLayout(Path(run_dir))
    feat_dir = lay.features(name)
    if not feat_dir.is_dir():
        raise UserError(f"{feat_dir} not found (run tools.top_activations)")
    meta = read_json(feat_dir / "meta.json", "features meta")
    feats = feat_dir / FEATURES
    if not feats.is_file():
        raise UserError(f"{feats} not found (run tools.top_activations)")
    site = lay.site(name)
    base, inputs = _state(lay, name)
    old = _read_state(site / "render.json")
    if old.get("base") == base and old.get("inputs") == inputs and (site / "index.html").is_file():
        return site / "index.html"
    reuse = old.get("pages", {}) if old.get("base") == base else {}
    runs = find_runs(lay.run_dir, name)
    primary = runs[0] if runs and runs[0].primary else None  # find_runs puts it first
    labels = [(short_label(r), r) for r in runs if r.tag is not None]  # index chips: the tagged runs
    pages = (meta.get("config") or {}).get("pages")
    n_units = int(meta.get("n_units", 0))
    rendered = sorted(set(range(n_units)) if pages is None else {int(p) for p in pages if 0 <= p < n_units})
    order = {u: i for i, u in enumerate(rendered)}
    text = TokenText(_tokenizer(meta))
    tmp = feat_dir / f".site.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    (tmp / "feature").mkdir(parents=True)
    (tmp / "static").mkdir()
    for f in ("site.css", "site.js"):
        shutil.copyfile(STATIC / f, tmp / "static" / f)
    title_name = html.escape(str(meta.get("name", name)))
    rows: list[IndexRow] = []
    hashes, built = {}, 0
    for rec in tqdm(iter_records(feats), total=n_units, desc="pages", unit="page", leave=False):
        u = int(rec["index"])
        views = unit_views(runs, u)
        d = views[0] if primary is not None and u in primary.records else {}
        has_page = u in order
        others = [lab for lab, r in labels if r.records.get(u, {}).get("status") == "ok"]
        rows.append(IndexRow(
            unit=u, density=rec.get("density", 0.0), max_act=rec.get("max_act", 0.0),
            top_tokens=_top_tokens(rec), logits=visible_logits(rec), description=d.get("description", ""),
            score=d.get("scores", {}).get("simulation_all"), status=d.get("status", ""),
            has_page=1 if has_page else 0, min_act=(rec.get("neg") or {}).get("min_act"), other_runs=others))
        if not has_page:
            continue
        key = hashes[str(u)] = hashlib.sha256(embed_json(views).encode()).hexdigest()[:16]
        dest = tmp / "feature" / f"{u}.html"
        if reuse.get(str(u)) == key and _link(site / "feature" / f"{u}.html", dest):
            continue
        i = order[u]
        prev = rendered[i - 1] if i > 0 else None
        nxt = rendered[i + 1] if i + 1 < len(rendered) else None
        data = _page(rec, meta, views, prev, nxt, text)
        hist = rec.get("hist") or {}
        svg = svg_histogram(hist.get("edges") or [], hist.get("counts") or [], label="activation",
                            title=f"Activation histogram of unit {u} (firing tokens)")
        nh = (rec.get("neg") or {}).get("hist") or {}
        neg_svg = "" if not rec.get("neg") else svg_histogram(
            nh.get("edges") or [], nh.get("counts") or [], label="−activation (tokens below 0)",
            title=f"Histogram of unit {u}'s negative activations, by magnitude")
        page = _fill("feature.html", title=f"{'Neuron' if meta.get('unit') == 'neuron' else 'Feature'} {u}"
                     f"{_layer_label(meta)} · {title_name}", static="../", data=embed_json(data),
                     hist_svg=svg, neg_hist_svg=neg_svg)
        dest.write_text(page, encoding="utf-8")
        built += 1
    index_data = {"name": meta.get("name", name), "unit": meta.get("unit"), "n_units": n_units,
                  "layer": meta.get("layer"), "negative_side": bool(meta.get("negative_side")),
                  "tokens_scanned": meta.get("tokens_scanned"), "contexts": meta.get("contexts"),
                  "split": meta.get("split"), "alive": meta.get("alive"), "dead": meta.get("dead"),
                  "sae_metrics": _flat_metrics(meta.get("sae_metrics")), "ultra_low": ULTRA_LOW,
                  "bins": meta.get("bins"), "dictionary": meta.get("dictionary"),
                  "hook_name": meta.get("hook_name"), "logit_effects": meta.get("logit_effects"),
                  "described": sum(1 for r in rows if r.status == "ok"),
                  "runs": [run_view(r) for r in runs], "columns": IndexRow._fields, "rows": rows}
    index = _fill("index.html", title=f"Features{_layer_label(meta)} · {title_name}",
                  data=embed_json(index_data), density_svg=_density_svg(meta))
    (tmp / "index.html").write_text(index, encoding="utf-8")
    state = {"base": base, "inputs": inputs, "pages": hashes, "built": built}
    (tmp / "render.json").write_text(json.dumps(state, separators=(",", ":")), encoding="utf-8")
    stale = feat_dir / f".site.old-{os.getpid()}"
    if site.exists():
        os.replace(site, stale)
    os.replace(tmp, site)
    if stale.exists():
        shutil.rmtree(stale)
    return site / "index.html"


def _read_state(path: Path) -> dict:
    try:
        v = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return v if isinstance(v, dict) and v.get("base", {}).get("format") == RENDER_FORMAT else {}


def _link(src: Path, dest: Path) -> bool:
    """Hard-link an unchanged page into the new site (a copy where links are not possible)."""
    try:
        os.link(src, dest)
    except FileNotFoundError:
        return False
    except OSError:
        try:
            shutil.copyfile(src, dest)
        except OSError:
            return False
    return True


def visible_logits(rec: dict, n: int = 3) -> list[str]:

    return [_alone(e.get("str", "")) for e in (rec.get("logits") or {}).get("pos", [])[:n]]


def _flat_metrics(m: Any) -> dict[str, float]:
    """Numeric SAE metrics, nested keys joined with '.', for the index's summary table."""
    out: dict[str, float] = {}

    def walk(prefix: str, v: Any) -> None:
        if isinstance(v, dict):
            for k, x in v.items():
                walk(f"{prefix}.{k}" if prefix else str(k), x)
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out[prefix] = v

    walk("", m or {})
    return dict(list(out.items())[:40])
