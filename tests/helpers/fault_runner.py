"""Run one stage in this process and SIGKILL it at its k-th commit point (tests/tools/core/test_faults.py).

    python tests/helpers/fault_runner.py <k> <before|after> <module> <override> ...

A commit point is an `os.replace` (every atomic write) or an `os.fsync` (shard writes, appended
description records). The process kills itself just before or just after the k-th one, so the kill
lands between or inside a stage's durable steps; it exits 0 if the stage finishes first.
"""

from __future__ import annotations

import importlib
import os
import signal
import sys


def main() -> None:
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
