"""Adam with one step count per dictionary feature, so a resampled feature can restart fresh.

PyTorch's Adam keeps one step count per tensor. Zeroing the moments of a re-initialised feature
(what "reset the Adam parameters" usually becomes) leaves that count at, say, 25,000: the bias
corrections are then ~1, and the first update of the zeroed entry is m/√v = (1−β1)g/√((1−β2)g²)
≈ 3.2 lr at the default betas instead of Adam's 1 lr, decaying over the ~1/(1−β1) steps the
first moment needs to fill. `FeatureAdam` stores the count per feature (broadcast over the other
axis of each parameter), so `reset_features(idx)` makes those entries step exactly like a new
optimizer would, while every other entry continues untouched.

Without resets it is Adam (Kingma & Ba 2015, PyTorch's update order), element for element; on the
CPU, while a parameter's features share one step count, PyTorch's fused Adam kernel does the update
(the same formula, up to float rounding), which is several times faster than the elementwise ops.
"""

from __future__ import annotations

import torch
from torch.optim.adam import adam as _adam

# the axis of each SAE parameter that indexes features (None: shared by all features)
FEATURE_AXIS = {"W_enc": 1, "b_enc": 0, "W_dec": 0, "b_dec": None, "W_skip": None, "threshold": 0}


class FeatureAdam(torch.optim.Optimizer):
    """Adam over named SAE parameters with a per-feature step count (see the module docstring).

    `params`: (name, tensor) pairs whose names are keys of `FEATURE_AXIS`. State per parameter:
    `exp_avg`, `exp_avg_sq` (shaped like it) and `step` (float, 1 along the non-feature axis).
    """

    def __init__(self, params: list[tuple[str, torch.nn.Parameter]], lr: float,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 lr_scale: dict[str, float] | None = None):
        self.names = {id(p): n for n, p in params}
        # per-parameter multiplier of the group's lr (by name; 1 for the rest)
        self.lr_scale = {id(p): (lr_scale or {}).get(n, 1.0) for n, p in params}
        super().__init__([p for _, p in params], {"lr": lr, "betas": betas, "eps": eps})

    def _step_shape(self, p: torch.Tensor) -> tuple[int, ...]:
        axis = FEATURE_AXIS[self.names[id(p)]]
        shape = [1] * p.dim() if p.dim() else [1]
        if axis is not None:
            shape[axis] = p.shape[axis]
        return tuple(shape)

    def state_for(self, p: torch.Tensor) -> dict[str, torch.Tensor]:
        """The state of `p`, created (zero moments, zero steps) on first use."""
        st = self.state[p]
        if not st:
            st["step"] = torch.zeros(self._step_shape(p), dtype=torch.float32, device=p.device)
            st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return st

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D102 - torch.optim.Optimizer.step
        assert closure is None, "FeatureAdam does not take a closure"
        for group in self.param_groups:
            b1, b2 = group["betas"]
            eps = group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                lr = group["lr"] * self.lr_scale.get(id(p), 1.0)
                st = self.state_for(p)
                if self._fused(p, st, group, lr):
                    continue
                st["step"] += 1
                t = st["step"].to(p.dtype)
                m, v = st["exp_avg"], st["exp_avg_sq"]
                m.lerp_(p.grad, 1 - b1)
                v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
                bc1 = 1 - b1 ** t
                bc2_sqrt = (1 - b2 ** t).sqrt()
                denom = v.sqrt().div_(bc2_sqrt).add_(eps).mul_(bc1 / lr)  # one temporary, in place
                p.addcdiv_(m, denom, value=-1.0)

    @staticmethod
    def _fused(p: torch.Tensor, st: dict[str, torch.Tensor], group: dict, lr: float) -> bool:
        """On the CPU, while every feature of `p` has the same step count (no reset since the start or
        since all caught up), one fused Adam update (PyTorch's `fused=True` kernel: one pass instead
        of ~8 elementwise ones; equal up to float rounding). Returns whether it ran."""
        step = st["step"]
        if p.device.type != "cpu" or p.dtype not in (torch.float32, torch.float64) or p.grad.is_sparse:
            return False
        first = step.reshape(-1)[:1]
        if step.numel() > 1 and not bool((step == first).all()):
            return False
        scalar = first.reshape(()).clone()
        b1, b2 = group["betas"]
        _adam([p], [p.grad], [st["exp_avg"]], [st["exp_avg_sq"]], [], [scalar], fused=True, amsgrad=False,
              beta1=b1, beta2=b2, lr=lr, weight_decay=0.0, eps=group["eps"], maximize=False)
        step += 1
        return True

    @torch.no_grad()
    def reset_features(self, idx: torch.Tensor, steps: bool = True) -> None:
        """Zero the moments of features `idx` in every parameter that has a feature axis; with
        `steps`, also their step counts, so they restart as under a new optimizer."""
        for group in self.param_groups:
            for p in group["params"]:
                axis = FEATURE_AXIS[self.names[id(p)]]
                st = self.state.get(p)
                if axis is None or not st:
                    continue
                keys = ("exp_avg", "exp_avg_sq", "step") if steps else ("exp_avg", "exp_avg_sq")
                for key in keys:
                    st[key].index_fill_(axis, idx.to(st[key].device), 0.0)
