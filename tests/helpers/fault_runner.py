"""Run one stage in this process and interrupt it at a chosen point (tests/tools/core/test_faults.py).

    python tests/helpers/fault_runner.py <k> <before|after> <module> <override> ...
    python tests/helpers/fault_runner.py <SIGTERM|SIGINT> <pkg.module:Name.attr> <k> <module> <override> ...

The first form SIGKILLs the stage at its k-th commit point: an `os.replace` (every atomic write) or
an `os.fsync` (shard writes, appended description records), just before or just after it, so the
kill lands between or inside a stage's durable steps; it exits 0 if the stage finishes first.

The second form runs the stage's command-line entry (`main`, as `python -m <module>` does) and sends
the process the signal right after the k-th call of the named function returns (a step, a forward
pass, a shard write): the stage stops at its next resume point with exit 128 + the signal.
"""

from __future__ import annotations

import importlib
import os
import signal
import sys


def signal_at_call(signame: str, target: str, k: int, module: str, overrides: list[str]) -> None:
    owner_name, attr = target.split(":")
    owner = importlib.import_module(owner_name)
    *path, name = attr.split(".")
    for part in path:
        owner = getattr(owner, part)
    real, count = getattr(owner, name), [0]

    def wrapped(*args, **kwargs):
        out = real(*args, **kwargs)
        count[0] += 1
        if count[0] == k:
            os.kill(os.getpid(), getattr(signal, signame))
        return out

    setattr(owner, name, wrapped)
    sys.argv = [module, *overrides]
    importlib.import_module(module).main()


def main() -> None:
    if sys.argv[1].startswith("SIG"):
        import torch

        torch.set_num_threads(1)
        signal_at_call(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5:])
        return
    k, when, module, overrides = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4:]
    count = [0]

    def wrap(real):
        def commit(*args, **kwargs):
            count[0] += 1
            if count[0] == k and when == "before":
                os.kill(os.getpid(), signal.SIGKILL)
            out = real(*args, **kwargs)
            if count[0] == k and when == "after":
                os.kill(os.getpid(), signal.SIGKILL)
            return out
        return commit

    os.replace, os.fsync = wrap(os.replace), wrap(os.fsync)
    import torch

    torch.set_num_threads(1)
    from tools.core.config import compose

    importlib.import_module(module).run(compose(overrides))


if __name__ == "__main__":
    main()
