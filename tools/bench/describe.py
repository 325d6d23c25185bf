"""Throughput of the in-process LLM describer (describe=local) on planted units.

    python -m tools.bench.describe [--units 4] [--model PATH | --embedded smollm2-135m-instruct]
                                   [--device auto] [--threads N] [--data-dir data]

Describes `--units` planted units (tools/describe/synthetic.py, 33-token windows as in the demo)
end to end through the stage, with the demo's LLM settings (conf/preset/demo.yaml
`pipeline.llm_overrides`: the explainer prompt and the scoring windows): explain (generation from
the chat template), simulate the held-out windows all at once, and the two controls. Prints
key=value lines: units/hour, tokens/s (prompt + generated), generated tokens per unit, simulator
forwards and scoring windows per unit (goal: at most one forward per scoring window, no generation).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from tools.bench.report import print_figures
from tools.core.config import compose, resolve_device
from tools.core.layout import RunLayout
from tools.describe import stage
from tools.describe.records import FILE, read_records
from tools.describe.synthetic import fires_after, fires_on, write_features


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--units", type=int, default=4)
    ap.add_argument("--embedded", default="smollm2-135m-instruct")
    ap.add_argument("--model", default=None, help="hub name or folder (instead of --embedded)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--data-dir", default="data", help="where the embedded model is converted")
    args = ap.parse_args(argv)
    words = [" thou", " king", " lord", " night", " sweet", " love", " fair", " good"]
    rules = [(fires_on if i % 2 == 0 else fires_after)(words[i % len(words)]) for i in range(args.units)]
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp)
        write_features(run_dir, "bench", rules, n_ctx=200, length=33)
        lay = RunLayout(run_dir)
        lay.sae("bench").mkdir(parents=True)
        (lay.sae("bench") / "cfg.json").write_text("{}")
        model = ["describe.embedded=null", f"describe.model={args.model}"] if args.model else \
            [f"describe.embedded={args.embedded}"]
        demo = compose(["preset=demo"]).pipeline.llm_overrides
        cfg = compose([f"run_dir={run_dir}", f"data_dir={args.data_dir}", f"device={args.device}",
                       "describe=local", "describe.site=false", *model,
                       *[f"describe.{k}={v}" for k, v in demo.items()],
                       *([f"describe.threads={args.threads}"] if args.threads else [])])
        t0 = time.perf_counter()
        stage.run(cfg)
        seconds = time.perf_counter() - t0
        recs = list(read_records(lay.descriptions("bench") / FILE).values())
    ok = [r for r in recs if r["status"] == "ok"]
    usage = {k: sum(int((r.get("usage") or {}).get(k, 0)) for r in recs)
             for k in ("calls", "forwards", "prompt_tokens", "completion_tokens")}
    windows = sum(sum(r["exemplars"][k] for k in ("score_top", "score_quantile", "score_random",
                                                  "score_uniform")) for r in ok)
    sims = 3 if ok and ok[0].get("controls") else 1  # the description and its two controls
    figures = {
        "device": resolve_device(args.device),
        "threads": torch.get_num_threads() if args.threads is None else args.threads,
        "units": len(recs), "described": len(ok), "seconds": seconds,
        "units_per_hour": 3600 * len(recs) / seconds,
        "tokens_per_s": (usage["prompt_tokens"] + usage["completion_tokens"]) / seconds,
        "generated_tokens_per_unit": usage["completion_tokens"] / max(len(recs), 1),
        "simulator_forwards_per_unit": usage["forwards"] / max(len(ok), 1),
        "scoring_windows_per_unit": sims * windows / max(len(ok), 1),
        "simulator_forwards_per_window": usage["forwards"] / max(sims * windows, 1),
        "seconds_per_unit": seconds / max(len(recs), 1),
    }
    print_figures(figures)
    return figures


if __name__ == "__main__":
    main()
