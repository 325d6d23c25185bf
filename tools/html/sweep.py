"""A page comparing the SAEs of an L1 sweep: L0 against loss recovered, with links to each site.

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

    parts = [f'<svg class="hist" role="img" aria-label="L0 against loss recovered" width="{width}" '
             f'height="{height}" viewBox="0 0 {width} {height}">',
             f'<line x1="{pad_l}" y1="{pad_t + h}" x2="{pad_l + w}" y2="{pad_t + h}" stroke="#888"/>',
             f'<line x1="{pad_l}" y1="{pad_t}" x2="{pad_l}" y2="{pad_t + h}" stroke="#888"/>']
    for v in (y0, (y0 + y1) / 2, y1):
        parts.append(f'<text x="{pad_l - 6}" y="{sy(v) + 4:.1f}" text-anchor="end" font-size="11">'
                     f'{_num(v)}</text>')
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
    page = _fill("sweep.html", title="L1 sweep", plot=plot, rows="\n".join(rows),
                 subtitle=html.escape(f"{len(saes)} SAEs under {run_dir}/sae; each links to its browser."))
    with atomic_path(out / "index.html") as tmp:
        tmp.write_text(page, encoding="utf-8")
    return out / "index.html"
