"""How much memory a unit set's scan needs, and grouping unit sets into as few passes as fit.

A unit set's running state (tools.features.scan.ScanState, both sides for signed units) is held for
the whole pass; two batches' captured activations are held for every set of the pass together (on
the CPU the next batch is captured while one is folded in), and
the per-batch work (the units' activations and their firing entries) for one set at a time.
"""

from __future__ import annotations

from tools.core.config import UserError
from tools.core.memory import available_ram
from tools.features.config import HIST_BINS, FeaturesConfig

GB = 1e9
# per (token, unit) of one batch: the entry pass's 4-byte arrays (draw, unit, bin, group, slot, key,
# ...), its int64 indices, and on CUDA the float64 copies of the column sums
_WORK_BYTES = 112


def state_bytes(n_units: int, fc: FeaturesConfig, n_ctx: int, both: bool) -> int:
    """Bytes of one unit set's running state (every tensor of ScanState, both sides when `both`)."""
    k, G, m = min(fc.top_k, n_ctx), HIST_BINS, fc.per_bin
    cand = min(fc.negative_candidates, n_ctx) if fc.n_random else 0
    per_unit = 8 + 8 + 4 + 4 + 8 * G + 20 * k + 16 * G * m + 12 * fc.n_random + 4 * cand
    return (n_units * per_unit + 8 * cand) * (2 if both else 1)


def set_bytes(n_units: int, width: int, fc: FeaturesConfig, n_ctx: int, T: int,
              both: bool) -> tuple[int, int]:
    """(held for the pass: state + one batch's capture, per-batch work) of one unit set."""
    tokens = max(1, fc.batch_tokens // T) * T
    return state_bytes(n_units, fc, n_ctx, both) + 2 * tokens * width * 6, tokens * n_units * _WORK_BYTES


def default_budget(device: str) -> float:
    """Most of the device's free memory, in bytes (CUDA: 90% of free; CPU: 80% of MemAvailable)."""
    if device.startswith("cuda"):
        import torch

        return 0.9 * torch.cuda.mem_get_info(device)[0]
    return 0.8 * available_ram(default=10 * GB)


def plan_passes(names: list[str], sizes: list[tuple[int, int]], budget: float) -> list[list[int]]:
    """Unit sets (in order) grouped into consecutive passes, each within `budget` bytes (held sizes
    summed, plus the largest per-batch work); a UserError when even one set does not fit."""
    for name, (held, work) in zip(names, sizes, strict=True):
        if held + work > budget:
            raise UserError(f"features.memory_gb={budget / GB:.3g} is too small: one unit set ({name}) needs "
                            f"{(held + work) / GB:.3g} GB (its running state and one batch); raise "
                            "features.memory_gb or lower features.batch_tokens")
    passes: list[list[int]] = []
    held_sum = work_max = 0
    for i, (held, work) in enumerate(sizes):
        if passes and held_sum + held + max(work_max, work) <= budget:
            passes[-1].append(i)
            held_sum, work_max = held_sum + held, max(work_max, work)
        else:
            passes.append([i])
            held_sum, work_max = held, work
    return passes
