"""Rows/s of `Dictionary.encode` for each format `load_dictionary` reads, beside the dense GEMM ceiling.

    python -m tools.bench.dictionary_encode            # d_in 2304, d_sae 16384 (Gemma Scope's width)
    python -m tools.bench.dictionary_encode --quick    # smoke run (seconds)

Each format's folder is written from random weights in that format's layout, loaded through
`load_dictionary`, and its `encode` timed on `--rows` rows; the ceiling is `x @ W_enc` alone into a
preallocated output (2·rows·d_in·d_sae FLOP), timed interleaved with the encode (ceiling, encode,
ceiling, ...) so that the ratio on one line is comparable on a shared machine. Medians over
`--repeats`. One `key=value` line per format, then a summary of `encode_rows_per_s[...]` and
`ratio_to_gemm[...]` lines.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--d-in", type=int, default=2304)
    p.add_argument("--d-sae", type=int, default=16384)
    p.add_argument("--rows", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    p.add_argument("--quick", action="store_true", help="d_in 64, d_sae 512, 64 rows, 2 repeats")
    a = p.parse_args(argv)
    if a.quick:
        a.d_in, a.d_sae, a.rows, a.repeats = 64, 512, 64, 2
    return a


def _saelens(arch: str, **extra: object) -> Callable[[Path, dict[str, torch.Tensor]], None]:
    def write(folder: Path, t: dict[str, torch.Tensor]) -> None:
        d_in, d_sae = t["W_enc"].shape
        tensors = {k: t[k] for k in ("W_enc", "W_dec", "b_dec")}
        if arch == "gated":
            tensors.update(b_gate=t["b_enc"], b_mag=t["b_enc"].clone(), r_mag=torch.zeros(d_sae))
        else:
            tensors["b_enc"] = t["b_enc"]
        if arch == "jumprelu":
            tensors["threshold"] = t["threshold"]
        save_file(tensors, str(folder / "sae_weights.safetensors"))
        meta = {"sae_lens_version": "6.54.0", "hook_name": "blocks.0.hook_resid_post"}
        cfg = {"architecture": arch, "d_in": d_in, "d_sae": d_sae, "apply_b_dec_to_input": True,
               "normalize_activations": "none", "metadata": meta, **extra}
        (folder / "cfg.json").write_text(json.dumps(cfg))
    return write


def _sparsify(folder: Path, t: dict[str, torch.Tensor]) -> None:
    d_in, d_sae = t["W_enc"].shape
    save_file({"encoder.weight": t["W_enc"].T.contiguous(), "encoder.bias": t["b_enc"], "W_dec": t["W_dec"],
               "b_dec": t["b_dec"]}, str(folder / "sae.safetensors"))
    (folder / "cfg.json").write_text(json.dumps({"d_in": d_in, "num_latents": d_sae, "k": 64}))


def _gemmascope(folder: Path, t: dict[str, torch.Tensor]) -> None:
    np.savez(folder / "params.npz", **{k: v.numpy() for k, v in t.items()})


def _dictionary_learning(folder: Path, t: dict[str, torch.Tensor]) -> None:
    d_in, d_sae = t["W_enc"].shape
    torch.save({"encoder.weight": t["W_enc"].T.contiguous(), "encoder.bias": t["b_enc"],
                "decoder.weight": t["W_dec"].T.contiguous(), "b_dec": t["b_dec"],
                "k": torch.tensor(64, dtype=torch.int), "threshold": torch.tensor(0.5)}, folder / "ae.pt")
    trainer = {"dict_class": "BatchTopKSAE", "activation_dim": d_in, "dict_size": d_sae, "k": 64, "layer": 0}
    (folder / "config.json").write_text(json.dumps({"trainer": trainer}))


FORMATS: dict[str, Callable[[Path, dict[str, torch.Tensor]], None]] = {
    "saelens_standard": _saelens("standard"),
    "saelens_topk": _saelens("topk", k=64),
    "saelens_topk_rescaled": _saelens("topk", k=64, rescale_acts_by_decoder_norm=True),
    "saelens_jumprelu": _saelens("jumprelu"),
    "saelens_gated": _saelens("gated"),
    "sparsify_topk": _sparsify,
    "gemmascope_v1": _gemmascope,
    "dictionary_learning_batchtopk": _dictionary_learning,
}


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    from autoencoder import load_dictionary

    a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    g = torch.Generator().manual_seed(0)
    t = {"W_enc": torch.randn(a.d_in, a.d_sae, generator=g) / a.d_in ** 0.5,
         "W_dec": torch.randn(a.d_sae, a.d_in, generator=g) / a.d_sae ** 0.5,
         "b_enc": torch.randn(a.d_sae, generator=g) * 0.1, "b_dec": torch.randn(a.d_in, generator=g) * 0.1,
         "threshold": torch.rand(a.d_sae, generator=g)}
    x = torch.randn(a.rows, a.d_in, generator=g)
    out = torch.empty(a.rows, a.d_sae)
    W_enc = t["W_enc"]
    print(f"device=cpu threads={torch.get_num_threads()} d_in={a.d_in} d_sae={a.d_sae} rows={a.rows} "
          f"repeats={a.repeats}", flush=True)
    summary = []
    for name, write in FORMATS.items():
        with tempfile.TemporaryDirectory(prefix="dict-bench-") as tmp:
            write(Path(tmp), t)
            d = load_dictionary(tmp)
        ceiling, encode = partial(torch.matmul, x, W_enc, out=out), partial(d.encode, x)
        with torch.no_grad():
            encode(), ceiling()
            gemm, enc = [], []
            for _ in range(a.repeats):
                gemm.append(timed(ceiling))
                enc.append(timed(encode))
            l0 = float((encode() != 0).sum(-1).float().mean())
        rows_enc, rows_gemm = a.rows / statistics.median(enc), a.rows / statistics.median(gemm)
        gflops = 2 * a.rows * a.d_in * a.d_sae / statistics.median(gemm) / 1e9
        print(f"format={name} architecture={d.architecture} encode_rows_per_s={rows_enc:.0f} "
              f"gemm_rows_per_s={rows_gemm:.0f} gemm_gflops={gflops:.1f} "
              f"ratio_to_gemm={rows_enc / rows_gemm:.3f} l0={l0:.1f}", flush=True)
        summary.append((name, rows_enc, rows_enc / rows_gemm))
        del d, encode
    for name, rows, _ in summary:
        print(f"encode_rows_per_s[{name}]={rows:.0f}")
    for name, _, ratio in summary:
        print(f"ratio_to_gemm[{name}]={ratio:.3f}")


if __name__ == "__main__":
    main()
