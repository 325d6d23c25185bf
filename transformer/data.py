"""Batches of token windows from `train.bin` / `val.bin`, as pure functions of (seed, step, slot).

nanoGPT draws offsets from the global RNG, so a resumed run sees other batches than an
uninterrupted one. Here the offsets of step `s` come from a generator seeded with (seed, s), and
a step's global batch is cut into slots (micro-batch x rank): any split of the same global batch
over processes and accumulation steps trains on the same sequences, and a restart replays exactly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from tools.core.config import UserError

DTYPES = ("uint16", "uint32")


def token_dir(cfg: Any) -> Path:
    """The prepared-token folder of a config: `data_dir/<data.name>/` for our GPT's GPT-2 tokens,
    `data_dir/<data.name>--<subject>/` for a Hugging Face subject's own tokenizer (two tokenizers
    never share one folder)."""
    name = (cfg.get("data") or {}).get("name")
    if not name:
        raise UserError("config key `data.name` is missing (which tokenized dataset to read)")
    sub = cfg.get("subject") or {}
    if sub.get("kind", "gpt") == "gpt":
        return Path(str(cfg.data_dir)) / str(name)
    from transformer.subject_config import SubjectConfig
    from transformer.tokenizer import subject_slug

    sc = SubjectConfig(**{k: sub.get(k) for k in ("kind", "model", "embedded")})
    return Path(str(cfg.data_dir)) / f"{name}--{subject_slug(sc)}"


def token_meta(folder: Path) -> dict[str, Any]:
    """A token folder's meta.json (UserError naming it when missing or unreadable)."""
    from tools.core.files import read_json

    path = Path(folder) / "meta.json"
    if not path.is_file():
        raise UserError(f"token metadata not found: {path} (run transformer.prepare first)")
    return read_json(path, "token metadata")


def token_dtype(meta: dict[str, Any], folder: Path) -> np.dtype:
    dtype = str(meta.get("dtype", "uint16"))  # token folders from before the field held uint16
    if dtype not in DTYPES:
        raise UserError(f"{Path(folder) / 'meta.json'}: dtype {dtype!r}, expected one of {list(DTYPES)}")
    return np.dtype(dtype)


def open_tokens(folder: str | Path, split: str, *, fingerprint: str | None = None) -> np.memmap:
    """`folder/<split>.bin` memory-mapped with the dtype its meta.json records (uint16 or uint32).

    `fingerprint`: the tokenizer the caller's model uses; a folder prepared with another one is a
    named error instead of silently wrong ids.
    """
    folder = Path(folder)
    path = folder / f"{split}.bin"
    if not path.is_file():
        raise UserError(f"token file not found: {path} (run transformer.prepare first)")
    # a bare .bin (no meta.json: hand-made in tests and tools) is GPT-2's uint16 layout
    meta = token_meta(folder) if (folder / "meta.json").is_file() else {}
    dtype = token_dtype(meta, folder)
    size = path.stat().st_size
    if size < dtype.itemsize:
        raise UserError(f"token file {path} is empty")
    if size % dtype.itemsize:
        raise UserError(f"{path}: {size} bytes is not a whole number of {dtype.name} tokens")
    if fingerprint is not None:
        have = (meta.get("tokenizer_info") or {}).get("fingerprint")
        if have is not None and have != fingerprint:
            raise UserError(f"{path} was prepared with tokenizer {meta.get('tokenizer')!r} (fingerprint "
                            f"{have[:12]}), not the subject's (fingerprint {fingerprint[:12]}): rerun "
                            "transformer.prepare with this subject")
    return np.memmap(path, dtype=dtype, mode="r")


class TokenBatches:
    def __init__(self, folder: Path, block_size: int, batch_size: int, *, seed: int, eval_batches: int):
        self.folder, self.T, self.B, self.seed = Path(folder), block_size, batch_size, seed
        train, val = open_tokens(self.folder, "train"), open_tokens(self.folder, "val")
        self.dtype = train.dtype
        self.n_train, self.n_val = len(train), len(val)
        if self.n_train < block_size + 1:
            raise UserError(f"config `transformer.block_size`={block_size} is longer than the data: "
                            f"{self.folder / 'train.bin'} holds {self.n_train} tokens "
                            f"(need >= {block_size + 1})")
        if self.n_val < block_size + 1:
            raise UserError(f"{self.folder / 'val.bin'} holds {self.n_val} tokens, shorter than one batch "
                            f"(a window of block_size + 1 = {block_size + 1} tokens; lower "
                            "transformer.block_size or hold out more validation text)")
        # fixed evaluation windows, so successive val losses compare the same text
        g = torch.Generator().manual_seed(seed ^ 0x5EED)
        self.val_offsets = torch.randint(self.n_val - block_size, (eval_batches, batch_size), generator=g)

    def _gather(self, name: str, offsets: torch.Tensor, device: str) -> tuple[torch.Tensor, torch.Tensor]:
        data = np.memmap(self.folder / name, dtype=self.dtype, mode="r")  # fresh map: no page-cache growth
        rows = np.stack([data[o:o + self.T + 1] for o in offsets.tolist()]).astype(np.int64)
        xy = torch.from_numpy(rows)
        x, y = xy[:, :-1], xy[:, 1:]
        if device.startswith("cuda"):
            return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
        return x.contiguous(), y.contiguous()

    def train_offsets(self, step: int, slot: int) -> torch.Tensor:
        """Start offsets of micro-batch `slot` (= micro * world + rank) of `step`."""
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + step) & 0x7FFF_FFFF_FFFF_FFFF)
        # draw every slot up to this one so the split into slots never changes the sequences
        offsets = torch.randint(self.n_train - self.T, ((slot + 1) * self.B,), generator=g)
        return offsets[slot * self.B:]

    def train_batch(self, step: int, slot: int, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        return self._gather("train.bin", self.train_offsets(step, slot), device)

    def val_batch(self, i: int, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        return self._gather("val.bin", self.val_offsets[i], device)
