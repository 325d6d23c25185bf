"""Describe and score one unit in a few lines (the Python API of tools/describe/api.py).

    python docs/describe_one_unit.py                              # a planted unit, baseline
    python docs/describe_one_unit.py --local                      # ... and the embedded SmolLM2
    python docs/describe_one_unit.py --features runs/demo/features/neurons/features.jsonl --index 7 --local

Without --features it plants a unit that fires on " king" (tools/describe/synthetic.py), so the
script runs anywhere; with it, any unit of a features stage's output.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere in the checkout

from tools.describe.api import describe_unit, load_local  # noqa: E402
from tools.describe.synthetic import contexts, fires_on, unit_record  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--features", type=Path, help="a features.jsonl")
    ap.add_argument("--index", type=int, default=0)
    ap.add_argument("--local", action="store_true", help="also describe with the embedded SmolLM2")
    ap.add_argument("--data-dir", default="data", help="where the embedded model is converted once")
    args = ap.parse_args()
    if args.features:  # 1. one unit's record from the features stage
        unit = next(json.loads(ln) for ln in args.features.open() if json.loads(ln)["index"] == args.index)
    else:
        unit = unit_record(0, contexts(200, 33, seed=0), fires_on(" king"), seed=0, bins=3)
    # 2. describe and score it (baseline explainer + lexical simulator, no model needed)
    rec = describe_unit(unit)
    print("baseline:", rec["description"], {k: v for k, v in rec["scores"].items() if v is not None})
    if args.local:  # 3. the same with an in-process LLM (explainer + all-at-once simulator)
        lm = load_local(embedded="smollm2-135m-instruct", data_dir=args.data_dir)
        rec = describe_unit(unit, lm=lm, explain_top=6, explain_per_bin=0, other=rec["description"])
        print("llm:", rec["description"], {k: v for k, v in rec["scores"].items() if v is not None})
        print("controls:", rec["controls"])


if __name__ == "__main__":
    main()
