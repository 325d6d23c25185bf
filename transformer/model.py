"""A nanoGPT-style GPT whose MLP activations can be read, replaced, or computed alone.

Defaults follow the one-layer model of "Towards Monosemanticity" at small scale: 1 layer,
d_model 128, 4 heads, MLP 4x (512), tied embeddings, no biases, GELU (ReLU selectable).

Hooks (the contract later stages rely on):
  * `model.mlp_acts(idx, layer)`: the post-activation MLP hidden state [B, T, d_mlp] of `layer`,
    computing nothing after it (no c_proj, no later blocks, no unembedding).
  * `model(idx, targets, mlp_edit=f)`: `f(layer, h) -> h'` replaces each layer's post-activation
    hidden state before c_proj (SAE splice-in, zero-ablation, or capture by returning `h`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from tools.core.config import UserError

MlpEdit = Callable[[int, torch.Tensor], torch.Tensor]


@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50304  # GPT-2's 50257 padded to a multiple of 64
    n_layer: int = 1
    n_head: int = 4
    n_embd: int = 128
    mlp_ratio: int = 4
    activation: str = "gelu"  # gelu | relu
    dropout: float = 0.0
    bias: bool = False

    @property
    def d_mlp(self) -> int:
        return self.mlp_ratio * self.n_embd

    def check(self) -> GPTConfig:
        if self.n_embd % self.n_head:
            raise UserError(f"model.n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        if self.activation not in ("gelu", "relu"):
            raise UserError(f"model.activation must be gelu or relu, not {self.activation!r}")
        for key in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd", "mlp_ratio"):
            if getattr(self, key) < 1:
                raise UserError(f"model.{key} must be >= 1, got {getattr(self, key)}")
        return self


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (PyTorch's cannot drop only the bias)."""

    def __init__(self, ndim: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = cfg.dropout
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, cfg.d_mlp, bias=cfg.bias)
        self.act = nn.GELU() if cfg.activation == "gelu" else nn.ReLU()
        self.c_proj = nn.Linear(cfg.d_mlp, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """The post-activation hidden state (`blocks.L.mlp.hook_post`)."""
        return self.act(self.c_fc(x))

    def out(self, h: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(h))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_1 = LayerNorm(cfg.n_embd, cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = LayerNorm(cfg.n_embd, cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, edit: Callable[[torch.Tensor], torch.Tensor] | None = None):
        x = x + self.attn(self.ln_1(x))
        h = self.mlp.hidden(self.ln_2(x))
        if edit is not None:
            h = edit(h)
        return x + self.mlp.out(h)


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.config = cfg.check()
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(cfg.vocab_size, cfg.n_embd),
            wpe=nn.Embedding(cfg.block_size, cfg.n_embd),
            drop=nn.Dropout(cfg.dropout),
            h=nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)]),
            ln_f=LayerNorm(cfg.n_embd, cfg.bias),
        ))
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # tied embeddings
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2's scaled init of residual projections
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if non_embedding else n

    def _embed(self, idx: torch.Tensor) -> torch.Tensor:
        T = idx.shape[1]
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {self.config.block_size}")
        pos = torch.arange(T, device=idx.device)
        return self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))

    def residual(self, idx: torch.Tensor, mlp_edit: MlpEdit | None = None) -> torch.Tensor:
        """The final residual stream after ln_f, [B, T, n_embd]."""
        x = self._embed(idx)
        for i, block in enumerate(self.transformer.h):
            edit = None if mlp_edit is None else (lambda h, i=i: mlp_edit(i, h))
            x = block(x, edit)
        return self.transformer.ln_f(x)

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None, *, mlp_edit: MlpEdit | None = None,
        return_logits: bool = True, loss_chunk: int = 1024,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Logits [B, T, vocab] and, with targets, the mean cross-entropy (targets -1 ignored).

        `return_logits=False` (with targets) returns `(None, loss)` from the chunked unembedding +
        cross-entropy of `transformer.lm_loss`, which never holds the full logits: the training path.
        """
        x = self.residual(idx, mlp_edit)
        if targets is not None and not return_logits:
            from transformer.lm_loss import linear_cross_entropy

            dev = x.device.type
            cd = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None
            with torch.autocast(dev, enabled=False):
                return None, linear_cross_entropy(x, self.lm_head.weight, targets, chunk=loss_chunk,
                                                  compute_dtype=cd)
        logits = self.lm_head(x)
        if targets is None:
            return logits, None
        loss = F.cross_entropy(
            logits.view(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-1
        )
        return logits, loss

    @torch.no_grad()
    def mlp_acts(self, idx: torch.Tensor, layer: int = 0) -> torch.Tensor:
        """Post-activation MLP hidden state of `layer`, [B, T, d_mlp]; nothing after it is computed."""
        if not 0 <= layer < self.config.n_layer:
            raise UserError(f"layer {layer} out of range for a {self.config.n_layer}-layer model")
        x = self._embed(idx)
        for block in self.transformer.h[:layer]:
            x = block(x)
        block = self.transformer.h[layer]
        x = x + block.attn(block.ln_1(x))
        return block.mlp.hidden(block.ln_2(x))


def hook_name(layer: int) -> str:
    """TransformerLens-style name of the hooked activation."""
    return f"blocks.{layer}.mlp.hook_post"


def model_state(model: GPT) -> dict[str, torch.Tensor]:
    """State dict without the tied lm_head copy (safetensors stores no shared tensors)."""
    model = getattr(model, "_orig_mod", model)  # unwrap torch.compile
    return {k: v.detach().contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}


def save_model(model: GPT, directory: Path, extra: dict | None = None) -> None:
    """Write `model.safetensors` and `config.json` (hyperparameters + `extra`, e.g. token meta)."""
    from safetensors.torch import save_file

    from tools.core.files import atomic_path, write_json

    directory = Path(directory)
    with atomic_path(directory / "model.safetensors") as tmp:
        save_file(model_state(model), str(tmp))
    write_json(directory / "config.json", {"format": "monosemantic.transformer/1",
                                           "model": asdict(model.config), **(extra or {})})


def load_model(directory: Path, device: str | torch.device = "cpu") -> GPT:
    """Load a model written by `save_model`; errors name the missing or mismatched file."""
    from safetensors.torch import load_file

    from tools.core.files import read_json

    directory = Path(directory)
    meta = read_json(directory / "config.json", "transformer config")
    weights = directory / "model.safetensors"
    if not weights.is_file():
        raise UserError(f"transformer weights not found: {weights} (run transformer.train first)")
    try:
        cfg = GPTConfig(**meta["model"])
    except (KeyError, TypeError) as e:
        raise UserError(f"{directory / 'config.json'}: bad `model` section ({e})") from e
    model = GPT(cfg)
    state = load_file(str(weights))
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatch: weights from another config
        raise UserError(f"{weights} does not match config.json ({str(e).splitlines()[-1].strip()})") from e
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise UserError(f"{weights} does not match config.json: missing {missing}, unexpected {unexpected}")
    return model.to(device).eval()
