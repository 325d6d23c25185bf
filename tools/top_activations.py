"""Top activations of every SAE feature (or MLP neuron) over held-out text, and the feature site.

`python -m tools.top_activations run_dir=runs/demo [features.unit=neuron]` streams the val split
through the model (and the SAE) once, in batches, keeping per unit only running statistics whose
size does not grow with the tokens scanned:

* top-k contexts by their max activation (one running top-k of [units, k]);
* an exact activation histogram: 64 equal-width bins over [0, R], R a power of two >= the running
  max; when the max passes R, R doubles and adjacent bins merge (counts stay exact);
* a uniform sample of firing tokens per histogram bin (bottom-m random keys, merged the same way),
  from which the quantile-bin examples are drawn at the end. Bins are **equal-width** over
  (0, max_act] (as in Anthropic 2023's activation intervals); each example is drawn uniformly from
  the firing tokens whose activation falls in the bin (weights = bin count / sampled, so partially
  covered histogram bins are not over-represented), preferring contexts not already shown;
* negatives for scoring, contexts where the unit stays at or below `negative_frac` x its own
  final max activation: a uniform sample of the contexts where it never fires (kept per unit, over
  the whole scan; an SAE feature's usual negatives), topped up at the end from a uniform sample of
  candidate contexts shared by all units, whose per-context max of every unit is kept ([candidates
  x units]), since the threshold is known only once the pass is over. A GELU neuron is almost never
  <= 0 over a whole context, so its negatives come from the candidates;
* density (fraction of tokens with activation > 0) and the mean activation over firing tokens.

Windows (`window` tokens each side, shifted to stay inside the context so every window has the
same length) are then recomputed for the chosen contexts only. Logit effects are the direct path
of a unit's output direction: decoder row (SAE) or W_out column (neuron) through c_proj, the final
LayerNorm's scale, and W_U. This ignores LayerNorm centering and normalisation (and any later
layers), as the "logit weights" of Anthropic (2023) and sae_vis do.

Writes `run_dir/features/<name>/{features.jsonl, meta.json, site/}` (docs/formats.md).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from tqdm.auto import tqdm

from transformer import guard
from transformer.config import UserError, resolve_device, stage_main, typed
from transformer.files import atomic_path, config_hash, read_json, sha256_file, write_json

FORMAT_META = "monosemantic.features/1"
HIST_BINS = 64  # internal histogram resolution (see the module docstring)
UNITS = ("sae", "neuron")
NEGATIVES = ("contexts whose max activation is <= {frac} x the unit's max_act: first a uniform sample of "
             "the contexts where the unit never fires (> 0 nowhere), then, if fewer than n_random, random "
             "contexts under the threshold among {cand} candidate contexts sampled uniformly up front")


@dataclass
class FeaturesConfig:
    unit: str = "sae"  # sae | neuron (the MLP's own neurons)
    sae: str | None = None  # folder name under run_dir/sae; null = the only one there
    layer: int = 0  # neurons: which layer's MLP (an SAE uses the layer of its hook_name)
    split: str = "val"  # token split scanned (held-out text, not the SAE's training rows)
    contexts: int | None = None  # contexts scanned; null = every whole context in the split
    context_len: int | None = None  # tokens per context; null = the model's block_size
    batch_tokens: int = 16384  # tokens per forward pass (rounded down to whole contexts)
    top_k: int = 20  # top contexts per unit, by max activation
    bins: int = 10  # equal-width activation bins over (0, max_act]
    per_bin: int = 5  # examples per bin
    n_random: int = 20  # random negative contexts (max activation <= negative_frac x the unit's max)
    negative_frac: float = 0.1  # a context is a negative when its max is <= this x the unit's max_act
    negative_candidates: int = 512  # contexts sampled up front whose per-unit max is kept (top-up negatives)
    window: int = 32  # tokens on each side of the hit
    logit_k: int = 10  # top positive and negative logit effects
    unit_chunk: int = 1024  # units whose examples are built together (bounds memory)
    pages: list[int] | None = None  # feature pages to render; null = all (the index lists all)
    dtype: str = "float32"  # float32 | bfloat16 (CUDA) for the model + SAE forward

    def check(self) -> FeaturesConfig:
        if self.unit not in UNITS:
            raise UserError(f"features.unit must be one of {list(UNITS)}, not {self.unit!r}")
        for key in ("batch_tokens", "top_k", "bins", "per_bin", "logit_k", "unit_chunk"):
            if getattr(self, key) < 1:
                raise UserError(f"features.{key} must be >= 1, got {getattr(self, key)}")
        for key in ("n_random", "window", "layer", "negative_candidates"):
            if getattr(self, key) < 0:
                raise UserError(f"features.{key} must be >= 0, got {getattr(self, key)}")
        for key in ("contexts", "context_len"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise UserError(f"features.{key} must be >= 1 or null, got {getattr(self, key)}")
        if not 0 <= self.negative_frac < 1:
            raise UserError(f"features.negative_frac must be in [0, 1), got {self.negative_frac}")
        if self.dtype not in ("float32", "bfloat16"):
            raise UserError(f"features.dtype must be float32 or bfloat16, not {self.dtype!r}")
        return self


def section(cfg: DictConfig) -> FeaturesConfig:
    return typed(cfg.get("features", {}), FeaturesConfig, "features").check()


def unit_name(cfg: DictConfig) -> str:
    """Folder name under run_dir/features and run_dir/descriptions: "neurons", or the SAE's name."""
    fc = section(cfg)
    if fc.unit == "neuron":
        return "neurons"
    sae_root = Path(cfg.run_dir) / "sae"
    if fc.sae is not None:
        if not (sae_root / fc.sae).is_dir():
            names = _sae_names(sae_root)
            raise UserError(f"features.sae={fc.sae!r}: no folder {sae_root / fc.sae} "
                            f"(SAEs there: {names or 'none'})")
        return fc.sae
    names = _sae_names(sae_root)
    if not names:
        raise UserError(f"no SAE found under {sae_root} "
                        "(run autoencoder.train first, or use features.unit=neuron)")
    if len(names) > 1:
        raise UserError(f"several SAEs under {sae_root}: {names}; choose one with features.sae=NAME")
    return names[0]


def _sae_names(root: Path) -> list[str]:
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and (p / "cfg.json").is_file())


# ---- the running statistics ----------------------------------------------------------------------
@dataclass
class ScanState:
    """Per-unit running statistics; every tensor is O(units x (k + bins)), none grows with tokens."""

    n_units: int
    top_k: int
    per_bin: int
    n_random: int
    device: str
    seed: int
    nonneg: bool = False  # activations are never negative (SAE features): skips the f > 0 pass
    n_ctx: int = 0  # contexts the scan will see (candidates are drawn from 0 .. n_ctx - 1)
    candidates: int = 0  # candidate negative contexts whose per-unit max is kept
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        F, k, G, m, dev = self.n_units, self.top_k, HIST_BINS, self.per_bin, self.device
        inf = math.inf
        self.tensors = dict(
            total=torch.zeros(F, dtype=torch.float64, device=dev),
            maxv=torch.zeros(F, device=dev),
            scale=torch.zeros(F, device=dev),  # R, a power of two; 0 until the unit first fires
            hist=torch.zeros(F, G, dtype=torch.int64, device=dev),
            top_v=torch.zeros(F, k, device=dev),
            top_c=torch.full((F, k), -1, dtype=torch.int64, device=dev),
            top_p=torch.zeros(F, k, dtype=torch.int64, device=dev),
            res_key=torch.full((F * G * m,), inf, device=dev),  # [unit, bin, slot] flattened
            res_act=torch.zeros(F * G * m, device=dev),
            res_tok=torch.zeros(F * G * m, dtype=torch.int64, device=dev),  # ctx * T + pos
            neg_key=torch.full((F, self.n_random), inf, device=dev),
            neg_c=torch.full((F, self.n_random), -1, dtype=torch.int64, device=dev),
            # candidate negatives: fixed-size rows (unused ones have ctx -1), O(candidates x units)
            cand_ctx=torch.full((self.candidates,), -1, dtype=torch.int64, device=dev),
            cand_max=torch.zeros(self.candidates, F, device=dev),
        )
        self._cand = candidate_contexts(self.n_ctx, self.candidates, self.seed)
        self.tensors["cand_ctx"][:len(self._cand)] = torch.from_numpy(self._cand).to(dev)
        self.gen = torch.Generator(device=dev).manual_seed(self.seed)

    def __getattr__(self, name: str) -> torch.Tensor:
        tensors = self.__dict__.get("tensors", {})
        if name in tensors:
            return tensors[name]
        raise AttributeError(name)

    @torch.no_grad()
    def update(self, f: torch.Tensor, ctx0: int) -> None:
        """Fold in one batch of activations f [B, T, units] of contexts ctx0 .. ctx0 + B - 1."""
        s = self.tensors
        B, T, F = f.shape
        self.T = T
        f = f.float()
        cmax = f.amax(dim=1)  # [B, F]
        newmax = cmax.amax(0)
        if not torch.isfinite(newmax).all():
            raise UserError(f"non-finite activations in contexts {ctx0}..{ctx0 + B - 1} "
                            "(NaN/Inf in the model or SAE weights)")
        # running top-k of contexts by their max activation; the argmax position is looked up
        # only for the (few) contexts that enter a top-k; only units whose k-th best is beaten merge
        k = self.top_k
        cand = (newmax > s["top_v"][:, -1]).nonzero().squeeze(1)
        if cand.numel():
            tv, ti = torch.cat([s["top_v"][cand], cmax.index_select(1, cand).t()], 1).topk(k, dim=1)
            fresh, old = ti >= k, ti.clamp(max=k - 1)
            top_c = torch.where(fresh, ti - k + ctx0, s["top_c"][cand].gather(1, old))
            top_p = s["top_p"][cand].gather(1, old)
        # random non-firing contexts: bottom-n random keys over the contexts where the unit is silent
        if self.n_random:
            n = self.n_random
            key = torch.rand(B, F, generator=self.gen, device=f.device)
            key.masked_fill_(cmax > 0, math.inf)
            neg = (key.amin(0) < s["neg_key"][:, -1]).nonzero().squeeze(1)
            if neg.numel():
                nk, ni = torch.cat([s["neg_key"][neg], key.index_select(1, neg).t()], 1).topk(
                    n, dim=1, largest=False)
                kept = s["neg_c"][neg].gather(1, ni.clamp(max=n - 1))
                s["neg_c"][neg] = torch.where(ni >= n, ni - n + ctx0, kept)
                s["neg_key"][neg] = nk
        # candidate negatives in this batch: keep their per-unit max (the threshold is known at the end)
        i0, i1 = np.searchsorted(self._cand, [ctx0, ctx0 + B])
        if i1 > i0:
            rows_c = torch.from_numpy(self._cand[i0:i1] - ctx0).to(f.device)
            s["cand_max"][i0:i1] = cmax.index_select(0, rows_c)
        # firing tokens: counts, sums, histogram, per-bin samples
        flat = f.view(-1)
        # an SAE's f is >= 0, so its nonzeros are its firing tokens (one pass fewer than f > 0)
        lin = (flat.nonzero() if self.nonneg else (flat > 0).nonzero()).squeeze(1)
        acts = flat.index_select(0, lin)
        rows = torch.div(lin, F, rounding_mode="floor")
        cols = lin - rows * F
        # where each context's max is (for the contexts entering a top-k): found among the nonzeros
        bf = torch.div(rows, T, rounding_mode="floor") * F + cols
        at_max = (acts == cmax.view(-1).index_select(0, bf)).nonzero().squeeze(1)
        argpos = torch.zeros(B * F, dtype=torch.int64, device=f.device)
        argpos[bf.index_select(0, at_max)] = rows.index_select(0, at_max) % T
        if cand.numel():
            top_p = torch.where(fresh, argpos.view(B, F)[(ti - k).clamp(min=0), cand[:, None]], top_p)
            s["top_v"][cand], s["top_c"][cand], s["top_p"][cand] = tv, top_c, top_p
        s["total"] += torch.bincount(cols, weights=acts.double(), minlength=F)
        s["maxv"] = torch.maximum(s["maxv"], newmax)
        grow = newmax > s["scale"]
        if grow.any():
            self._grow(grow.nonzero().squeeze(1), newmax)
        G = HIST_BINS
        b = (acts / s["scale"].index_select(0, cols) * G).long().clamp_(max=G - 1)
        group = cols * G + b
        s["hist"].view(-1).add_(torch.bincount(group, minlength=F * G))
        n = acts.shape[0]
        # one uniform draw gives both the slot (integer part of u*m) and the key (fractional part)
        u = torch.rand(n, generator=self.gen, device=f.device) * self.per_bin
        slot = u.long().clamp_(max=self.per_bin - 1)
        self._sample(group * self.per_bin + slot, u - slot, acts, ctx0 * T + rows)

    def _grow(self, units: torch.Tensor, newmax: torch.Tensor) -> None:
        """Raise R to the next power of two >= the new max, merging bins 2^d at a time."""
        s, G, m = self.tensors, HIST_BINS, self.per_bin
        old = s["scale"][units]
        target = torch.exp2(torch.ceil(torch.log2(newmax[units].clamp_min(1e-30))))
        fresh = old == 0
        shift = torch.where(fresh, torch.zeros_like(old), torch.log2(target / old.clamp_min(1e-30)))
        shift = shift.round().long().clamp_(min=0, max=62)
        s["scale"][units] = torch.where(fresh, target, old * torch.exp2(shift.float()))
        F = self.n_units
        keys, acts, toks = (s[k].view(F, G, m) for k in ("res_key", "res_act", "res_tok"))
        for d in shift[shift > 0].clamp(max=int(math.log2(G))).unique().tolist():
            # bins merge 2^d at a time (bin i -> i >> d); slot s of a merged bin keeps the
            # smallest key among the merged bins' slot s, so it is still a uniform draw
            sel = units[(shift.clamp(max=int(math.log2(G))) == d)]
            n, g2, w = sel.numel(), G >> d, 1 << d
            h = s["hist"][sel].view(n, g2, w).sum(2)
            s["hist"][sel] = torch.cat([h, torch.zeros(n, G - g2, dtype=h.dtype, device=h.device)], 1)
            k, a, t = (x[sel].view(n, g2, w, m) for x in (keys, acts, toks))
            kmin, arg = k.min(2)
            arg = arg[:, :, None]
            pad = (n, G - g2, m)
            keys[sel] = torch.cat([kmin, torch.full(pad, math.inf, device=k.device)], 1)
            acts[sel] = torch.cat([a.gather(2, arg).squeeze(2), torch.zeros(pad, device=k.device)], 1)
            toks[sel] = torch.cat([t.gather(2, arg).squeeze(2),
                                   torch.zeros(pad, dtype=t.dtype, device=k.device)], 1)

    def _sample(self, slot: torch.Tensor, key: torch.Tensor, act: torch.Tensor, tok: torch.Tensor) -> None:
        """Each (unit, histogram bin) has m slots; every firing token goes to one slot at random and
        a slot keeps the token with the smallest random key sent to it. So each slot holds a
        uniform draw from its bin's tokens, the m slots hold distinct tokens, and every token of a
        bin is equally likely to be kept: a uniform sample, with scatter-min instead of a sort."""
        s = self.tensors
        if slot.numel() == 0:
            return
        # (one nonzero + index_select per filter: boolean-mask indexing would redo the nonzero per array)
        keep = (key < s["res_key"].index_select(0, slot)).nonzero().squeeze(1)  # few, once slots fill
        slot, key, act, tok = (x.index_select(0, keep) for x in (slot, key, act, tok))
        s["res_key"].scatter_reduce_(0, slot, key, reduce="amin", include_self=True)
        won = (key == s["res_key"].index_select(0, slot)).nonzero().squeeze(1)
        slot = slot.index_select(0, won)
        s["res_act"][slot] = act.index_select(0, won)
        s["res_tok"][slot] = tok.index_select(0, won)

    @property
    def count(self) -> torch.Tensor:
        """Firing tokens per unit (the histogram is exact, so its total is the count)."""
        return self.tensors["hist"].sum(1)

    def numpy(self) -> dict[str, np.ndarray]:
        out = {k: v.cpu().numpy() for k, v in self.tensors.items()}
        out["count"] = self.count.cpu().numpy()
        out["T"] = np.array(getattr(self, "T", 1))
        out["seed"] = np.array(self.seed)
        return out


def candidate_contexts(n_ctx: int, n: int, seed: int) -> np.ndarray:
    """A uniform sample (without replacement, sorted) of min(n, n_ctx) context indices; Floyd's
    algorithm in numpy's choice keeps this O(n), not O(n_ctx)."""
    n = min(n, n_ctx)
    if n <= 0:
        return np.zeros(0, dtype=np.int64)
    return np.sort(np.random.default_rng([seed, 1]).choice(n_ctx, size=n, replace=False)).astype(np.int64)


def pick_negatives(st: dict[str, np.ndarray], u: int, n_random: int, frac: float,
                   rng: np.random.Generator) -> tuple[list[int], list[int]]:
    """Up to n_random contexts whose max is <= frac x the unit's max_act: (never-firing contexts
    sampled over the whole scan, uniform among those; then, if fewer, random candidate contexts
    under the threshold, uniform among the candidates that qualify, drawn with `rng`)."""
    if n_random == 0:
        return [], []
    negs = [int(c) for c in st["neg_c"][u][np.isfinite(st["neg_key"][u])]]
    need = n_random - len(negs)
    extra: list[int] = []
    if need > 0 and st["cand_ctx"].size:
        thr = frac * max(float(st["maxv"][u]), 0.0)
        ok = (st["cand_ctx"] >= 0) & (st["cand_max"][:, u] <= thr)
        taken = set(negs)
        pool = np.array([c for c in st["cand_ctx"][ok].tolist() if c not in taken], dtype=np.int64)
        if pool.size:
            extra = [int(c) for c in rng.choice(pool, size=min(need, pool.size), replace=False)]
    return negs, extra


# ---- choosing the examples ------------------------------------------------------------------------
def hist_record(hist: np.ndarray, scale: float, maxv: float) -> dict[str, list]:
    """Equal-width histogram of positive activations, trimmed to the bins up to the max."""
    if maxv <= 0 or scale <= 0:
        return {"edges": [], "counts": []}
    width = scale / HIST_BINS
    n = min(HIST_BINS, max(1, math.ceil(maxv / width)))
    edges = [_sig(i * width) for i in range(n + 1)]
    return {"edges": edges, "counts": [int(c) for c in hist[:n]]}


def quantile_picks(st: dict[str, np.ndarray], u: int, bins: int, per_bin: int, shown: set[int],
                   rng: np.random.Generator) -> list[tuple[float, float, int, list[tuple[int, int]]]]:
    """Per equal-width bin over (0, max]: (lo, hi, estimated firing tokens, [(ctx, pos)])."""
    maxv = float(st["maxv"][u])
    if maxv <= 0:
        return []
    G, T = HIST_BINS, int(st["T"])
    m = st["res_key"].shape[0] // (st["hist"].shape[0] * G)
    sl = slice(u * G * m, (u + 1) * G * m)
    keys = st["res_key"][sl].reshape(G, m)
    ok = np.isfinite(keys)
    fine = np.broadcast_to(np.arange(G)[:, None], keys.shape)[ok]
    stored = ok.sum(1)
    weight = st["hist"][u][fine] / np.maximum(stored[fine], 1)  # inverse inclusion probability
    act, tok = st["res_act"][sl].reshape(G, m)[ok], st["res_tok"][sl].reshape(G, m)[ok]
    ctx, pos = tok // T, tok % T
    # Efraimidis & Spirakis (2006): the largest u^(1/w) is a weighted sample without replacement
    es = np.log(rng.random(act.shape[0])) / np.maximum(weight, 1e-12)
    out = []
    taken = set(shown)
    for i in range(bins):
        lo, hi = maxv * i / bins, maxv * (i + 1) / bins
        inbin = (act > lo) & (act <= hi) if i < bins - 1 else (act > lo)
        idx = np.nonzero(inbin)[0]
        idx = idx[np.argsort(-es[idx], kind="stable")]
        fresh = [j for j in idx if int(ctx[j]) not in taken]
        chosen = (fresh + [j for j in idx if int(ctx[j]) in taken])[:per_bin]
        taken.update(int(ctx[j]) for j in chosen)
        est = float(weight[idx].sum())
        out.append((lo, hi, int(round(est)), [(int(ctx[j]), int(pos[j])) for j in chosen]))
    return out


# ---- inputs ------------------------------------------------------------------------------------------
@dataclass
class Inputs:
    model: Any
    sae: Any | None
    layer: int
    tokens: np.ndarray  # the split, memory-mapped
    T: int  # tokens per context
    n_ctx: int  # contexts scanned
    n_units: int
    files: dict[str, str]  # input files -> sha256 (for done())


def _token_file(cfg: DictConfig, fc: FeaturesConfig) -> Path:
    name = cfg.get("data", {}).get("name", None)
    if not name:
        raise UserError("config key `data.name` is missing (which tokenized dataset to read)")
    path = Path(cfg.data_dir) / name / f"{fc.split}.bin"
    if not path.is_file():
        raise UserError(f"features.split={fc.split!r}: token file {path} not found (run transformer.prepare)")
    return path


def _sae_layer(hook: str) -> int:
    parts = hook.split(".")
    if len(parts) >= 2 and parts[0] == "blocks" and parts[1].isdigit():
        return int(parts[1])
    raise UserError(f"SAE hook_name {hook!r} is not of the form blocks.<layer>.mlp.hook_post")


def load_inputs(cfg: DictConfig, fc: FeaturesConfig, name: str, device: str) -> Inputs:
    from autoencoder.sae import load_sae
    from transformer.model import load_model

    run_dir = Path(cfg.run_dir)
    model = load_model(run_dir / "transformer", device)
    d_mlp = model.config.d_mlp
    files = {"model": str(run_dir / "transformer" / "model.safetensors")}
    sae = None
    if fc.unit == "sae":
        sae_dir = run_dir / "sae" / name
        sae = load_sae(sae_dir, device)
        if sae.cfg.d_in != d_mlp:
            raise UserError(f"SAE {sae_dir} has d_in={sae.cfg.d_in} but the model's MLP has d_mlp={d_mlp}")
        layer = _sae_layer(sae.cfg.hook_name)
        files["sae"] = str(sae_dir / "sae_weights.safetensors")
        n_units = sae.cfg.d_sae
    else:
        layer = fc.layer
        n_units = d_mlp
    if not 0 <= layer < model.config.n_layer:
        raise UserError(f"layer {layer} out of range for a {model.config.n_layer}-layer model")
    path = _token_file(cfg, fc)
    files["tokens"] = str(path)
    if path.stat().st_size % 2:
        raise UserError(f"{path}: size {path.stat().st_size} is not a whole number of uint16 tokens")
    tokens = np.memmap(path, dtype=np.uint16, mode="r")
    T = fc.context_len or model.config.block_size
    if T > model.config.block_size:
        raise UserError(f"features.context_len={T} exceeds the model's block_size {model.config.block_size}")
    avail = len(tokens) // T
    if avail == 0:
        raise UserError(f"{path} holds {len(tokens)} tokens, fewer than one context of {T}")
    n_ctx = min(fc.contexts or avail, avail)
    if fc.contexts and fc.contexts > avail:
        print(f"features.contexts={fc.contexts} but {path} holds {avail} contexts of {T}: scanning {avail}")
    if int(tokens[: n_ctx * T].max()) >= model.config.vocab_size:
        raise UserError(f"{path} has token ids >= the model's vocab_size {model.config.vocab_size}")
    if fc.pages is not None:
        bad = [i for i in fc.pages if not 0 <= i < n_units]
        if bad:
            raise UserError(f"features.pages has indices out of range {bad[:5]} (units are 0..{n_units - 1})")
    return Inputs(model, sae, layer, tokens, T, n_ctx, n_units, files)


class UnitActs:
    """Activations of the units from token ids: the forward pass the scan and the windows share."""

    def __init__(self, inp: Inputs, dtype: str):
        self.inp = inp
        self.autocast = dtype == "bfloat16"

    def mlp(self, idx: torch.Tensor) -> torch.Tensor:
        with torch.autocast(idx.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            return self.inp.model.mlp_acts(idx, self.inp.layer).float()

    @torch.no_grad()
    def all_units(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.mlp(idx)
        if self.inp.sae is None:
            return x
        with torch.autocast(idx.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            return self.inp.sae.encode(x).float()

    @torch.no_grad()
    def some_units(self, x: torch.Tensor, units: torch.Tensor) -> torch.Tensor:
        """x [E, L, d_mlp] windows, units [E] -> each window's activation of its own unit [E, L]."""
        sae = self.inp.sae
        if sae is None:
            return x.gather(2, units[:, None, None].expand(-1, x.shape[1], 1)).squeeze(2)
        if getattr(sae.cfg, "architecture", None) == "standard":  # ReLU(x̄ W_enc + b_enc), one column each
            w = sae.W_enc.t()[units]  # [E, d]
            pre = torch.einsum("eld,ed->el", x - sae.b_dec, w) + sae.b_enc[units][:, None]
            return torch.relu(pre)
        out = []
        for i in range(0, x.shape[0], 64):  # other architectures (e.g. top-k) need the full encode
            f = sae.encode(x[i:i + 64])
            out.append(f.gather(2, units[i:i + 64, None, None].expand(-1, f.shape[1], 1)).squeeze(2))
        return torch.cat(out)


# ---- logit effects -----------------------------------------------------------------------------------
@torch.no_grad()
def logit_effects(inp: Inputs, k: int, vocab: int, chunk: int = 512) -> tuple[np.ndarray, ...]:
    """Top-k positive and negative direct logit effects per unit: (pos_ids, pos_vals, neg_ids, neg_vals)."""
    model = inp.model
    block = model.transformer.h[inp.layer]
    W_out = block.mlp.c_proj.weight  # [n_embd, d_mlp]
    ln = model.transformer.ln_f.weight  # [n_embd]
    W_U = model.lm_head.weight[:vocab]  # [vocab, n_embd]; padding ids excluded
    k = min(k, vocab)
    res = ([], [], [], [])
    for i in range(0, inp.n_units, chunk):
        j = min(i + chunk, inp.n_units)
        if inp.sae is not None:
            d = inp.sae.W_dec[i:j].float()  # [c, d_mlp]
        else:
            d = torch.eye(W_out.shape[1], device=W_out.device)[i:j]
        logits = ((d @ W_out.t()) * ln) @ W_U.t()  # [c, vocab]
        pv, pi = logits.topk(k, dim=1)
        nv, ni = logits.topk(k, dim=1, largest=False)
        for lst, t in zip(res, (pi, pv, ni, nv), strict=True):
            lst.append(t.cpu().numpy())
    return tuple(np.concatenate(r) for r in res)


# ---- the stage -----------------------------------------------------------------------------------
def _hash_inputs(cfg: DictConfig, fc: FeaturesConfig, files: dict[str, str]) -> str:
    relevant = {k: v for k, v in asdict(fc).items() if k not in ("pages", "unit_chunk")}
    return config_hash({"features": relevant, "seed": int(cfg.seed),
                        "files": {k: sha256_file(v) for k, v in sorted(files.items())}})


def _out_dir(cfg: DictConfig) -> Path:
    return Path(cfg.run_dir) / "features" / unit_name(cfg)


def done(cfg: DictConfig) -> bool:
    """Complete when meta.json's hash matches this config and inputs, and the site exists."""
    try:
        fc = section(cfg)
        out = _out_dir(cfg)
        if not (out / "meta.json").is_file() or not (out / "features.jsonl").is_file():
            return False
        if not (out / "site" / "index.html").is_file():
            return False
        meta = read_json(out / "meta.json", "features meta")
        files = meta.get("inputs", {})
        if set(files) != ({"model", "tokens"} | ({"sae"} if fc.unit == "sae" else set())):
            return False
        if not all(Path(p).is_file() for p in files.values()):
            return False
        if (meta.get("config") or {}).get("pages") != fc.pages:
            return False
        return meta.get("config_hash") == _hash_inputs(cfg, fc, files)
    except UserError:
        return False


def _vocab_size(inp: Inputs, text) -> int:
    return min(inp.model.config.vocab_size, text.n_vocab)


def run(cfg: DictConfig) -> dict[str, Any]:
    out = _out_dir(cfg)
    with guard.output_lock(out, "tools.top_activations"):  # issue 13: lock (cleans leftovers), checksums
        result = _run(cfg)
        guard.seal(out, ["features.jsonl"], inputs=read_json(out / "meta.json").get("inputs"))
        return result


def _run(cfg: DictConfig) -> dict[str, Any]:
    from tools.html.site import render_site
    from tools.tokens import TokenText

    t0 = time.perf_counter()
    fc = section(cfg)
    name = unit_name(cfg)
    device = resolve_device(cfg.get("device", "auto"))
    run_dir = Path(cfg.run_dir)
    out = run_dir / "features" / name
    inp = load_inputs(cfg, fc, name, device)
    for role, p in inp.files.items():  # inputs intact, and a finished feature set replaced only on request
        guard.verify_sealed(Path(p).parent, [Path(p).name], role)
    chash = _hash_inputs(cfg, fc, inp.files)
    meta_path = out / "meta.json"
    guard.prepare_output(out, "feature set", marker="meta.json", sealed=["features.jsonl"],
                         old=read_json(meta_path).get("config_hash") if meta_path.is_file() else None,
                         new=chash, overwrite=bool(cfg.get("overwrite", False)))
    if meta_path.is_file() and (out / "features.jsonl").is_file() and \
            read_json(meta_path).get("config_hash") == chash:
        meta = read_json(meta_path)
        print(f"features for {name} are up to date; rebuilding the site only")
        if (meta.get("config") or {}).get("pages") != fc.pages:  # pages are not part of the hash
            meta["config"] = {**meta.get("config", {}), "pages": fc.pages}
            write_json(meta_path, meta)
    else:
        meta = scan_and_write(cfg, fc, name, inp, out, chash, TokenText())
    index = render_site(run_dir, name)
    secs = time.perf_counter() - t0
    print(f"features: {meta['n_units']} {'neurons' if fc.unit == 'neuron' else 'SAE features'} "
          f"({meta['alive']} alive) over {meta['tokens_scanned']:,} tokens -> {out / 'features.jsonl'}; "
          f"site {index} ({secs:.1f} s)")
    return {"name": name, "unit": fc.unit, "units": meta["n_units"], "alive": meta["alive"],
            "tokens_scanned": meta["tokens_scanned"], "scan_tokens_per_s": meta["scan_tokens_per_s"],
            "site": str(index)}


def scan(inp: Inputs, fc: FeaturesConfig, seed: int, device: str) -> tuple[ScanState, float]:
    """One pass over the contexts; returns the state and the tokens/s of the pass."""
    acts = UnitActs(inp, fc.dtype)
    state = ScanState(inp.n_units, min(fc.top_k, inp.n_ctx), fc.per_bin, fc.n_random, device, seed,
                      nonneg=inp.sae is not None, n_ctx=inp.n_ctx,
                      candidates=fc.negative_candidates if fc.n_random else 0)
    B = max(1, fc.batch_tokens // inp.T)
    t0 = time.perf_counter()
    bar = tqdm(range(0, inp.n_ctx, B), desc=f"scan ({inp.n_units} units)", unit="batch", leave=False)
    for c0 in bar:
        c1 = min(c0 + B, inp.n_ctx)
        idx = torch.from_numpy(np.asarray(inp.tokens[c0 * inp.T:c1 * inp.T], dtype=np.int64))
        idx = idx.view(c1 - c0, inp.T).to(device)
        state.update(acts.all_units(idx), c0)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return state, inp.n_ctx * inp.T / max(time.perf_counter() - t0, 1e-9)


def scan_and_write(cfg: DictConfig, fc: FeaturesConfig, name: str, inp: Inputs, out: Path, chash: str,
                   text) -> dict[str, Any]:
    device = resolve_device(cfg.get("device", "auto"))
    seed = int(cfg.seed)
    state, tok_per_s = scan(inp, fc, seed, device)
    st = state.numpy()
    vocab = _vocab_size(inp, text)
    pos_i, pos_v, neg_i, neg_v = logit_effects(inp, fc.logit_k, vocab)
    tokens_scanned = inp.n_ctx * inp.T
    rng = np.random.default_rng(seed)
    acts = UnitActs(inp, fc.dtype)
    L = min(2 * fc.window + 1, inp.T)
    F = inp.n_units
    density = st["count"] / tokens_scanned
    with atomic_path(out / "features.jsonl") as tmp, open(tmp, "w", encoding="utf-8") as fh:
        bar = tqdm(range(0, F, fc.unit_chunk), desc="examples", unit="chunk", leave=False)
        for u0 in bar:
            units = range(u0, min(u0 + fc.unit_chunk, F))
            plans = {u: plan_examples(st, u, fc, inp, rng) for u in units}
            wins = window_acts(plans, acts, inp, L, fc.window, device)
            texts: dict[tuple[int, int], tuple[list[int], list[str]]] = {}  # windows shared by units
            for u in units:
                rec = {
                    "index": u, "density": float(density[u]), "max_act": float(st["maxv"][u]),
                    "mean_act": float(st["total"][u] / st["count"][u]) if st["count"][u] else 0.0,
                    "hist": hist_record(st["hist"][u], float(st["scale"][u]), float(st["maxv"][u])),
                    "logits": {
                        "pos": [{"id": int(t), "str": text.single(int(t)), "value": _sig(v)}
                                for t, v in zip(pos_i[u], pos_v[u], strict=True)],
                        "neg": [{"id": int(t), "str": text.single(int(t)), "value": _sig(v)}
                                for t, v in zip(neg_i[u], neg_v[u], strict=True)]},
                    **build_examples(plans[u], wins, inp, text, L, fc.window, float(st["maxv"][u]), texts),
                }
                fh.write(_dumps(rec) + "\n")
    counts = st["count"]
    alive = int((counts > 0).sum())
    logd = np.log10(np.maximum(density, 1e-12))
    edges = np.linspace(-10, 0, 41)
    hist_counts = np.histogram(logd[counts > 0], bins=edges)[0] if alive else np.zeros(40, int)
    meta = {
        "format": FORMAT_META, "unit": fc.unit, "name": name, "n_units": F, "split": fc.split,
        "contexts": inp.n_ctx, "context_len": inp.T, "tokens_scanned": tokens_scanned,
        "window": fc.window, "top_k": fc.top_k,
        "bins": {"kind": "equal-width", "n": fc.bins, "per_bin": fc.per_bin,
                 "over": "(0, max_act] of firing-token activations; examples uniform within a bin"},
        "n_random": fc.n_random, "layer": inp.layer,
        "negatives": NEGATIVES.format(frac=fc.negative_frac, cand=min(fc.negative_candidates, inp.n_ctx)),
        "negative_frac": fc.negative_frac, "negative_candidates": min(fc.negative_candidates, inp.n_ctx),
        "hook_name": f"blocks.{inp.layer}.mlp.hook_post",
        "sae_metrics": _sae_metrics(cfg, name) if fc.unit == "sae" else None,
        "density_log10_histogram": {"edges": [float(e) for e in edges],
                                    "counts": [int(c) for c in hist_counts], "dead": F - alive},
        "alive": alive, "dead": F - alive,
        "logit_effects": "direct path: output direction @ c_proj, * ln_f scale, @ W_U "
                         "(ignores LayerNorm centering/normalisation and later layers)",
        "scan_tokens_per_s": round(tok_per_s, 1), "seed": seed,
        "inputs": inp.files, "config_hash": chash, "config": asdict(fc),
    }
    write_json(out / "meta.json", meta)
    return meta


def _sae_metrics(cfg: DictConfig, name: str) -> dict[str, Any] | None:
    scfg = read_json(Path(cfg.run_dir) / "sae" / name / "cfg.json", "SAE config")
    return scfg.get("metrics")


def _dumps(obj: Any) -> str:
    import json

    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


@dataclass
class Plan:
    """(ctx, pos in context) of each example of one unit, before windows are computed."""

    unit: int
    top: list[tuple[int, int]]
    quantiles: list[tuple[float, float, int, list[tuple[int, int]]]]
    random: list[tuple[int, int]]


def plan_examples(st: dict[str, np.ndarray], u: int, fc: FeaturesConfig, inp: Inputs,
                  rng: np.random.Generator) -> Plan:
    fired = st["top_v"][u] > 0
    top = [(int(c), int(p)) for c, p in zip(st["top_c"][u][fired], st["top_p"][u][fired], strict=True)]
    q = quantile_picks(st, u, fc.bins, fc.per_bin, {c for c, _ in top}, rng)
    # top-ups draw from their own per-unit stream, so units that need none (most SAE features) get
    # exactly the examples they got before negatives were topped up
    top_up = np.random.default_rng([int(st["seed"]), 2, u])
    negs, extra = pick_negatives(st, u, fc.n_random, fc.negative_frac, top_up)
    rand = [(c, int(rng.integers(inp.T))) for c in negs] + [(c, int(top_up.integers(inp.T))) for c in extra]
    return Plan(u, top, q, rand)


def _window_start(pos: int, T: int, L: int, w: int) -> int:
    return min(max(pos - w, 0), T - L)


def window_acts(plans: dict[int, Plan], acts: UnitActs, inp: Inputs, L: int, w: int,
                device: str) -> dict[tuple[int, int, int], np.ndarray]:
    """Activations of each example's own unit over its window, keyed by (unit, ctx, start)."""
    wanted: set[tuple[int, int, int]] = set()
    for u, p in plans.items():
        pairs = p.top + p.random + [cp for q in p.quantiles for cp in q[3]]
        wanted.update((u, c, _window_start(pos, inp.T, L, w)) for c, pos in pairs)
    items = sorted(wanted, key=lambda t: (t[1], t[2], t[0]))
    out: dict[tuple[int, int, int], np.ndarray] = {}
    if not items:
        return out
    ctxs = sorted({c for _, c, _ in items})
    B = 16
    by_ctx: dict[int, list[tuple[int, int, int]]] = {}
    for it in items:
        by_ctx.setdefault(it[1], []).append(it)
    for i in range(0, len(ctxs), B):
        group = ctxs[i:i + B]
        idx = torch.from_numpy(np.stack([np.asarray(inp.tokens[c * inp.T:(c + 1) * inp.T], dtype=np.int64)
                                         for c in group])).to(device)
        x = acts.mlp(idx)  # [b, T, d]
        its = [it for c in group for it in by_ctx[c]]
        local = {c: j for j, c in enumerate(group)}
        for s in range(0, len(its), 1024):
            part = its[s:s + 1024]
            ci = torch.tensor([local[c] for _, c, _ in part], device=device)
            st = torch.tensor([a for _, _, a in part], device=device)
            units = torch.tensor([u for u, _, _ in part], device=device)
            xw = x[ci[:, None], st[:, None] + torch.arange(L, device=device)[None, :]]  # [E, L, d]
            a = acts.some_units(xw, units).float().cpu().numpy()
            for it, row in zip(part, a, strict=True):
                out[it] = row
    return out


def _sig(x: float, digits: int = 5) -> float:
    """Round to significant digits (activation scales differ by orders of magnitude between units)."""
    return float(f"{float(x):.{digits}g}")


def build_examples(plan: Plan, wins: dict, inp: Inputs, text, L: int, w: int, maxv: float,
                   cache: dict[tuple[int, int], tuple[list[int], list[str]]]) -> dict[str, Any]:
    """The Example dicts of one unit (docs/formats.md); `cache` holds decoded windows by (ctx, start)."""
    T = inp.T
    # activations kept to ~4 significant digits of the unit's max (decimals, so zeros stay short)
    decimals = 4 if maxv <= 0 else min(12, max(2, 4 - math.floor(math.log10(maxv))))

    def example(u_key: int, ctx: int, pos: int) -> dict[str, Any]:
        start = _window_start(pos, T, L, w)
        if (ctx, start) not in cache:
            g = ctx * T + start
            ids = [int(t) for t in inp.tokens[g:g + L]]
            prefix = [int(t) for t in inp.tokens[max(0, g - 3):g]]
            cache[(ctx, start)] = (ids, text.strs(ids, prefix))
        ids, strs = cache[(ctx, start)]
        a = wins[(u_key, ctx, start)]
        acts = np.round(a.astype(np.float64), decimals).tolist()
        return {"ctx": ctx, "start": start, "pos": pos - start, "max": round(float(a.max()), decimals),
                "tokens": ids, "strs": strs, "acts": [0 if x == 0 else x for x in acts]}

    u = plan.unit
    return {
        "top": [example(u, c, p) for c, p in plan.top],
        "quantiles": [{"lo": _sig(lo, 7), "hi": _sig(hi, 7), "count": n,
                       "examples": [example(u, c, p) for c, p in ex]} for lo, hi, n, ex in plan.quantiles],
        "random": [example(u, c, p) for c, p in plan.random],
    }


main = stage_main(run)

if __name__ == "__main__":
    main()
