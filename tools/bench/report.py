"""How every benchmark prints its figures: one `key=value` per line, so runs compare by script."""

from __future__ import annotations


def print_figures(figures: dict[str, object]) -> None:
    for k, v in figures.items():
        print(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}")
