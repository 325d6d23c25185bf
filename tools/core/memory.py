"""What memory the machine has free (for defaults that size work to it)."""

from __future__ import annotations


def available_ram(default: float = 8e9) -> float:
    """Bytes of RAM the kernel could hand out now (MemAvailable of /proc/meminfo), or `default` where
    that file is missing (not Linux)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return float(int(line.split()[1]) * 1024)
    except OSError:
        pass
    return default
