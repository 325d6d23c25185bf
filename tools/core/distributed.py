"""torch.distributed under `torchrun`, shared by every stage that runs on several ranks.

`Dist.start(device)` joins the process group that `torchrun` describes in the environment (NCCL for
CUDA work, gloo otherwise) and `close()` leaves it if this process created it. Outside `torchrun`
it is a single rank and every collective below is the identity.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class Dist:
    """This process's place in the job: rank, world size, local rank, whether a group is up."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    on: bool = False  # a process group is initialised (world > 1 under torchrun)
    owned: bool = False  # this process initialised it, so close() destroys it

    @property
    def master(self) -> bool:
        return self.rank == 0

    @classmethod
    def start(cls, device: str = "cpu", backend: str | None = None, timeout_s: float | None = None) -> Dist:
        """Join torchrun's group (`backend`: nccl for a CUDA `device`, else gloo; `timeout_s`: how long a
        collective may wait, torch's default when None); one rank otherwise."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1 or "RANK" not in os.environ:
            return cls()
        import torch.distributed as tdist

        owned = not tdist.is_initialized()
        if owned:
            from datetime import timedelta

            tdist.init_process_group(backend=backend or ("nccl" if device.startswith("cuda") else "gloo"),
                                     **({"timeout": timedelta(seconds=timeout_s)} if timeout_s else {}))
        rank = tdist.get_rank()
        local = int(os.environ.get("LOCAL_RANK", rank))
        return cls(rank, tdist.get_world_size(), local, True, owned)

    def device(self, device: str) -> str:
        """`cuda` becomes this rank's own GPU (`cuda:<local_rank>`, made current) under torchrun."""
        if self.on and device.startswith("cuda"):
            device = f"cuda:{self.local_rank}"
            torch.cuda.set_device(device)
        return device

    def close(self) -> None:
        if self.owned:
            import torch.distributed as tdist

            if tdist.is_initialized():
                tdist.destroy_process_group()

    def mean(self, value: float, device: str) -> float:
        """The mean of a float over the ranks."""
        if not self.on:
            return value
        import torch.distributed as tdist

        t = torch.tensor([value], dtype=torch.float64, device=device)
        tdist.all_reduce(t)
        return float(t.item()) / self.world

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order (a list of one outside torchrun)."""
        if not self.on:
            return [obj]
        import torch.distributed as tdist

        out: list[Any] = [None] * self.world
        tdist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.on:
            import torch.distributed as tdist

            tdist.barrier()
