"""Batches of token windows from `train.bin` / `val.bin`, as pure functions of (seed, step, slot).

nanoGPT draws offsets from the global RNG, so a resumed run sees other batches than an
uninterrupted one. Here the offsets of step `s` come from a generator seeded with (seed, s), and
a step's global batch is cut into slots (micro-batch x rank): any split of the same global batch
over processes and accumulation steps trains on the same sequences, and a restart replays exactly.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from transformer.config import UserError


def _memmap(path: Path) -> np.memmap:
    if not path.is_file():
        raise UserError(f"token file not found: {path} (run transformer.prepare first)")
    if path.stat().st_size < 2:
        raise UserError(f"token file {path} is empty")
    return np.memmap(path, dtype=np.uint16, mode="r")


class TokenBatches:
    def __init__(self, folder: Path, block_size: int, batch_size: int, *, seed: int, eval_batches: int):
        self.folder, self.T, self.B, self.seed = Path(folder), block_size, batch_size, seed
        train, val = _memmap(self.folder / "train.bin"), _memmap(self.folder / "val.bin")
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
        data = np.memmap(self.folder / name, dtype=np.uint16, mode="r")  # fresh map: no page-cache growth
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
