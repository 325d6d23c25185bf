"""What a resampling event did: a per-step curve around it and the features it revived or killed.

For each scheduled event the trainer records, every step from `before` steps ahead of it to `after`
steps past it, the batch MSE, L0, the number of features that fired on the batch (`active`) and how
many of those were just resampled (`active_resampled`). When the watch closes (`after` steps past
the event, at the next event, or at the end of training) the event's record gets `revived` (of the
resampled features, how many fired at least once since) and `survived` (of the features alive
before the event, how many fired since): a collapse shows as `survived` far below `alive_before`.
The records go into `cfg.json` (`training.resampled`) and W&B (`resample/...`).
"""

from __future__ import annotations

from typing import Any

import torch

CURVE_KEYS = ("step", "mse", "l0", "active", "active_resampled")


def _empty_curve() -> dict[str, list]:
    return {k: [] for k in CURVE_KEYS}


class ResampleWatch:
    """Diagnostics of the events in `schedule` (see the module docstring); resumable via
    `state()` / `tensors()` and `restore()`."""

    def __init__(self, schedule: list[int], d_sae: int, device: str | torch.device,
                 before: int = 50, after: int = 200):
        self.schedule, self.before, self.after = schedule, before, after
        self.curve = _empty_curve()
        self.open: dict[str, Any] | None = None  # the event being watched (also in the history)
        self.new = torch.zeros(d_sae, dtype=torch.bool, device=device)
        self.alive_before = torch.zeros(d_sae, dtype=torch.bool, device=device)

    def watching(self, step: int) -> bool:
        return self.open is not None or any(e - self.before < step <= e for e in self.schedule)

    def record(self, step: int, mse: float, l0: float, fired: torch.Tensor) -> dict[str, float] | None:
        """Add step `step` (fired: bool [d_sae] on this batch) when watched; returns the W&B row."""
        if not self.watching(step):
            return None
        row = {"step": step, "mse": mse, "l0": l0, "active": int(fired.sum()),
               "active_resampled": int(fired[self.new].sum()) if self.open is not None else 0}
        for k in CURVE_KEYS:
            self.curve[k].append(row[k])
        return {f"resample/{k}": v for k, v in row.items() if k != "step"}

    def event(self, step: int, idx: torch.Tensor, dead: torch.Tensor,
              last_fired: torch.Tensor) -> dict[str, Any]:
        """Start watching the event at `step` that resampled features `idx` of the `dead` mask;
        returns its record (to append to the history)."""
        self.close(step, last_fired)
        rec = {"step": step, "count": int(idx.numel()), "dead": int(dead.sum()),
               "alive_before": int((~dead).sum()), "curve": self.curve}
        self.new.zero_()
        self.new[idx] = True
        self.alive_before.copy_(~dead)
        self.open = rec
        return rec

    def maybe_close(self, step: int, last_fired: torch.Tensor) -> dict[str, Any] | None:
        """Close the open event once `after` steps have passed; returns its record then."""
        if self.open is not None and step >= self.open["step"] + self.after:
            return self.close(step, last_fired)
        return None

    def close(self, step: int, last_fired: torch.Tensor) -> dict[str, Any] | None:
        rec = self.open
        if rec is None:
            return None
        e = rec["step"]
        rec["revived"] = int((last_fired[self.new] > e).sum())
        rec["survived"] = int((last_fired[self.alive_before] > e).sum())
        rec["watched_steps"] = step - e
        self.open, self.curve = None, _empty_curve()
        return rec

    # ---- resume --------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {"open": self.open is not None, "pending": None if self.open is not None else self.curve}

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"watch.new": self.new, "watch.alive_before": self.alive_before}

    def restore(self, state: dict[str, Any], tensors: dict[str, torch.Tensor],
                history: list[dict[str, Any]]) -> None:
        self.new.copy_(tensors["watch.new"])
        self.alive_before.copy_(tensors["watch.alive_before"])
        if state.get("open") and history:
            self.open = history[-1]
            self.curve = self.open["curve"]
        else:
            self.curve = state.get("pending") or _empty_curve()
