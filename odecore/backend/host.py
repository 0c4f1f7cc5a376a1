"""Arrays of any library read on the host in one transfer."""

from __future__ import annotations

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
