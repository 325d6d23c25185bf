"""Builders and fixtures shared by the test modules (no test module imports another)."""

import os
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the checkout


def torchrun(module: str, args: list[str], nproc: int = 2, timeout: float = 300) -> str:
    """`python -m <module> args` under `torchrun --standalone` with `nproc` CPU ranks (gloo) from the
    checkout; its stdout. A hung job is killed with its workers."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", module, *args]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun's workers too
        raise
    assert proc.returncode == 0, err[-3000:]
    return out
