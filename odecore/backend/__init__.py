"""Backends: the protocol an array library implements for the core, and the registry that
finds one by name or by the arrays passed in."""

from odecore.backend.protocol import Autodiff, Backend, Kernels, Tracing
from odecore.backend.registry import (
    BACKEND_NAMES,
    BackendNotAvailableError,
    DeviceNotAvailableError,
    get_backend,
    infer_backend,
    is_traced,
    library_of,
)

__all__ = [
    "BACKEND_NAMES",
    "Autodiff",
    "Backend",
    "BackendNotAvailableError",
    "DeviceNotAvailableError",
    "Kernels",
    "Tracing",
    "get_backend",
    "infer_backend",
    "is_traced",
    "library_of",
]
