"""The host: arrays of any library read on it in one transfer, and its free memory."""

from __future__ import annotations

import os
from typing import Any

import array_api_compat
import numpy as np


def host_array(x: Any) -> np.ndarray:
    """``x`` as a NumPy array in host memory. One copy for a device array (CuPy, torch on a
    GPU), where reading it element by element costs a device synchronisation per element:
    a batch of a million samples then waits a million times."""
    if array_api_compat.is_torch_array(x):
        x = x.detach().cpu()
    elif array_api_compat.is_cupy_array(x):
        x = x.get()
    return np.asarray(x)


def available_memory() -> int | None:
    """Bytes of host memory a new allocation can still get: Linux's estimate (MemAvailable),
    lowered to what is left under the process's cgroup limit where it has one; None where
    the system does not say."""
    try:
        with open("/proc/meminfo") as info:
            fields = dict(line.split(":", 1) for line in info)
        free = int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        try:
            free = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
        except (AttributeError, ValueError, OSError):
            return None
    try:
        with (
            open("/sys/fs/cgroup/memory.max") as limit,
            open("/sys/fs/cgroup/memory.current") as used,
        ):
            cap = limit.read().strip()
            if cap != "max":
                free = min(free, int(cap) - int(used.read()))
    except (OSError, ValueError):
        pass
    return free
