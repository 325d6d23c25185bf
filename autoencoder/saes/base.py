"""What every SAE architecture shares: the model config, the loss record, parameters and their
initialisation, decoder-norm handling, and the hooks an architecture overrides.

Parameters have SAELens names and shapes (`W_enc [d_in, d_sae]`, `b_enc [d_sae]`,
`W_dec [d_sae, d_out]`, `b_dec [d_out]`, d_out = d_in for an SAE). A transcoder (`kind="transcoder"`)
reads rows of `hook_name` and reconstructs rows of `hook_name_out`; as in SAELens it does not
subtract b_dec from its input (b_dec lives in the output space), and with `skip` it adds a linear
path `x W_skipᵀ` (`W_skip [d_out, d_in]`, zero at init; Paulo et al. 2025).

An architecture subclass sets `name` (our config name), `saelens` (the SAELens architecture it
exports as) and overrides `encode` and `loss`; the trainer, evaluator and exporter only call the
methods below, so none of them branches on the architecture.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn as nn

from tools.core.config import UserError

if TYPE_CHECKING:
    from autoencoder.config import SAETrainConfig
    from autoencoder.kernels import SparseCodes

PARAM_NAMES = ("W_enc", "b_enc", "W_dec", "b_dec")
KINDS = ("sae", "transcoder")


@dataclass
class SAEModelConfig:
    """What is needed to rebuild the module (the training config lives in the trainer)."""

    architecture: str  # "standard" (L1), "topk", "batchtopk", "jumprelu", "matryoshka"
    d_in: int
    d_sae: int
    k: int | None = None  # k-sparse kinds: latents per row (TopK) or per row on average (BatchTopK)
    hook_name: str = "blocks.0.mlp.hook_post"
    dtype: str = "float32"
    kind: str = "sae"  # sae | transcoder
    d_out: int | None = None  # transcoder output width (null: d_in)
    hook_name_out: str | None = None  # transcoder: the hook point it reconstructs
    skip: bool = False  # transcoder: a linear skip path W_skip
    widths: list[int] | None = None  # matryoshka: nested prefix sizes, increasing, last = d_sae
    bandwidth: float = 0.001  # jumprelu: straight-through kernel width, in units of `unit`
    threshold_init: float = 0.001  # jumprelu: initial threshold, in units of `unit`
    threshold_rate: float = 0.01  # batchtopk: EMA rate of the inference-threshold estimate

    @property
    def out_dim(self) -> int:
        return self.d_out if self.d_out is not None else self.d_in

    def check(self) -> SAEModelConfig:
        from autoencoder.saes import REGISTRY

        if self.architecture not in REGISTRY:
            raise UserError(f"SAE architecture must be one of {sorted(REGISTRY)}, not {self.architecture!r}")
        if self.d_in < 1 or self.d_sae < 1 or self.out_dim < 1:
            raise UserError(f"SAE d_in, d_out and d_sae must be >= 1, got d_in={self.d_in}, "
                            f"d_out={self.d_out}, d_sae={self.d_sae}")
        if self.kind not in KINDS:
            raise UserError(f"SAE kind must be sae or transcoder, not {self.kind!r}")
        if self.kind == "sae" and (self.out_dim != self.d_in or self.skip):
            raise UserError("an SAE (kind=sae) has d_out = d_in and no skip path; use kind=transcoder")
        REGISTRY[self.architecture].check_model(self)
        return self


@dataclass
class LossTerms:
    """One forward pass's outputs and loss terms (all losses already averaged over the batch)."""

    x_hat: torch.Tensor
    f: torch.Tensor | None  # None when the sparse kernel handed back `codes` instead
    mse: torch.Tensor
    sparsity: torch.Tensor  # the λ-free sparsity term (L1, L0) or the AuxK loss
    overall: torch.Tensor
    extra: dict[str, torch.Tensor] = field(default_factory=dict)
    codes: SparseCodes | None = None  # the active (row, latent, value) triples (k-sparse kernel)

    def activations(self) -> torch.Tensor:
        """f as a dense [B, d_sae] tensor (built from `codes` when only they exist)."""
        if self.f is not None:
            return self.f
        assert self.codes is not None
        return self.codes.dense()

    def min_positive(self) -> torch.Tensor:
        """The smallest positive activation of the batch (+inf when nothing fired)."""
        if self.f is None and self.codes is not None:
            return self.codes.min_positive()
        return min_positive(self.f)

    def l0_and_fired(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean active latents per row, bool [d_sae] fired on this batch), without a host sync."""
        if self.f is None and self.codes is not None:
            return self.codes.l0(), self.codes.fired()
        fired = self.f > 0
        return fired.sum(-1).float().mean(), fired.reshape(-1, fired.shape[-1]).any(0)


def min_positive(f: torch.Tensor) -> torch.Tensor:
    """The smallest positive entry of f (+inf when there is none), without a data-dependent shape."""
    return torch.where(f > 0, f, torch.full_like(f, math.inf)).min()


def row_sq_error(x: torch.Tensor, x_hat: torch.Tensor, reduction: str) -> torch.Tensor:
    """Per-row squared error, summed or averaged over the feature dimension."""
    se = (x_hat.float() - x.float()).pow(2)
    if reduction == "sum":
        return se.sum(-1)
    if reduction == "mean":
        return se.mean(-1)
    raise UserError(f"sae.mse_reduction must be sum or mean, not {reduction!r}")


class SAE(nn.Module):
    """Shared parameters, initialisation, decoder-norm handling and the per-architecture hooks."""

    name: ClassVar[str] = ""  # our config name (sae.architecture)
    saelens: ClassVar[str] = ""  # SAELens architecture of the export
    coeff_field: ClassVar[str | None] = None  # SAETrainConfig field of the sparsity coefficient
    sparsity_log_key: ClassVar[str] = "losses/l1_loss"  # W&B name of LossTerms.sparsity
    uses_dead_mask: ClassVar[bool] = False  # the loss needs the dead-latent mask (AuxK)
    k_sparse: ClassVar[bool] = False  # L0 fixed by `k` (TopK, BatchTopK, Matryoshka)

    def __init__(self, cfg: SAEModelConfig, kernel: str = "dense"):
        super().__init__()
        self.cfg = cfg.check()
        if kernel not in ("dense", "sparse", "auto"):
            raise UserError(f"sae.kernel must be dense, sparse or auto, not {kernel!r}")
        self.kernel = kernel
        d, F_, o = cfg.d_in, cfg.d_sae, cfg.out_dim
        self.W_enc = nn.Parameter(torch.empty(d, F_))
        self.b_enc = nn.Parameter(torch.zeros(F_))
        self.W_dec = nn.Parameter(torch.empty(F_, o))
        self.b_dec = nn.Parameter(torch.zeros(o))
        if cfg.skip:
            self.W_skip = nn.Parameter(torch.zeros(o, d))
        self.reset_parameters()

    # ---- configuration hooks (class level) ----------------------------------------------------
    @classmethod
    def check_model(cls, cfg: SAEModelConfig) -> None:
        """Architecture-specific checks of a model config (UserError naming the field)."""

    @classmethod
    def check_train(cls, c: SAETrainConfig) -> None:
        """Architecture-specific checks of the `sae` config section (one line naming the key)."""

    @classmethod
    def model_fields(cls, c: SAETrainConfig) -> dict[str, Any]:
        """SAEModelConfig fields this architecture takes from the `sae` config section."""
        return {}

    @classmethod
    def registry_key(cls) -> str:
        """SAEModelConfig.architecture of this class."""
        from autoencoder.saes import REGISTRY

        return next(k for k, v in REGISTRY.items() if v is cls)

    @classmethod
    def name_tag(cls, c: SAETrainConfig) -> tuple[str, set[str]]:
        """The folder-name suffix for `c` and the `sae.` keys it already spells out."""
        return f"l1c{short_float(c.l1_coeff)}", {"l1_coeff"}

    # ---- parameters ---------------------------------------------------------------------------
    def param_names(self) -> tuple[str, ...]:
        """Every trained parameter, in a fixed order (optimizer, all-reduce, checkpoint, export)."""
        return PARAM_NAMES + (("W_skip",) if self.cfg.skip else ()) + self.extra_params()

    def extra_params(self) -> tuple[str, ...]:
        return ()

    def state_names(self) -> tuple[str, ...]:
        """Parameters and the buffers a resume must restore (e.g. an estimated threshold)."""
        return self.param_names()

    @property
    def transcoder(self) -> bool:
        return self.cfg.kind == "transcoder"

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Unit-norm random decoder rows; encoder = decoder transpose (Gao et al. 2024, Conerly et al.
        2024): every feature starts out reading the direction it writes. A transcoder whose output
        width differs draws its encoder columns separately (unit norm)."""
        w = torch.randn(self.cfg.d_sae, self.cfg.out_dim, generator=generator)
        self.W_dec.copy_(w / w.norm(dim=1, keepdim=True))
        if self.cfg.out_dim == self.cfg.d_in:
            self.W_enc.copy_(self.W_dec.t())
        else:
            e = torch.randn(self.cfg.d_in, self.cfg.d_sae, generator=generator)
            self.W_enc.copy_(e / e.norm(dim=0, keepdim=True))
        self.b_enc.zero_()
        self.b_dec.zero_()
        if self.cfg.skip:
            self.W_skip.zero_()

    def init_scale(self, s: float) -> None:
        """Once, before training, after the data-dependent init (s: the loss scale)."""
        self.set_scale(s)

    def set_scale(self, s: float) -> None:
        """The input's RMS norm (the trainer's loss scale); architectures with absolute-valued
        hyperparameters (JumpReLU) express them in units of s / √d_in."""

    @torch.no_grad()
    def match_input_scale(self, x: torch.Tensor, y: torch.Tensor | None = None) -> float:
        """Scale W_enc so the reconstruction x̂ − b_dec of the rows `x` has the RMS norm of y − b_dec
        (y = x for an SAE); returns the factor. With unit decoder rows and W_enc = W_decᵀ the first
        reconstruction of an L1 SAE is about d_sae / (2 d_in) times too large (each of the ~d_sae/2
        firing features adds its projection); Gao et al. 2024 rescale the encoder and Conerly et al.
        2024 start the decoder at norm 0.1 for the same reason. Here decoder rows stay unit norm
        (Anthropic 2023), so the encoder takes the factor; the ReLU (and TopK) are positively
        homogeneous, so with b_enc = 0 one measured factor is exact."""
        x = x.to(self.W_dec.dtype)
        y = x if y is None else y.to(self.W_dec.dtype)
        ybar = y - self.b_dec
        rec = self.decode(self.encode(x)) - self.b_dec
        num, den = float(ybar.pow(2).sum(-1).mean()), float(rec.pow(2).sum(-1).mean())
        factor = math.sqrt(num / den) if den > 0 and num > 0 else 1.0
        self.W_enc.mul_(factor)
        return factor

    # ---- the interface every SAE has ----------------------------------------------------------
    def sae_in(self, x: torch.Tensor) -> torch.Tensor:
        """The encoder's input: x − b_dec for an SAE, x for a transcoder (as SAELens)."""
        return x if self.transcoder else x - self.b_dec

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        return self.sae_in(x) @ self.W_enc + self.b_enc

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return f @ self.W_dec + self.b_dec

    def skip_out(self, x: torch.Tensor) -> torch.Tensor | None:
        """The skip path's contribution x W_skipᵀ, or None without one."""
        return x @ self.W_skip.t() if self.cfg.skip else None

    def reconstruct(self, x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        """decode(f) plus the skip path of the input x."""
        out = self.decode(f)
        s = self.skip_out(x)
        return out if s is None else out + s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.reconstruct(x, self.encode(x))

    def loss(self, x: torch.Tensor, **kw: Any) -> LossTerms:
        raise NotImplementedError

    def row_loss(self, x: torch.Tensor, y: torch.Tensor, *, coeff: float, mse_reduction: str,
                 mse_scale: float, l1_scale: float) -> torch.Tensor:
        """Each row's training loss without auxiliary terms: what resampling weights inputs by."""
        return row_sq_error(y, self(x), mse_reduction) / mse_scale

    def after_step(self) -> None:
        """Called after each optimizer step (projections the architecture keeps)."""

    # ---- export -------------------------------------------------------------------------------
    def export_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors of the SAELens folder (SAELens names), on the CPU."""
        return {n: getattr(self, n).detach().to("cpu").contiguous() for n in self.param_names()}

    def export_cfg(self) -> dict[str, Any]:
        """Architecture-specific cfg.json fields for SAELens."""
        return {"activation_fn_str": "relu", "activation_fn_kwargs": {}}

    def load_tensors(self, state: dict[str, torch.Tensor]) -> None:
        """Inverse of `export_tensors` (shapes already checked)."""
        with torch.no_grad():
            for n in self.state_names():
                getattr(self, n).copy_(state[n].float())

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        c = self.cfg
        return {n: tuple(getattr(self, n).shape) for n in self.state_names()} | {
            "W_enc": (c.d_in, c.d_sae), "W_dec": (c.d_sae, c.out_dim), "b_dec": (c.out_dim,)}

    # ---- decoder unit norm (Anthropic 2023) ---------------------------------------------------
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
        return (f"architecture={self.cfg.architecture}, kind={self.cfg.kind}, d_in={self.cfg.d_in}, "
                f"d_sae={self.cfg.d_sae}")


def short_float(v: float) -> str:
    """1e-3 -> '1e-3', 3e-4 -> '3e-4', 0.0015 -> '1.5e-3' (names that sort and read well)."""
    if v == 0:
        return "0"
    e = math.floor(math.log10(abs(v)))
    m = round(v / 10**e, 3)
    if abs(m) >= 10:
        m, e = m / 10, e + 1
    return f"{m:g}e{e}"


BatchSum = Callable[[torch.Tensor], torch.Tensor]


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
