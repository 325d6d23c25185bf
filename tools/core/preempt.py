"""Preemption: SIGTERM or SIGINT asks a long stage to stop at its next resume point.

`stage_main` runs every stage inside `handlers()`, which turns the first SIGTERM/SIGINT into a flag.
A loop polls `requested()` (a global read, free) at each step; when it is set, the loop writes its
resume state at the current step and raises `Preempted`, which `stage_main` reports as one line
and exit status 128 + the signal number (143 for SIGTERM, 130 for SIGINT). A second signal stops
at once, as if no handler were installed. Under `torchrun` every rank gets the signal; `agreed`
makes the ranks stop at the same step.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

SIGNALS = (signal.SIGTERM, signal.SIGINT)
_received: list[int] = []  # the signals received while handlers() is active, in order


class Preempted(Exception):
    """Raised by a loop after it saved its resume state; `stage_main` exits 128 + the signal."""

    def __init__(self, stage: str, where: str, resume_hint: str):
        self.stage, self.where, self.resume_hint = stage, where, resume_hint
        self.signum = _received[0] if _received else int(signal.SIGTERM)
        super().__init__(self.line())

    def line(self) -> str:
        """`<stage>: stopped by SIGTERM at step 74; resume state saved in ...; run ... again`."""
        name = signal.Signals(self.signum).name
        return f"{self.stage}: stopped by {name} at {self.where}; {self.resume_hint}"

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def requested() -> bool:
    """Whether SIGTERM or SIGINT arrived since `handlers()` was entered (always False outside it)."""
    return bool(_received)


def agreed(dist: Any, device: str = "cpu") -> bool:
    """`requested()` on any rank (one all-reduce of a flag under torchrun): every rank stops together.

    `dist` is a `tools.core.distributed.Dist`; called at the same points on every rank."""
    if not getattr(dist, "on", False):
        return requested()
    import torch
    import torch.distributed as tdist

    flag = torch.tensor([1.0 if requested() else 0.0], device=device)
    tdist.all_reduce(flag, op=tdist.ReduceOp.MAX)
    return bool(flag.item() > 0)


def saved_hint(path: os.PathLike | str) -> str:
    """The usual resume hint: where the state is and what to run."""
    return f"resume state saved in {path}; run the same command again to resume"


@contextmanager
def handlers() -> Iterator[None]:
    """Install SIGTERM/SIGINT handlers that set the flag; the previous handlers come back on exit.

    Outside the main thread (signals cannot be caught there) it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in SIGNALS}

    def on_signal(signum: int, frame: Any) -> None:
        if _received:  # the second signal: no more waiting for a resume point
            for s, h in previous.items():
                signal.signal(s, h)
            signal.raise_signal(signum)
            return
        _received.append(signum)

    _received.clear()
    for s in SIGNALS:
        signal.signal(s, on_signal)
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        _received.clear()
