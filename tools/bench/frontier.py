"""The sparsity/reconstruction frontier of every SAE architecture on one run's shards.

    python -m tools.bench.frontier run_dir=runs/demo data_dir=data --out runs/demo/frontier
    python -m tools.bench.frontier preset=demo run_dir=... --archs topk,batchtopk --ks 16,32

Trains each architecture (autoencoder/saes/: l1, topk, batchtopk, jumprelu, matryoshka) at several
sparsities, `--ks` for the k-sparse kinds and the matching `--l1-coeffs` / `--l0-coeffs` for l1 and
jumprelu, all through the trainer stage (`autoencoder.train`) on the same shards with the same
steps, batch, lr and warmup (Hydra overrides after the options apply to every run; by default the
demo budget: 2,048 latents, 1,500 steps x 512 rows, lr 3e-4, warmup 100). A finished SAE of the
same config is reused. Then one `autoencoder.evaluator.Evaluator` scores every SAE on the same
held-out rows and val contexts: L0, FVU (1 − explained variance), dead fraction, loss recovered by
splicing (`autoencoder.metrics.loss_recovered`), and for Matryoshka the FVU of each nested prefix.

Writes `frontier.md` (the table), `frontier.png` (FVU against L0, log-x, one line per
architecture) and `frontier.json` to `--out`, the same plot with links to each SAE's browser to
`<run_dir>/sweep/frontier.html` (`tools.html.sweep.render_frontier`), and prints one `key=value`
line per SAE.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

import torch

ARCHS = ("l1", "topk", "batchtopk", "jumprelu", "matryoshka")
DEMO_BUDGET = ["sae.n_features=2048", "sae.steps=1500", "sae.batch_size=512", "sae.lr=3e-4",
               "sae.lr_warmup_steps=100"]
# sparsity knob per architecture: (override key, option holding its values)
KNOB = {"l1": ("sae.l1_coeff", "l1_coeffs"), "jumprelu": ("sae.l0_coeff", "l0_coeffs"),
        "topk": ("sae.k", "ks"), "batchtopk": ("sae.k", "ks"), "matryoshka": ("sae.k", "ks")}


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=None, help="output folder (default: <run_dir>/frontier)")
    p.add_argument("--archs", default=",".join(ARCHS))
    p.add_argument("--ks", default="16,32,64", help="k of topk, batchtopk, matryoshka")
    p.add_argument("--l1-coeffs", default="0.12,0.06,0.03", help="sae.l1_coeff values of l1")
    p.add_argument("--l0-coeffs", default="0.001,0.0005,0.00025", help="sae.l0_coeff values of jumprelu")
    p.add_argument("--jumprelu-threshold-init", type=float, default=0.03,
                   help="sae.threshold_init of jumprelu (units of the input's RMS norm; docs/benchmarks.md)")
    p.add_argument("--eval-rows", type=int, default=8192)
    p.add_argument("--eval-contexts", type=int, default=32)
    p.add_argument("--no-budget", action="store_true", help="do not apply the demo budget overrides")
    p.add_argument("--prefix", default="frontier", help="SAE folder names: <prefix>-<arch>-<setting>")
    p.add_argument("--eval-only", action="store_true", help="evaluate the SAEs already trained; train none")
    a, overrides = p.parse_known_args(argv)
    a.archs = [s for s in a.archs.split(",") if s]
    bad = [s for s in a.archs if s not in ARCHS]
    if bad:
        p.error(f"--archs takes {','.join(ARCHS)}, not {bad}")
    for opt in ("ks", "l1_coeffs", "l0_coeffs"):
        setattr(a, opt, [s for s in getattr(a, opt).split(",") if s])
    return a, overrides


def runs(a: argparse.Namespace) -> list[tuple[str, str, str]]:
    """(architecture, sparsity override, SAE name) for every run."""
    out = []
    for arch in a.archs:
        key, opt = KNOB[arch]
        for v in getattr(a, opt):
            tag = key.split(".")[1].replace("_coeff", "c")
            out.append((arch, f"{key}={v}", f"{a.prefix}-{arch}-{tag}{v}"))
    return out


def run_cfg(base: list[str], arch: str, knob: str, name: str, a: argparse.Namespace):
    from tools.core.config import compose

    budget = [] if a.no_budget else DEMO_BUDGET
    # each architecture's own recipe against a preset's: only l1 resamples (the others have AuxK or,
    # for jumprelu, none in the paper)
    own = [] if arch == "l1" else ["sae.resample_steps=[]"]
    if arch == "jumprelu":
        own.append(f"sae.threshold_init={a.jumprelu_threshold_init}")
    return compose([*base[:1], f"sae={arch}", *budget, *own, *base[1:], knob, f"sae.name={name}",
                    "sae.eval_contexts=4", "sae.eval_rows=2048"])


@torch.no_grad()
def prefix_fvu(sae, rows: torch.Tensor) -> dict[int, float]:
    """Matryoshka: FVU of each nested prefix's reconstruction on `rows`."""
    from autoencoder.metrics import explained_variance

    f = sae.encode(rows)
    return {w: 1.0 - explained_variance(rows, r) for w, r in zip(sae.cfg.widths,
                                                                  sae.prefix_reconstructions(rows, f),
                                                                  strict=True)}


def split_preset(overrides: list[str]) -> tuple[list[str], list[str]]:
    """(the preset overrides, default `preset=demo`; the other overrides): the preset composes first."""
    preset = [o for o in overrides if o.startswith("preset=")] or ["preset=demo"]
    return preset, [o for o in overrides if not o.startswith("preset=")]


def result_row(arch: str, setting: str, name: str, m: dict[str, float]) -> dict[str, Any]:
    """A frontier table row from an `Evaluator`'s metrics."""
    return {"arch": arch, "setting": setting, "name": name, "l0": m.get("metrics/l0", math.nan),
            "fvu": 1.0 - m.get("metrics/explained_variance", math.nan),
            "dead_fraction": m.get("sparsity/dead_fraction", math.nan),
            "loss_recovered": m.get("metrics/loss_recovered", math.nan)}


def evaluate(cfg, names: list[tuple[str, str, str]], a: argparse.Namespace, log) -> list[dict[str, Any]]:
    """One Evaluator for every SAE: same held-out rows, same val contexts."""
    from autoencoder.config import SAETrainConfig
    from autoencoder.evaluator import Evaluator
    from autoencoder.sae import load_sae
    from tools.core.config import resolve_device, section
    from tools.core.layout import RunLayout

    c = section(cfg, "sae", SAETrainConfig)
    c.eval_rows, c.eval_contexts = a.eval_rows, a.eval_contexts
    run_dir, device = Path(str(cfg.run_dir)), resolve_device(str(cfg.device))
    lay = RunLayout(run_dir)
    evaluator, results = None, []
    for arch, knob, name in names:
        folder = lay.sae(name)
        if not (folder / "sae_weights.safetensors").is_file():
            log(f"note: {folder} not trained: skipped")
            continue
        sae = load_sae(folder, device=device)
        if evaluator is None:
            evaluator = Evaluator(cfg, c, run_dir, sae.cfg.d_in, sae.cfg.hook_name, device, log)
        m, _ = evaluator(sae)
        row = result_row(arch, knob.split(".", 1)[1], name, m)
        if arch == "matryoshka" and evaluator.rows is not None:
            row["prefix_fvu"] = prefix_fvu(sae, evaluator.rows.to(device))
        results.append(row)
    return results


def table(results: list[dict[str, Any]]) -> str:
    lines = ["| architecture | setting | L0 | FVU | dead | loss recovered | prefix FVU (width: FVU) |",
             "|---|---|---:|---:|---:|---:|---|"]
    for r in results:
        pre = ", ".join(f"{w}: {v:.4f}" for w, v in (r.get("prefix_fvu") or {}).items())
        lines.append(f"| {r['arch']} | {r['setting']} | {r['l0']:.1f} | {r['fvu']:.4f} | "
                     f"{r['dead_fraction']:.1%} | {r['loss_recovered']:.3f} | {pre} |")
    return "\n".join(lines) + "\n"


def plot(results: list[dict[str, Any]], path: Path, title: str) -> None:
    """FVU against L0 (log-x), one line per architecture."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    from tools.core.files import atomic_path

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for arch in ARCHS:
        pts = sorted((r["l0"], r["fvu"]) for r in results if r["arch"] == arch and r["l0"] > 0)
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", label=arch)
    ax.set_xscale("log")
    l0s = [r["l0"] for r in results if r["l0"] > 0]
    if l0s:  # plain-number ticks at powers of 2 within the range
        ticks = [2.0**e for e in range(0, 16) if min(l0s) / 1.5 <= 2.0**e <= max(l0s) * 1.5]
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("L0 (held-out rows, log scale)")
    ax.set_ylabel("FVU (1 - explained variance)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def print_results(results: list[dict[str, Any]]) -> None:
    """One `key=value` line per SAE (Matryoshka's prefix FVU as `prefix_fvu_<width>`)."""
    for r in results:
        kv = {k: v for k, v in r.items() if k != "prefix_fvu"}
        kv.update({f"prefix_fvu_{w}": v for w, v in (r.get("prefix_fvu") or {}).items()})
        print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in kv.items()),
              flush=True)


def main(argv: list[str] | None = None) -> None:
    from hydra.errors import HydraException

    from autoencoder import train
    from tools.core.config import UserError, error_line
    from tools.core.files import atomic_path, write_json
    from tools.html.sweep import render_frontier

    a, overrides = parse_args(argv)
    names = runs(a)
    try:
        preset, rest = split_preset(overrides)
        base = preset + rest
        cfgs = [run_cfg(base, *r, a) for r in names]
        if not a.eval_only:
            for cfg, (arch, knob, name) in zip(cfgs, names, strict=True):
                print(f"# training {name} ({arch}, {knob})", file=sys.stderr, flush=True)
                train.run(cfg)
        results = evaluate(cfgs[0], names, a, lambda s: print(s, file=sys.stderr, flush=True))
    except (UserError, HydraException) as e:
        print(error_line(e), file=sys.stderr)
        sys.exit(2)
    out = Path(a.out) if a.out else Path(str(cfgs[0].run_dir)) / "frontier"
    out.mkdir(parents=True, exist_ok=True)
    md = table(results)
    with atomic_path(out / "frontier.md") as tmp:
        tmp.write_text(md, encoding="utf-8")
    write_json(out / "frontier.json", {"overrides": base, "budget": [] if a.no_budget else DEMO_BUDGET,
                                       "results": results})
    c0 = cfgs[0].sae
    plot(results, out / "frontier.png", f"{c0.n_features} latents, {c0.steps} steps x {c0.batch_size} rows, "
                                        f"lr {c0.lr:g}; {a.eval_rows} held-out rows")
    page = render_frontier(Path(str(cfgs[0].run_dir)), results)
    print_results(results)
    print(f"table={out / 'frontier.md'} plot={out / 'frontier.png'} page={page}", flush=True)


if __name__ == "__main__":
    main()
