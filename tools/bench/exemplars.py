"""Exemplars for every MLP neuron of a model: one pass over all layers against the alternatives.

    python -m tools.bench.exemplars [--data-dir DIR] [--contexts 64] [--context-len 64] [--device auto]
    python -m tools.bench.exemplars --random-llama-8b --device cuda   # Llama-3.1-8B's shapes, bf16

Same tokens, same batches, four timings over every layer's neurons (both polarities):
(a) the features stage's one-pass scan of all layers (`tools.features.one_pass.scan_sets`: one forward
per batch, every layer's running state); (b) the same scan one layer per run, repeated for every
layer (each run pays the forward up to its layer); (c) Transluce's exemplar loop (observatory's
`compute_exemplars`), as their code does it: one layer per pass, and per batch each neuron's
per-sequence max and min concatenated onto the running top-k buffers of full sequences (their
activations and token ids kept per neuron) and `torch.topk` again; (d) a bare forward through all
layers, timed just before and just after (a). Prints `key=value` lines: tokens/s of each, the ratios
a/c and a/d, whether (a)'s states equal (b)'s tensor for tensor, and whether (a) and (c) agree on
every neuron's top-k contexts (same contexts, same order where values differ). `--project-tokens`
projects (a)'s hours for a job of that many tokens (Transluce's: 1M sequences x 95 tokens) on 1
and 8 GPUs.
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch

from tools.core.config import compose, resolve_device
from tools.features.config import FeaturesConfig
from tools.features.entries import warm_up
from tools.features.one_pass import scan_sets
from tools.features.source import Inputs
from transformer.subject import hook_point


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _subject(args: argparse.Namespace, device: str):
    if args.random_llama_8b:
        import transformers as tf

        from transformer.hf_subject import HFSubject
        from transformer.subject import SubjectSpec
        from transformer.subject_config import SubjectConfig

        cfg = tf.LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                             num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                             max_position_embeddings=8192)
        torch.manual_seed(0)
        with torch.device(device):
            model = tf.LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
        spec = SubjectSpec({"kind": "hf", "name": "random-llama-3.1-8b-shapes"}, 32, 8192, 128256)
        return HFSubject(model, SubjectConfig(kind="hf", model="random"), spec)
    from transformer.subject_load import load_subject

    cfg = compose(["subject=smollm2", f"data_dir={args.data_dir}", f"device={device}"])
    subject = load_subject(cfg, device)
    if args.dtype == "bfloat16":
        subject.model.to(torch.bfloat16)
    return subject


def transluce_layer(model, batches: list[torch.Tensor], layer: int, k: int) -> tuple[torch.Tensor, ...]:
    """One layer's exemplars as Transluce's loop keeps them (observatory,
    lib/activations/activations/exemplars_computation.py, `update_top_acts_and_starts`, read at their
    repository's newest snapshot): per batch and per polarity, the activations masked by the attention
    mask, each sequence's max (min) per neuron concatenated onto the running buffers (values, the
    kept sequences' activations, their token ids repeated per neuron, their dataset ids), `torch.topk`
    over the buffer and a gather of every buffer. Returns the top-k (max) and bottom-k (min) values
    and context indices [k, units]; the dataset id column holds the context index here."""
    hook = hook_point("neurons", layer)
    state: dict[bool, list[torch.Tensor] | None] = {True: None, False: None}
    c0 = 0
    for idx in batches:
        acts = model.capture(idx, [hook])[hook].float()  # [B, T, units]
        B, T, F = acts.shape
        mask = torch.ones(B, T, dtype=torch.bool, device=acts.device)  # no padding in these batches
        ids = idx[:, :, None].repeat(1, 1, F)  # each neuron's copy of the token ids
        ctx = torch.arange(c0, c0 + B, device=acts.device, dtype=torch.int32)[:, None].expand(B, F)
        for largest in (True, False):
            masked = acts.masked_fill(~mask[:, :, None], -math.inf if largest else math.inf)
            peak = masked.amax(1) if largest else masked.amin(1)  # [B, units]
            new = [peak, masked, ids, ctx]
            old = state[largest]
            buf = new if old is None else [torch.cat([a, b]) for a, b in zip(old, new, strict=True)]
            vals, top = buf[0].topk(min(k, buf[0].shape[0]), dim=0, largest=largest)
            seq = top[:, None, :].expand(-1, T, -1)
            state[largest] = [vals, buf[1].gather(0, seq), buf[2].gather(0, seq), buf[3].gather(0, top)]
        c0 += B
    (top_v, _, _, top_i), (bot_v, _, _, bot_i) = state[True], state[False]
    return top_v, top_i.long(), bot_v, bot_i.long()


def _same_topk(vals: torch.Tensor, ours: torch.Tensor, theirs: torch.Tensor) -> bool:
    """Whether two [units, k] context lists agree: the same contexts in the same order wherever the
    values differ (ties may come in either order). Only contexts where the unit's peak is above 0 are
    kept by the scan (the rest never enter a top-k), so only those are compared."""
    ours, theirs = ours.where(vals > 0, -1), theirs.where(vals > 0, -1)
    if torch.equal(ours, theirs):
        return True
    for u in (ours != theirs).any(1).nonzero().squeeze(1).tolist():
        v = vals[u].tolist()
        groups: dict[float, tuple[list[int], list[int]]] = {}
        for x, a, b in zip(v, ours[u].tolist(), theirs[u].tolist(), strict=True):
            groups.setdefault(x, ([], []))[0].append(a)
            groups[x][1].append(b)
        if any(sorted(a) != sorted(b) for a, b in groups.values()):
            return False
    return True


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default="data", help="holds the converted SmolLM2 (models/...)")
    ap.add_argument("--random-llama-8b", action="store_true", help="random, Llama-3.1-8B's shapes")
    ap.add_argument("--contexts", type=int, default=64)
    ap.add_argument("--context-len", type=int, default=64)
    ap.add_argument("--batch-tokens", type=int, default=512)
    ap.add_argument("--top-k", type=int, default=20)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default=None, help="float32 | bfloat16 (default: bfloat16 on CUDA)")
    ap.add_argument("--skip", default="", help="comma-separated parts to skip: b,c")
    ap.add_argument("--project-tokens", type=float, default=95e6)
    args = ap.parse_args(argv)
    device = resolve_device(args.device)
    args.dtype = args.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    model = _subject(args, device)
    L, T, n_ctx = model.n_layers, args.context_len, args.contexts
    tokens = np.random.default_rng(0).integers(0, model.vocab_size, n_ctx * T).astype(np.int64)
    B = max(1, args.batch_tokens // T)
    batches = [torch.from_numpy(tokens[c * T:min(c + B, n_ctx) * T]).view(-1, T).to(device)
               for c in range(0, n_ctx, B)]
    fc = FeaturesConfig(unit="neuron", batch_tokens=args.batch_tokens, top_k=args.top_k, dtype="float32")
    inps = [Inputs(model, None, layer, tokens, T, n_ctx, model.d_mlp, {}) for layer in range(L)]
    n_tok = n_ctx * T
    out: dict[str, float | str] = {"model": model.name, "device": device, "dtype": args.dtype, "layers": L,
                                   "neurons_per_layer": model.d_mlp, "tokens": n_tok}
    skip = set(args.skip.split(","))

    def timed(fn):
        _sync(device)
        t0 = time.perf_counter()
        r = fn()
        _sync(device)
        return r, time.perf_counter() - t0

    with torch.no_grad():
        model.capture(batches[0], [hook_point("neurons", 0)])  # warm-up
        if torch.device(device).type == "cpu":  # as ScanState's choice of the compiled loops
            warm_up()  # the scan's compiled loops (tools/features/entries.py), loaded once per process

        def bare() -> float:
            return timed(lambda: [model.capture(b, [hook_point("resid_post", L - 1)]) for b in batches])[1]

        # the bare forward just before and just after (a), so (a)/(d) is not a drift of the machine
        d_secs = bare()
        sides, secs = timed(lambda: scan_sets(inps, fc, 0, device, True)[0])
        d_secs = (d_secs + bare()) / 2
        out["d_bare_forward_tok_s"] = n_tok / d_secs
        out["a_one_pass_tok_s"] = n_tok / secs
        if "b" not in skip:
            runs, secs = timed(lambda: [scan_sets([inp], fc, 0, device, True)[0][0] for inp in inps])
            out["b_layer_per_run_tok_s"] = n_tok / secs
            # the one-pass states are the one-layer runs' states, tensor for tensor (so are their files)
            out["a_b_identical"] = str(all(torch.equal(x.tensors[key], y.tensors[key])
                                           for one, many in zip(runs, sides, strict=True)
                                           for x, y in zip(one, many, strict=True) for key in x.tensors))
        if "c" not in skip:
            same = True
            t_c = 0.0
            for layer, (pos, neg) in enumerate(sides):
                (_, ti, _, bi), secs = timed(lambda layer=layer: transluce_layer(model, batches, layer,
                                                                                 args.top_k))
                t_c += secs
                k = ti.shape[0]
                same &= _same_topk(pos.top_v[:, :k], pos.top_c[:, :k], ti.t())
                same &= _same_topk(neg.top_v[:, :k], neg.top_c[:, :k], bi.t())
            out["c_transluce_loop_tok_s"] = n_tok / t_c
            out["a_c_same_topk"] = str(bool(same))
    a = out["a_one_pass_tok_s"]
    out["ratio_a_over_d"] = a / out["d_bare_forward_tok_s"]
    if "b_layer_per_run_tok_s" in out:
        out["ratio_a_over_b"] = a / out["b_layer_per_run_tok_s"]
    if "c_transluce_loop_tok_s" in out:
        out["ratio_a_over_c"] = a / out["c_transluce_loop_tok_s"]
    out["projected_hours_1_gpu"] = args.project_tokens / a / 3600
    out["projected_hours_8_gpus"] = args.project_tokens / a / 3600 / 8
    for key, value in out.items():
        print(f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}", flush=True)
    return out


if __name__ == "__main__":
    main()
