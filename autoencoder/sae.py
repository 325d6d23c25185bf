"""Sparse autoencoders behind one interface: encode, decode, forward, and the loss terms.

Two architectures, both with SAELens parameter names and shapes (`W_enc [d_in, d_sae]`,
`b_enc [d_sae]`, `W_dec [d_sae, d_in]`, `b_dec [d_in]`):

* `L1SAE` ("standard" in SAELens), Anthropic's "Towards Monosemanticity" (2023):
  x̄ = x − b_dec; f = ReLU(x̄ W_enc + b_enc); x̂ = f W_dec + b_dec;
  loss = mean over the batch of ‖x − x̂‖² + λ‖f‖₁.
* `TopKSAE` ("topk"), Gao et al. 2024 "Scaling and evaluating sparse autoencoders": keep the k
  largest pre-activations (then ReLU); an AuxK loss reconstructs the residual from the top
  `k_aux` dead latents so they keep receiving gradient.

Loss reductions are per row: the squared error is summed over d_in (`mse_reduction="sum"`, as in
the paper's ‖x − x̂‖²) or averaged (`"mean"`), then everything is averaged over the batch, so λ
means the same thing at every batch size (and under DDP). The trainer can divide the MSE term by
`mse_scale` and the L1 term by `l1_scale` (the input's squared norm and norm: a loss that does not
depend on the activations' scale); both default to 1, the papers' raw loss.

Artifacts are written by `save_sae` and read by `load_sae`; the folder also loads in `sae_lens`
(`SAE.load_from_disk`), see `saelens_cfg`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from tools.core.config import UserError

WEIGHTS_FILE = "sae_weights.safetensors"
CFG_FILE = "cfg.json"
SPARSITY_FILE = "sparsity.safetensors"
FORMAT = "monosemantic.sae/1"
PARAM_NAMES = ("W_enc", "b_enc", "W_dec", "b_dec")

# our config name -> SAELens architecture name
ARCHITECTURES = {"l1": "standard", "topk": "topk"}


@dataclass
class SAEModelConfig:
    """What is needed to rebuild the module (the training config lives in the trainer)."""

    architecture: str  # SAELens name: "standard" (L1) or "topk"
    d_in: int
    d_sae: int
    k: int | None = None  # topk only
    hook_name: str = "blocks.0.mlp.hook_post"
    dtype: str = "float32"

    def check(self) -> SAEModelConfig:
        if self.architecture not in ARCHITECTURES.values():
            raise UserError(f"SAE architecture must be one of {sorted(ARCHITECTURES.values())}, "
                            f"not {self.architecture!r}")
        if self.d_in < 1 or self.d_sae < 1:
            raise UserError(f"SAE d_in and d_sae must be >= 1, got d_in={self.d_in}, d_sae={self.d_sae}")
        if self.architecture == "topk":
            if self.k is None or not 1 <= self.k <= self.d_sae:
                raise UserError(f"topk SAE needs 1 <= k <= n_features, got k={self.k}, "
                                f"n_features={self.d_sae}")
        return self


@dataclass
class LossTerms:
    """One forward pass's outputs and loss terms (all losses already averaged over the batch)."""

    x_hat: torch.Tensor
    f: torch.Tensor
    mse: torch.Tensor
    sparsity: torch.Tensor  # λ-free L1 term for l1, the AuxK loss for topk
    overall: torch.Tensor
    extra: dict[str, torch.Tensor] = field(default_factory=dict)


def row_sq_error(x: torch.Tensor, x_hat: torch.Tensor, reduction: str) -> torch.Tensor:
    """Per-row squared error, summed or averaged over the feature dimension."""
    se = (x_hat.float() - x.float()).pow(2)
    if reduction == "sum":
        return se.sum(-1)
    if reduction == "mean":
        return se.mean(-1)
    raise UserError(f"sae.mse_reduction must be sum or mean, not {reduction!r}")


class SAE(nn.Module):
    """Shared parameters, initialisation and decoder-norm handling of every architecture."""

    def __init__(self, cfg: SAEModelConfig):
        super().__init__()
        self.cfg = cfg.check()
        d, F_ = cfg.d_in, cfg.d_sae
        self.W_enc = nn.Parameter(torch.empty(d, F_))
        self.b_enc = nn.Parameter(torch.zeros(F_))
        self.W_dec = nn.Parameter(torch.empty(F_, d))
        self.b_dec = nn.Parameter(torch.zeros(d))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Unit-norm random decoder rows; encoder = decoder transpose (Gao et al. 2024, Conerly et al.
        2024): every feature starts out reading the direction it writes."""
        w = torch.randn(self.cfg.d_sae, self.cfg.d_in, generator=generator)
        self.W_dec.copy_(w / w.norm(dim=1, keepdim=True))
        self.W_enc.copy_(self.W_dec.t())
        self.b_enc.zero_()
        self.b_dec.zero_()

    @torch.no_grad()
    def match_input_scale(self, x: torch.Tensor) -> float:
        """Scale W_enc so the reconstruction x̂ − b_dec of the rows `x` has the RMS norm of x − b_dec;
        returns the factor. With unit decoder rows and W_enc = W_decᵀ the first reconstruction of
        an L1 SAE is about d_sae / (2 d_in) times too large (each of the ~d_sae/2 firing features
        adds its projection); Gao et al. 2024 rescale the encoder and Conerly et al. 2024 start
        the decoder at norm 0.1 for the same reason. Here decoder rows stay unit norm (Anthropic
        2023), so the encoder takes the factor; the ReLU (and TopK) are positively homogeneous,
        so with b_enc = 0 one measured factor is exact."""
        x = x.to(self.W_dec.dtype)
        xbar = x - self.b_dec
        rec = self.decode(self.encode(x)) - self.b_dec
        num, den = float(xbar.pow(2).sum(-1).mean()), float(rec.pow(2).sum(-1).mean())
        factor = math.sqrt(num / den) if den > 0 and num > 0 else 1.0
        self.W_enc.mul_(factor)
        return factor

    # ---- the interface every SAE has -------------------------------------------------------
    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.b_dec) @ self.W_enc + self.b_enc

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return f @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    def loss(self, x: torch.Tensor, **kw: Any) -> LossTerms:
        raise NotImplementedError

    # ---- decoder unit norm (Anthropic 2023) ------------------------------------------------
    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Rescale every decoder row to unit norm (after each optimiser step)."""
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))

    @torch.no_grad()
    def remove_parallel_grad(self) -> None:
        """Drop the gradient component along each (unit) decoder row, before the step: with rows at
        unit norm, that component only changes the norm, which the renormalisation undoes, and Adam
        would otherwise spend its step size on it."""
        g = self.W_dec.grad
        if g is None:
            return
        w = self.W_dec
        g.sub_((g * w).sum(dim=1, keepdim=True) * w)

    def extra_repr(self) -> str:
        return f"architecture={self.cfg.architecture}, d_in={self.cfg.d_in}, d_sae={self.cfg.d_sae}"


class L1SAE(SAE):
    """Anthropic 2023: ReLU encoder, L1 penalty on the feature activations.

    `kernel` selects the training forward: "dense" (PyTorch autograd, the reference), "sparse"
    (`autoencoder.kernels.l1_sae_forward` forced onto its sparse path, which exploits the ReLU's
    zeros), or "auto" (the kernel picks sparse or dense GEMMs per batch from the measured density;
    plain autograd on CUDA). `encode`/`forward` (inference) are always the dense formula.
    """

    def __init__(self, cfg: SAEModelConfig, kernel: str = "dense"):
        super().__init__(cfg)
        if kernel not in ("dense", "sparse", "auto"):
            raise UserError(f"sae.kernel must be dense, sparse or auto, not {kernel!r}")
        self.kernel = kernel

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.pre_acts(x))

    def _sparse_forward(self):
        """The kernel's function when selected and available, else None (dense path)."""
        if self.kernel == "dense":
            return None
        try:
            from autoencoder.kernels import l1_sae_forward
        except ImportError as e:
            if self.kernel == "sparse":
                raise UserError(f"sae.kernel=sparse but autoencoder.kernels is unavailable ({e})") from e
            return None
        mode = "sparse" if self.kernel == "sparse" else "auto"
        return lambda x, *params: l1_sae_forward(x, *params, mode=mode)

    def train_forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_hat, f) for training: the fast kernel when chosen, numerically the dense formula."""
        fn = self._sparse_forward()
        if fn is not None and x.dim() == 2:
            return fn(x, self.W_enc, self.b_enc, self.W_dec, self.b_dec)
        f = self.encode(x)
        return self.decode(f), f

    def loss(self, x: torch.Tensor, *, l1_coeff: float, mse_reduction: str = "sum",
             mse_scale: float = 1.0, l1_scale: float = 1.0, **_: Any) -> LossTerms:
        x_hat, f = self.train_forward(x)
        mse = row_sq_error(x, x_hat, mse_reduction).mean()
        l1 = f.sum(-1, dtype=torch.float32).mean()  # f >= 0 (ReLU), so this is ‖f‖₁
        overall = mse / mse_scale + l1_coeff * l1 / l1_scale
        return LossTerms(x_hat=x_hat, f=f, mse=mse, sparsity=l1, overall=overall)


class TopKSAE(SAE):
    """Gao et al. 2024: z = ReLU(TopK(x̄ W_enc + b_enc)), with the AuxK loss for dead latents."""

    def topk_pre(self, pre: torch.Tensor, k: int) -> torch.Tensor:
        vals, idx = pre.topk(k, dim=-1, sorted=False)
        return torch.zeros_like(pre).scatter_(-1, idx, F.relu(vals))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.topk_pre(self.pre_acts(x), self.cfg.k)

    def loss(self, x: torch.Tensor, *, dead_mask: torch.Tensor | None = None, aux_k: int | None = None,
             aux_coeff: float = 1 / 32, mse_reduction: str = "sum", mse_scale: float = 1.0,
             batch_sum: Callable[[torch.Tensor], torch.Tensor] | None = None, **_: Any) -> LossTerms:
        pre = self.pre_acts(x)
        f = self.topk_pre(pre, self.cfg.k)
        x_hat = self.decode(f)
        mse = row_sq_error(x, x_hat, mse_reduction).mean()
        aux = self.aux_loss(x, x_hat, pre, dead_mask, aux_k, batch_sum)
        return LossTerms(x_hat=x_hat, f=f, mse=mse, sparsity=aux,
                         overall=mse / mse_scale + aux_coeff * aux)

    def aux_loss(self, x: torch.Tensor, x_hat: torch.Tensor, pre: torch.Tensor,
                 dead_mask: torch.Tensor | None, aux_k: int | None,
                 batch_sum: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """AuxK: the top `aux_k` dead latents reconstruct the main residual e = x − x̂ (no b_dec),
        as a normalised MSE: Σ‖e − ê‖² over the batch divided by Σ‖e − ē‖², the error of
        predicting the batch mean ē (Gao et al. 2024, `normalized_mse` in openai/sparse_autoencoder),
        so 1.0 is no better than the mean; scaled down when fewer than `aux_k` latents are dead
        (as SAELens does). Dimensionless, so mse_reduction does not enter. Under DDP `batch_sum`
        all-reduces the denominator's statistics, so each rank's term is its share of the global
        batch's normalised MSE (times the world size, undone by the gradient average)."""
        zero = pre.new_zeros(())
        if dead_mask is None or aux_k is None or aux_k < 1:
            return zero
        n_dead = int(dead_mask.sum())
        if n_dead == 0:
            return zero
        k = min(aux_k, n_dead)
        masked = torch.where(dead_mask, pre, torch.full_like(pre, -math.inf))
        z = self.topk_pre(masked, k)
        e = (x - x_hat).detach()
        e_hat = z @ self.W_dec
        e = e.float()
        num = (e_hat.float() - e).pow(2).sum()
        n = e.shape[0]
        stats = torch.cat([e.new_tensor([n, e.pow(2).sum()]), e.sum(0)])  # N, Σ‖e‖², Σe
        total = batch_sum(stats) if batch_sum is not None else stats
        den = (total[1] - total[2:].pow(2).sum() / total[0]).clamp_min(1e-12)  # Σ‖e − ē‖²
        return num * (total[0] / n) / den * min(n_dead / aux_k, 1.0)


def build_sae(cfg: SAEModelConfig, kernel: str = "dense") -> SAE:
    cfg.check()
    if cfg.architecture == "standard":
        return L1SAE(cfg, kernel=kernel)
    return TopKSAE(cfg)


@torch.no_grad()
def geometric_median(points: torch.Tensor, max_iter: int = 100, tol: float = 1e-6,
                     eps: float = 1e-8) -> torch.Tensor:
    """The point minimising the sum of Euclidean distances to `points` [n, d] (Weiszfeld 1937).

    Starts at the mean and re-weights every point by 1 / its distance; stops when the estimate
    moves less than `tol` relative to its norm. Anthropic (2023) and Gao et al. (2024) start b_dec
    here: unlike the mean it is not dragged by the heavy tail of activation norms.
    """
    x = points.double()
    y = x.mean(0)
    for _ in range(max_iter):
        w = 1.0 / (x - y).norm(dim=1).clamp_min(eps)
        y_new = (w[:, None] * x).sum(0) / w.sum()
        moved = (y_new - y).norm()
        y = y_new
        if moved <= tol * max(y.norm().item(), 1.0):
            break
    return y.to(points.dtype)


# ---- files -----------------------------------------------------------------------------------
def saelens_cfg(cfg: SAEModelConfig, device: str = "cpu") -> dict[str, Any]:
    """cfg.json fields SAELens reads.

    Checked against decoderesearch/SAELens v6 (`SAE.load_from_disk` -> `handle_config_defaulting`:
    with no `sae_lens_version` the file is read as a pre-6.0 config, so top-level `hook_name`,
    `model_name`, ... move into `metadata` and unknown keys such as our `training` are dropped) and
    the v5 `SAEConfig.from_dict` fields (`hook_layer`, `activation_fn_str`, `context_size`, ...).
    """
    topk = cfg.architecture == "topk"
    layer = cfg.hook_name.split(".")[1] if cfg.hook_name.startswith("blocks.") else "0"
    out: dict[str, Any] = {
        "architecture": cfg.architecture,
        "d_in": cfg.d_in,
        "d_sae": cfg.d_sae,
        "dtype": cfg.dtype,
        "device": device,
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "finetuning_scaling_factor": False,
        "activation_fn_str": "topk" if topk else "relu",
        "activation_fn_kwargs": {"k": cfg.k} if topk else {},
        # v5 and v6 metadata (what the SAE was trained on)
        "model_name": "monosemantic-gpt",
        "hook_name": cfg.hook_name,
        "hook_layer": int(layer) if layer.isdigit() else 0,
        "hook_head_index": None,
        "context_size": None,
        "prepend_bos": False,
        "dataset_path": None,
        "dataset_trust_remote_code": False,
        "sae_lens_training_version": None,
        "neuronpedia_id": None,
        "model_from_pretrained_kwargs": {},
    }
    if topk:
        out["k"] = cfg.k
        out["rescale_acts_by_decoder_norm"] = False
    return out


def state_tensors(sae: SAE) -> dict[str, torch.Tensor]:
    sae = getattr(sae, "_orig_mod", sae)
    return {n: getattr(sae, n).detach().to("cpu").contiguous() for n in PARAM_NAMES}


def save_sae(sae: SAE, directory: str | Path, extra: dict[str, Any] | None = None,
             sparsity_log10: torch.Tensor | None = None) -> Path:
    """Write `sae_weights.safetensors` + `cfg.json` (SAELens fields + `format` + `extra`, e.g.
    `training` and `metrics`) and optionally `sparsity.safetensors`, each atomically."""
    from safetensors.torch import save_file

    from tools.core.files import atomic_path, write_json

    directory = Path(directory)
    tensors = state_tensors(sae)
    for name, t in tensors.items():
        if not torch.isfinite(t).all():
            raise UserError(f"refusing to save SAE to {directory}: {name} has NaN/Inf values")
    with atomic_path(directory / WEIGHTS_FILE) as tmp:
        save_file(tensors, str(tmp), metadata={"format": FORMAT})
    if sparsity_log10 is not None:
        with atomic_path(directory / SPARSITY_FILE) as tmp:
            save_file({"sparsity": sparsity_log10.detach().float().cpu().contiguous()}, str(tmp))
    base = getattr(sae, "_orig_mod", sae)
    cfg = {"format": FORMAT, **saelens_cfg(base.cfg), "model": asdict(base.cfg), **(extra or {})}
    write_json(directory / CFG_FILE, cfg)
    return directory


def load_sae(directory: str | Path, device: str | torch.device = "cpu", kernel: str = "dense") -> SAE:
    """Load an SAE folder written by `save_sae` (or a SAELens standard/topk export)."""
    from safetensors.torch import load_file

    from tools.core.files import read_json

    directory = Path(directory)
    meta = read_json(directory / CFG_FILE, "SAE config")
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise UserError(f"SAE weights not found: {weights} (run autoencoder.train first)")
    try:
        arch = meta["architecture"]
        hook = meta.get("hook_name") or (meta.get("metadata") or {}).get("hook_name")
        hook = hook or "blocks.0.mlp.hook_post"
        cfg = SAEModelConfig(architecture=arch, d_in=int(meta["d_in"]), d_sae=int(meta["d_sae"]),
                             k=meta.get("k"), hook_name=hook, dtype=meta.get("dtype", "float32"))
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{directory / CFG_FILE}: missing or bad SAE field ({e})") from e
    sae = build_sae(cfg, kernel=kernel)
    state = load_file(str(weights))
    expected = {"W_enc": (cfg.d_in, cfg.d_sae), "b_enc": (cfg.d_sae,),
                "W_dec": (cfg.d_sae, cfg.d_in), "b_dec": (cfg.d_in,)}
    for name, shape in expected.items():
        if name not in state:
            raise UserError(f"{weights}: missing tensor {name!r}")
        if tuple(state[name].shape) != shape:
            raise UserError(f"{weights}: {name} has shape {tuple(state[name].shape)}, cfg.json says {shape}")
    with torch.no_grad():
        for name in PARAM_NAMES:
            getattr(sae, name).copy_(state[name].float())
    return sae.to(device).eval()


def load_sparsity(directory: str | Path) -> torch.Tensor:
    """log10 feature density [d_sae] written beside the weights."""
    from safetensors.torch import load_file

    path = Path(directory) / SPARSITY_FILE
    if not path.is_file():
        raise UserError(f"SAE sparsity not found: {path}")
    return load_file(str(path))["sparsity"]
