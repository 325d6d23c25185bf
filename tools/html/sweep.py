"""Pages comparing SAEs, with links to each SAE's browser: an L1 sweep (L0 against loss recovered)
and the architecture frontier of `tools.bench.frontier` (FVU against L0, one line per architecture).

Built server-side from numbers and SAE names only; every value is escaped.
"""

from __future__ import annotations

import html
import math
import shutil
from pathlib import Path
from typing import Any

from tools.core.files import atomic_path
from tools.core.layout import RunLayout
from tools.html.site import STATIC, _fill, _num


def _frame(label: str, width: int, height: int, box: tuple[float, float, float, float],
           yr: tuple[float, float], sy) -> list[str]:
    """The opening <svg> tag, both axes of the plot box (left, top, width, height) and 3 y ticks."""
    pad_l, pad_t, w, h = box
    parts = [f'<svg class="hist" role="img" aria-label="{label}" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}">',
             f'<line x1="{pad_l}" y1="{pad_t + h}" x2="{pad_l + w}" y2="{pad_t + h}" stroke="#888"/>',
             f'<line x1="{pad_l}" y1="{pad_t}" x2="{pad_l}" y2="{pad_t + h}" stroke="#888"/>']
    for v in (yr[0], (yr[0] + yr[1]) / 2, yr[1]):
        parts.append(f'<text x="{pad_l - 6}" y="{sy(v) + 4:.1f}" text-anchor="end" font-size="11">'
                     f'{_num(v)}</text>')
    return parts


def _scatter(points: list[tuple[float, float, str]], width: int = 560, height: int = 300) -> str:
    """Inline SVG scatter: x = L0 (log scale), y = loss recovered, each point labelled."""
    points = [(x, y, label) for x, y, label in points if x > 0 and math.isfinite(x) and math.isfinite(y)]
    if not points:
        return '<p class="muted">no finished SAE to plot</p>'
    pad_l, pad_r, pad_t, pad_b = 50, 60, 20, 36
    lx = [math.log10(x) for x, _, _ in points]
    ys = [y for _, y, _ in points]
    x0, x1 = min(lx) - 0.1, max(lx) + 0.1
    y0, y1 = min(min(ys), 0.0), max(max(ys), 1.0)
    w, h = width - pad_l - pad_r, height - pad_t - pad_b

    def sx(v: float) -> float:
        return pad_l + (v - x0) / (x1 - x0) * w

    def sy(v: float) -> float:
        return pad_t + (1 - (v - y0) / (y1 - y0)) * h

    parts = _frame("L0 against loss recovered", width, height, (pad_l, pad_t, w, h), (y0, y1), sy)
    for v in (x0 + 0.1, x1 - 0.1):
        parts.append(f'<text x="{sx(v):.1f}" y="{pad_t + h + 14}" text-anchor="middle" font-size="11">'
                     f'{_num(10 ** v)}</text>')
    parts.append(f'<text x="{pad_l + w / 2}" y="{height - 4}" text-anchor="middle" font-size="11">'
                 'L0 (log scale)</text>')
    for (_, y, label), v in zip(points, lx, strict=True):
        parts.append(f'<circle cx="{sx(v):.1f}" cy="{sy(y):.1f}" r="5" fill="#e07b00">'
                     f'<title>{html.escape(label)}</title></circle>')
        parts.append(f'<text x="{sx(v) + 7:.1f}" y="{sy(y) - 6:.1f}" font-size="11">'
                     f'{html.escape(label)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def render_sweep_index(run_dir: Path, saes: list[dict[str, Any]]) -> Path:
    """Write `run_dir/sweep/index.html` for SAE summaries (name, l1_coeff, l0, ..., simulation mean)."""
    out = RunLayout(Path(run_dir)).sweep
    shutil.copytree(STATIC, out / "static", dirs_exist_ok=True)
    rows = []
    for s in saes:
        name = html.escape(str(s.get("name")))
        link = f'<a href="../features/{name}/site/index.html">{name}</a>'
        cells = [s.get("l1_coeff"), s.get("l0"), s.get("explained_variance"), s.get("dead_fraction"),
                 s.get("loss_recovered"), s.get("simulation_all_mean")]
        rows.append("<tr><td>" + link + "</td>" + "".join(
            f"<td>{'-' if v is None else html.escape(_num(float(v)))}</td>" for v in cells) + "</tr>")
    plot = _scatter([(s.get("l0") or 0.0, s.get("loss_recovered") or float("nan"), str(s.get("name")))
                     for s in saes])
    if (out / "frontier.html").is_file():
        plot += '<p><a href="frontier.html">FVU against L0 for every architecture</a></p>'
    page = _fill("sweep.html", title="L1 sweep", plot=plot, rows="\n".join(rows),
                 subtitle=html.escape(f"{len(saes)} SAEs under {run_dir}/sae; each links to its browser."))
    with atomic_path(out / "index.html") as tmp:
        tmp.write_text(page, encoding="utf-8")
    return out / "index.html"


COLORS = {"l1": "#1f77b4", "topk": "#ff7f0e", "batchtopk": "#2ca02c", "jumprelu": "#d62728",
          "matryoshka": "#9467bd"}


def _frontier_svg(results: list[dict[str, Any]], width: int = 620, height: int = 340) -> str:
    """Inline SVG: x = L0 (log scale), y = FVU, one polyline per architecture, each point a link to
    its SAE's browser."""
    pts = [r for r in results if (r.get("l0") or 0) > 0 and math.isfinite(float(r.get("fvu", math.nan)))]
    if not pts:
        return '<p class="muted">no evaluated SAE to plot</p>'
    pad_l, pad_r, pad_t, pad_b = 56, 110, 20, 36
    lx = [math.log10(float(r["l0"])) for r in pts]
    ys = [float(r["fvu"]) for r in pts]
    x0, x1 = min(lx) - 0.1, max(lx) + 0.1
    y0, y1 = 0.0, max(ys) * 1.1
    w, h = width - pad_l - pad_r, height - pad_t - pad_b

    def sx(v: float) -> float:
        return pad_l + (math.log10(v) - x0) / (x1 - x0) * w

    def sy(v: float) -> float:
        return pad_t + (1 - (v - y0) / (y1 - y0)) * h

    parts = _frame("FVU against L0", width, height, (pad_l, pad_t, w, h), (y0, y1), sy)
    for v in sorted({round(float(r["l0"])) for r in pts}):
        if v > 0:
            parts.append(f'<text x="{sx(v):.1f}" y="{pad_t + h + 14}" text-anchor="middle" font-size="11">'
                         f'{v}</text>')
    parts.append(f'<text x="{pad_l + w / 2}" y="{height - 4}" text-anchor="middle" font-size="11">'
                 'L0 (log scale); y: FVU = 1 - explained variance</text>')
    archs = list(dict.fromkeys(str(r.get("arch")) for r in pts))
    for i, arch in enumerate(archs):
        color = COLORS.get(arch, "#555")
        mine = sorted((r for r in pts if str(r.get("arch")) == arch), key=lambda r: float(r["l0"]))
        line = " ".join(f"{sx(float(r['l0'])):.1f},{sy(float(r['fvu'])):.1f}" for r in mine)
        parts.append(f'<polyline points="{line}" fill="none" stroke="{color}" stroke-width="1.5"/>')
        for r in mine:
            name = html.escape(str(r.get("name")))
            l0, fvu = float(r["l0"]), float(r["fvu"])
            parts.append(f'<a href="../features/{name}/site/index.html"><circle cx="{sx(l0):.1f}" '
                         f'cy="{sy(fvu):.1f}" r="5" fill="{color}"><title>{name}: L0 {_num(l0)}, FVU '
                         f'{_num(fvu)}</title></circle></a>')
        ly = pad_t + 14 * i + 8
        parts.append(f'<circle cx="{pad_l + w + 14}" cy="{ly}" r="4" fill="{color}"/>'
                     f'<text x="{pad_l + w + 22}" y="{ly + 4}" font-size="11">{html.escape(arch)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def render_frontier(run_dir: Path, results: list[dict[str, Any]]) -> Path:
    """Write `run_dir/sweep/frontier.html`: the frontier's plot and table, each SAE linking to its
    browser (`run_dir/features/<name>/site/`), from `tools.bench.frontier`'s result rows."""
    out = RunLayout(Path(run_dir)).sweep
    shutil.copytree(STATIC, out / "static", dirs_exist_ok=True)
    rows = []
    for r in results:
        name = html.escape(str(r.get("name")))
        cells = [html.escape(str(r.get("arch"))), html.escape(str(r.get("setting")))] + [
            "-" if r.get(k) is None or not math.isfinite(float(r[k])) else html.escape(_num(float(r[k])))
            for k in ("l0", "fvu", "dead_fraction", "loss_recovered")]
        rows.append(f'<tr><td><a href="../features/{name}/site/index.html">{name}</a></td>'
                    + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    page = _fill("frontier.html", title="Architecture frontier", plot=_frontier_svg(results),
                 rows="\n".join(rows),
                 subtitle=html.escape(f"{len(results)} SAEs under {run_dir}/sae, one evaluator on the same "
                                      "held-out rows; each links to its browser."))
    with atomic_path(out / "frontier.html") as tmp:
        tmp.write_text(page, encoding="utf-8")
    return out / "frontier.html"
