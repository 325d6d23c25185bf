"""Throughput of the top-activation pass against the bare forward + SAE encode it is built on.

    python -m tools.bench.top_activations [--features 4096] [--tokens 262144] [--device auto]

Same tokens, same batches, three timings: (a) `model.mlp_acts` + `sae.encode` alone (the least any
pass must do), (b) `sae.encode` alone on activations computed beforehand, (c) the full scan of
`tools.top_activations` (forward, encode and every running statistic). Reports tokens/s and the
ratio c/a (goal >= 0.8). The model is a random 1-layer GPT (d_model 128, d_mlp 512, block 128) and
the SAE random with per-feature thresholds set for ~1% density, so the sparse bookkeeping sees a
realistic load. Window/example building afterwards is not part of the pass timed here.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from autoencoder.saes import SAEModelConfig, build_sae
from tools.core.config import resolve_device
from tools.features import config as fconf
from tools.features import one_pass
from tools.features import source as fsource
from transformer.model import GPT, GPTConfig


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--features", type=int, default=4096)
    ap.add_argument("--tokens", type=int, default=262_144)
    ap.add_argument("--batch-tokens", type=int, default=16_384)
    ap.add_argument("--block", type=int, default=128)
    ap.add_argument("--density", type=float, default=0.01, help="target firing rate of the random SAE")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--repeats", type=int, default=3, help="best of this many timings each")
    args = ap.parse_args(argv)
    device = resolve_device(args.device)
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=args.block, n_embd=128, n_head=4, vocab_size=50304)).to(device).eval()
    sae = build_sae(SAEModelConfig(architecture="standard", d_in=model.config.d_mlp, d_sae=args.features))
    sae = sae.to(device).eval()
    T = args.block
    n_ctx = args.tokens // T
    tokens = np.random.default_rng(0).integers(0, 50257, n_ctx * T).astype(np.uint16)
    B = max(1, args.batch_tokens // T)
    batches = [torch.from_numpy(tokens[c * T:min(c + B, n_ctx) * T].astype(np.int64)).view(-1, T).to(device)
               for c in range(0, n_ctx, B)]
    with torch.no_grad():  # thresholds for the target density, from the first batch
        pre = sae.pre_acts(model.mlp_acts(batches[0], 0).reshape(-1, model.config.d_mlp))
        sae.b_enc -= torch.quantile(pre[:4096], 1 - args.density, dim=0)
    inp = fsource.Inputs(model, sae, 0, tokens, T, n_ctx, args.features, {})
    fc = fconf.FeaturesConfig(batch_tokens=args.batch_tokens)
    n_tok = n_ctx * T

    def best(fn) -> float:
        times = []
        for _ in range(args.repeats):
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times.append(time.perf_counter() - t0)
        return n_tok / min(times)

    def bare() -> None:
        with torch.no_grad():
            for idx in batches:
                sae.encode(model.mlp_acts(idx, 0))

    with torch.no_grad():
        acts = [model.mlp_acts(idx, 0) for idx in batches]

    def encode_only() -> None:
        with torch.no_grad():
            for x in acts:
                sae.encode(x)

    bare(), encode_only()  # warm-up
    a = best(bare)
    b = best(encode_only)
    c = best(lambda: one_pass.scan(inp, fc, 0, device))
    state, _ = one_pass.scan(inp, fc, 0, device)
    density = float(state.count.sum()) / (n_tok * args.features)
    out = {"device": device, "features": args.features, "tokens": n_tok, "batch_tokens": args.batch_tokens,
           "measured_density": round(density, 4),
           "forward_plus_encode_tok_s": round(a), "encode_only_tok_s": round(b), "scan_tok_s": round(c),
           "ratio_scan_vs_forward_plus_encode": round(c / a, 3), "ratio_scan_vs_encode_only": round(c / b, 3)}
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
