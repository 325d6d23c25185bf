"""Cross-entropy of the unembedding without materialising [tokens, vocab] logits.

With a 50k vocabulary and d_model 128 the unembedding is ~95% of a one-layer model's FLOPs, and
nanoGPT's `F.cross_entropy(lm_head(x))` streams the full fp32 logits through memory four times
(write, log-softmax, its gradient, the weight gradient). Here the rows are processed in chunks:
each chunk's logits become probabilities in place and the gradients for `x` and `W` are formed
right away (the "fused linear cross-entropy" of Liger-Kernel, Hsu et al. 2024), so the working set
is one chunk and backward is only a scaling of the stored gradients.
"""

from __future__ import annotations

import torch


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int,
                compute_dtype: torch.dtype | None):
        # x [N, C], weight [V, C], targets [N] (-1 = ignored)
        N = x.shape[0]
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        valid = targets != -1
        n_valid = int(valid.sum())
        scale = 1.0 / max(n_valid, 1)
        cd = compute_dtype or x.dtype
        w = weight.to(cd)
        total = torch.zeros((), dtype=torch.float32, device=x.device)
        grad_x = torch.empty_like(x) if need_x else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=x.device) if need_w else None
        for s in range(0, N, chunk):
            xs = x[s:s + chunk].to(cd)
            t = targets[s:s + chunk]
            v = valid[s:s + chunk]
            tt = t.clamp_min(0)
            logits = (xs @ w.t()).float()  # [n, V]
            lse = torch.logsumexp(logits, dim=1)
            rows = torch.arange(len(t), device=x.device)
            total += ((lse - logits[rows, tt]) * v).sum()
            if need_x or need_w:
                p = logits.sub_(lse[:, None]).exp_()  # softmax, in place
                p[rows, tt] -= 1.0
                if not bool(v.all()):  # ignored rows get no gradient (a full pass only when needed)
                    p.mul_(v[:, None])
                p = p.to(cd)
                if need_x:
                    grad_x[s:s + chunk] = (p @ w).mul_(scale).to(x.dtype)
                if need_w:
                    grad_w.addmm_(p.t(), xs, alpha=scale) if cd == torch.float32 else \
                        grad_w.add_(torch.mm(p.t(), xs).float(), alpha=scale)
        ctx.save_for_backward(grad_x if need_x else torch.empty(0),
                              grad_w.to(weight.dtype) if need_w else torch.empty(0))
        return total * scale

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_x, grad_w = ctx.saved_tensors
        gx = grad_x * grad_out.to(grad_x.dtype) if ctx.needs_input_grad[0] else None
        gw = grad_w * grad_out.to(grad_w.dtype) if ctx.needs_input_grad[1] else None
        return gx, gw, None, None, None


@torch.compiler.disable  # eager by design (data-dependent chunking); the rest of a compiled model still fuses
def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                         chunk: int = 1024, compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Mean cross-entropy of `x @ weight.T` against `targets` (-1 ignored), logits never stored whole.

    `compute_dtype` (e.g. bfloat16) sets the matmul precision; softmax and the loss stay fp32.
    Equals `F.cross_entropy(x @ weight.T, targets, ignore_index=-1)` to float rounding.
    """
    C = x.shape[-1]
    return _LinearCrossEntropy.apply(x.reshape(-1, C), weight, targets.reshape(-1), chunk, compute_dtype)
