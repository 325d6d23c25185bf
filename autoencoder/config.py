"""The `activations` and `sae` config sections: every default, its meaning, and its checks.

These dataclasses are the one source of the defaults (conf/schema.py registers them as the schema
of conf/activations and conf/sae; the YAML options there hold only what they change). Fields made
with `neutral(...)` do not enter the output hash as they are (tools.core.config.output_fields).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tools.core.config import UserError, neutral

ARCHITECTURES = ("l1", "topk", "batchtopk", "jumprelu", "matryoshka")  # autoencoder.saes.BY_NAME
SPLITS = ("train", "val")
# transformer.subject.HOOK_KINDS, in forward order
HOOKS = ("resid_pre", "resid_mid", "mlp_in", "neurons", "mlp_out", "resid_post")


@dataclass
class ActivationsConfig:
    """The `activations` section, owned by autoencoder.generate.

    Rows = contexts x tokens_per_context, each a float16 vector of one hook point of the subject
    (blocks.<layer>.mlp.hook_post for neurons), shuffled across contexts.
    """

    # train | val: which token file to sample contexts from; output goes to run_dir/activations/<split>/
    # (one hook point) or .../<split>/<hook>/ (several)
    split: str = "train"
    # random contexts for split=train (50M rows, ~51 GB at d_in 512); hashed as the chosen split's count
    contexts: int = neutral(250_000)
    val_contexts: int = neutral(5_000)  # random contexts for split=val (held-out rows for SAE evaluation)
    tokens_per_context: int = 200  # random positions kept per context (Anthropic 2023: 200)
    # context length, capped at the model's; null -> the GPT's block_size, an HF model's max positions
    # capped at 1024
    block_size: int | None = None
    # resid_pre (blocks.L.hook_resid_pre) | resid_mid (blocks.L.hook_resid_mid) | mlp_in (the MLP's input
    # after its norm, blocks.L.ln2.hook_normalized) | neurons (blocks.L.mlp.hook_post) | mlp_out
    # (blocks.L.hook_mlp_out) | resid_post (blocks.L.hook_resid_post), or a list of them, e.g.
    # [mlp_in, mlp_out] for a transcoder: all written in one forward, row i of every folder the same
    # token; hashed as each hook point written
    hook: Any = neutral("neurons")
    layers: Any = neutral(factory=lambda: [0])  # which blocks, all read in one forward: [0,5,10] or all
    rows_per_shard: int = 1_048_576  # rows per .npy shard (1 GiB at d_in 512); pass-1 RAM is about one shard
    resample_rows: int = 819_200  # rows of resample.npy for neuron resampling (Anthropic 2023); 0 = none
    batch_contexts: int = 64  # contexts per forward pass (lower it when the forward runs out of memory)
    # shuffle in RAM when a rank's shards (every hook point) take at most this many GB: each row goes
    # straight to its place in memory-mapped shard files, no bucket files (autoencoder.in_ram; the same
    # bytes as the two-pass shuffle). null = half the available RAM, shared by this machine's ranks;
    # 0 = always two passes
    in_ram_gb: float | None = neutral(None)

    def check(self) -> ActivationsConfig:
        if self.split not in SPLITS:
            raise UserError(f"config `activations.split`={self.split!r}: expected train or val")
        for key in ("contexts", "val_contexts", "tokens_per_context", "rows_per_shard", "batch_contexts"):
            if getattr(self, key) < 1:
                raise UserError(f"config `activations.{key}`={getattr(self, key)}: expected an integer >= 1")
        if self.resample_rows < 0:
            raise UserError(f"config `activations.resample_rows`={self.resample_rows}: "
                            "expected an integer >= 0")
        if self.in_ram_gb is not None and not self.in_ram_gb >= 0:
            raise UserError(f"config `activations.in_ram_gb`={self.in_ram_gb}: expected null or a number "
                            ">= 0")
        if self.block_size is not None and self.block_size < 1:
            raise UserError(f"config `activations.block_size`={self.block_size}: expected null or >= 1")
        kinds = [self.hook] if isinstance(self.hook, str) else self.hook
        if not isinstance(kinds, list | tuple) or not kinds or any(k not in HOOKS for k in kinds):
            raise UserError(f"config `activations.hook`={self.hook!r}: expected {' | '.join(HOOKS)} "
                            "or a list of them")
        self.hook = kinds[0] if len(set(kinds)) == 1 else list(dict.fromkeys(kinds))
        layers = [self.layers] if isinstance(self.layers, int) else self.layers
        ok = layers == "all" or (isinstance(layers, list | tuple) and len(layers) > 0 and all(
            isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in layers))
        if not ok:
            raise UserError(f"config `activations.layers`={self.layers!r}: expected a list of layers >= 0 "
                            "(e.g. [0,5,10]) or all")
        self.layers = layers if layers == "all" else list(dict.fromkeys(layers))
        return self

    def kinds(self) -> list[str]:
        """The hook kinds written (`hook` as a list)."""
        return [self.hook] if isinstance(self.hook, str) else list(self.hook)

    def n_contexts(self) -> int:
        """Contexts sampled for this split."""
        return self.contexts if self.split == "train" else self.val_contexts


@dataclass
class SAETrainConfig:
    """The `sae` section, owned by autoencoder.train: Anthropic's "Towards Monosemanticity" (2023) recipe.

        x̄ = x − b_dec;  f = ReLU(x̄ W_enc + b_enc);  x̂ = f W_dec + b_dec
        loss = mean over the batch of ( ‖x − x̂‖² / s² + l1_coeff · ‖f‖₁ / s )

    with s = RMS ‖x − b_dec‖ (normalize_loss; s = 1 is the paper's raw loss). The squared error of
    a row is summed over d_in (mse_reduction: sum, the paper's ‖x − x̂‖²). Every term is averaged
    over the rows of the batch (and over DDP ranks), so l1_coeff means the same at any batch size,
    world size, activation scale and d_in. Decoder rows are unit norm after every step, with the
    gradient component parallel to each row removed before the step. sae=topk (conf/sae/topk.yaml)
    is the TopK SAE of Gao et al. 2024; sae=batchtopk, sae=jumprelu and sae=matryoshka the newer
    kinds (autoencoder/saes/). Any of them trains as a transcoder with sae.kind=transcoder.
    Neutral fields may differ when a run resumes.
    """

    # l1 (Anthropic 2023) | topk (Gao et al. 2024) | batchtopk (Bussmann et al. 2024)
    # | jumprelu (Rajamanoharan et al. 2024) | matryoshka (Bussmann et al. 2025); see conf/sae/*.yaml
    architecture: str = "l1"
    # sae: reconstruct the rows it reads | transcoder: read sae.hook_in rows, reconstruct the sae.hook_out
    # rows of the same tokens (Dunefsky et al. 2024); the two shard folders must hold the same rows
    kind: str = "sae"
    hook_in: str | None = None  # transcoder: input hook (e.g. blocks.0.ln2.hook_normalized, the MLP input)
    hook_out: str | None = None  # transcoder: output hook (e.g. blocks.0.hook_mlp_out, the MLP output)
    skip: bool = False  # transcoder: add a linear skip path x W_skipᵀ (Paulo et al. 2025; zero at init)
    name: str | None = neutral(None)  # folder under run_dir/sae/; null -> derived, e.g. l1-4096-l1c6e-2
    hook: str | None = neutral(None)  # hook point when the shards hold several (e.g. blocks.10.mlp.hook_post)
    n_features: int = 4096  # dictionary size (d_sae); Anthropic: 512 .. 131072 for d_in 512
    d_in: int | None = None  # null -> from the shards' manifest; set to assert the width
    l1_coeff: float = 0.06  # l1: λ on ‖f‖₁ / s (see normalize_loss; per row, batch-averaged)
    l1_warmup_steps: int = 0  # linear ramp of the sparsity coefficient (l1_coeff, l0_coeff) from 0 (0 = off)
    mse_reduction: str = "sum"  # sum | mean over d_in (cancels out under normalize_loss)
    # Scale-free loss: s = RMS ‖x − b_dec‖ of the init sample; loss = MSE / s² + λ ‖f‖₁ / s, so λ trades
    # the fraction of unexplained variance against ‖f‖₁ / ‖x‖ at any activation scale or d_in.
    # false: the paper's raw loss MSE + λ ‖f‖₁ (λ then depends on the activations' norm).
    normalize_loss: bool = True
    init_rescale: bool = True  # scale W_enc so the first reconstruction has the input's norm (false: W_decᵀ)
    # topk, batchtopk, matryoshka: latents per row (topk) or per row on average over the batch
    # (batchtopk, matryoshka); Gao et al. 2024 and Bussmann et al. 2024 train k 16-128 (32 here)
    k: int = 32
    # batchtopk, matryoshka: rate r of the inference threshold θ ← (1 − r) θ + r · (smallest kept
    # activation of the batch); SAELens 0.01, dictionary_learning 0.001 (from step 1,000)
    threshold_rate: float = 0.01
    # jumprelu: λ on the L0 (the paper's "step" sparsity loss; MSE is divided by s², so λ is the
    # fraction of variance one active feature must explain); the paper sweeps λ per target L0
    l0_coeff: float = 0.001
    # jumprelu: width ε of the straight-through estimators' rectangle kernel, in units of s (the
    # input's RMS norm); the paper and Gemma Scope: 0.001 on inputs scaled to unit mean squared norm
    bandwidth: float = 0.001
    threshold_init: float = 0.001  # jumprelu: initial threshold θ₀ in units of s (Gemma Scope: 0.001)
    # matryoshka: nested dictionary prefixes whose reconstruction losses are summed, increasing and
    # ending at n_features; null -> [n/16, n/4, n] (Bussmann et al. 2025 nest a few prefixes, smallest
    # a few % of the dictionary)
    matryoshka_widths: list[int] | None = None
    aux_k: int | None = None  # topk, batchtopk, matryoshka: dead latents in the AuxK loss; null -> d_in // 2
    # topk, batchtopk, matryoshka: AuxK weight α = 1/32 (Gao et al. 2024); their config groups set 1/8
    aux_coeff: float = 0.03125
    # rows (tokens) without firing before a feature counts as dead, for AuxK (topk) and resampling:
    # 12,500 steps x 4,096 rows (Gao et al. 2024 use 10M tokens: sae=topk)
    dead_tokens: int = 51_200_000
    # rows without firing before AuxK (topk, batchtopk, matryoshka) treats a latent as dead; null ->
    # dead_tokens. Resampling keeps dead_tokens, so a preset can give AuxK a shorter window than l1's
    aux_dead_tokens: int | None = None
    kernel: str = neutral("auto")  # dense | sparse | auto: autoencoder.kernels.l1_sae_forward when available
    batch_size: int = 4096  # rows per step, global (split evenly across DDP ranks)
    steps: int = 125000  # optimizer steps
    lr: float = 1e-4  # Adam
    # multiplier of lr for W_dec: Adam moves each weight by about lr per step, so with unit-norm rows
    # this is how fast decoder directions turn (a decoder of norm 1/m under lr turns like one of norm 1
    # under m·lr; SAELens starts its decoder at norm 0.1). conf/sae/{topk,batchtopk,matryoshka,jumprelu}.yaml
    # set 12 (docs/sae-training.md)
    decoder_lr_scale: float = 1.0
    lr_warmup_steps: int = 1000  # linear warmup from 0
    lr_schedule: str = "constant"  # constant | cosine | linear: after warmup, decay to lr * min_lr_ratio
    min_lr_ratio: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    b_dec_init: str = "geometric_median"  # geometric_median (Weiszfeld) | mean | zeros
    b_dec_init_rows: int = 16384  # training rows sampled for that estimate
    # Neuron resampling (Anthropic 2023, appendix): at these steps, features that did not fire on the
    # last dead_tokens rows are re-initialised from inputs of resample.npy drawn with probability ∝
    # their squared loss. Steps >= `steps` are ignored; [] disables it.
    resample_steps: list[int] = field(default_factory=lambda: [25000, 50000, 75000, 100000])
    resample_rows: int | None = None  # use at most this many rows of resample.npy (null = all)
    resample_enc_scale: float = 0.2  # new encoder vector = unit input × 0.2 × mean alive encoder norm
    # The paper's recipe: resample_centered=false resample_density=null resample_fresh_adam=false
    # (docs on neuron resampling have the study behind these defaults).
    resample_centered: bool = True  # the new direction is x − b_dec (false: the raw input x)
    # new bias = −(1 − density) quantile of its pre-activations (null: 0)
    resample_density: float | None = 0.01
    resample_fresh_adam: bool = True  # reset the resampled features' Adam step counts, not only the moments
    resample_max_fraction: float = 1.0  # resample at most this fraction of the dictionary per event
    resample_weight: str = "loss"  # draw inputs ∝ loss² with loss = MSE + λ L1 (mse: the MSE term only)
    resample_lr_warmup_steps: int = 0  # re-warm the LR linearly after each resampling (0 = off)
    resample_watch_steps: int = neutral(200)  # diagnostics (cfg.json, W&B resample/*): steps watched after
    eval_every: int = neutral(5000)  # held-out eval (val shards + val contexts) every N steps, and at the end
    eval_rows: int = neutral(65536)  # val rows for reconstruction / density metrics
    eval_contexts: int = neutral(64)  # val contexts for the NLL score (loss recovered)
    eval_context_len: int | None = neutral(None)  # null -> the model's block_size
    log_every: int = neutral(100)  # W&B training metrics every N steps
    checkpoint_every: int = neutral(5000)  # resume state in run_dir/sae/<name>/checkpoint/
    dtype: str = "float32"  # parameter dtype: float32 | float64
    autocast: bool = neutral(True)  # on CUDA: bf16 autocast of the forward (ignored on CPU)
    compile: bool = neutral(False)  # torch.compile the loss
    stop_at: int | None = neutral(None)  # stop with a checkpoint after this step; a rerun resumes

    def widths(self) -> list[int]:
        """Matryoshka prefix widths: `matryoshka_widths`, or the derived default."""
        if self.matryoshka_widths is not None:
            return list(self.matryoshka_widths)
        n = self.n_features
        return sorted({max(1, n // 16), max(1, n // 4), n})

    def check(self) -> SAETrainConfig:
        def bad(key: str, want: str) -> UserError:
            return UserError(f"config `sae.{key}`={getattr(self, key)!r}: expected {want}")

        from autoencoder.saes import arch_class

        if self.architecture not in ARCHITECTURES:
            raise bad("architecture", " | ".join(ARCHITECTURES))
        if self.kind not in ("sae", "transcoder"):
            raise bad("kind", "sae or transcoder")
        if self.kind == "transcoder" and not (self.hook_in and self.hook_out):
            raise UserError(f"config `sae.kind`=transcoder needs `sae.hook_in` and `sae.hook_out` "
                            f"(got {self.hook_in!r}, {self.hook_out!r})")
        if self.skip and self.kind != "transcoder":
            raise UserError("config `sae.skip`=true: a skip path needs `sae.kind`=transcoder")
        for key in ("n_features", "batch_size", "steps", "log_every", "eval_every", "checkpoint_every",
                    "b_dec_init_rows", "eval_rows", "dead_tokens", "resample_watch_steps"):
            if getattr(self, key) < 1:
                raise bad(key, "an integer >= 1")
        arch_class(self.architecture).check_train(self)
        if self.mse_reduction not in ("sum", "mean"):
            raise bad("mse_reduction", "sum or mean")
        if self.kernel not in ("dense", "sparse", "auto"):
            raise bad("kernel", "dense, sparse or auto")
        if self.lr_schedule not in ("constant", "cosine", "linear"):
            raise bad("lr_schedule", "constant, cosine or linear")
        if self.b_dec_init not in ("geometric_median", "mean", "zeros"):
            raise bad("b_dec_init", "geometric_median, mean or zeros")
        if self.dtype not in ("float32", "float64"):
            raise bad("dtype", "float32 or float64 (use sae.autocast for bf16 compute on CUDA)")
        if self.aux_dead_tokens is not None and self.aux_dead_tokens < 1:
            raise bad("aux_dead_tokens", "an integer >= 1 or null")
        if not self.decoder_lr_scale > 0:
            raise bad("decoder_lr_scale", "a number > 0")
        if self.lr <= 0 or self.l1_coeff < 0 or self.aux_coeff < 0:
            raise UserError("config `sae.lr` must be > 0 and `sae.l1_coeff`, `sae.aux_coeff` >= 0")
        if not 0 <= self.min_lr_ratio <= 1:
            raise bad("min_lr_ratio", "a number in [0, 1]")
        if any(s < 1 for s in self.resample_steps):
            raise bad("resample_steps", "a list of steps >= 1")
        if self.resample_density is not None and not 0 < self.resample_density < 1:
            raise bad("resample_density", "a fraction in (0, 1) or null")
        if not 0 < self.resample_max_fraction <= 1:
            raise bad("resample_max_fraction", "a fraction in (0, 1]")
        if self.resample_weight not in ("loss", "mse"):
            raise bad("resample_weight", "loss or mse")
        return self
