"""Atomic accesses to one element of a 1-D array in Numba's compiled code, for threads that
share the array while they run: a watched kernel's progress (``numba_watch``) and a batch's
counter of ranges (``numba_threads``).

A plain store the compiler may keep in a register until a loop ends, and a plain load it may
hoist out of a loop, both legally, since nothing in one thread's code says that another
thread looks. The atomic ones it may not. Relaxed ordering (LLVM's ``monotonic``) costs what
a plain access does on the CPUs Numba targets; sequentially consistent ordering also makes
what a thread wrote before an access visible to the thread that sees it.
"""

from __future__ import annotations

from numba import types
from numba.core import cgutils
from numba.extending import intrinsic


def _vector(array) -> bool:
    return (
        isinstance(array, types.Array)
        and array.ndim == 1
        and isinstance(array.dtype, types.Float | types.Integer)
    )


def _pointer(context, builder, array_type, array, index):
    ary = context.make_array(array_type)(context, builder, array)
    return cgutils.get_item_pointer(context, builder, array_type, ary, [index], wraparound=False)


def _load(ordering: str):
    @intrinsic
    def load(typingctx, array, index):
        """``array[index]`` as an atomic load."""
        if not _vector(array):
            return None

        def codegen(context, builder, signature, args):
            ptr = _pointer(context, builder, signature.args[0], args[0], args[1])
            return builder.load_atomic(ptr, ordering, array.dtype.bitwidth // 8)

        return array.dtype(array, types.intp), codegen

    return load


def _store(ordering: str):
    @intrinsic
    def store(typingctx, array, index, value):
        """``array[index] = value`` as an atomic store."""
        if not _vector(array):
            return None

        def codegen(context, builder, signature, args):
            value = context.cast(builder, args[2], signature.args[2], array.dtype)
            ptr = _pointer(context, builder, signature.args[0], args[0], args[1])
            builder.store_atomic(value, ptr, ordering, array.dtype.bitwidth // 8)
            return context.get_dummy_value()

        return types.void(array, types.intp, array.dtype), codegen

    return store


@intrinsic
def fetch_increment(typingctx, array, index):
    """``array[index] += 1`` as one atomic operation on an integer array, sequentially
    consistent; returns the value before."""
    if not (_vector(array) and isinstance(array.dtype, types.Integer)):
        return None

    def codegen(context, builder, signature, args):
        ptr = _pointer(context, builder, signature.args[0], args[0], args[1])
        return builder.atomic_rmw("add", ptr, context.get_constant(array.dtype, 1), "seq_cst")

    return array.dtype(array, types.intp), codegen


relaxed_load = _load("monotonic")
relaxed_store = _store("monotonic")
ordered_load = _load("seq_cst")
