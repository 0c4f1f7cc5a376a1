"""How Numba compiles each function of a kernel: one rule for the kernels compiled in memory
(``adapters.numba``) and those written to disk (``adapters.numba_cache``).

Reference counting. Every row the loop hands on is a view of a work array, and Numba counts
references to views with atomic operations that the compiler cannot remove across a call.
The loop's own functions allocate nothing, so they are compiled without reference counting
(:data:`KERNEL`). The user's code may allocate (a returning ``f`` allocates its rate, an
``f`` in place may use scratch arrays), so it runs inside a wrapper compiled with counting
(:data:`USER_CODE`), which frees what the user's code allocated before it returns: counts
inside the wrapper, none around it. Numba compiles a callee with its caller's counting
unless told otherwise, so the wrapper sets it, and the user's functions it calls count too.
Against counting in the whole loop (as the returning form was compiled before): a returning
``f``'s tsit5 ensemble on the Lorenz sweep 97 -> 89 ms, dopri8's 64 -> 45 ms (one thread,
N = 4096, AMD EPYC).

Inlining. The loop's phases are small functions, and a step is fast only once they are one
function again: the method's constants folded in, the loop-invariant values hoisted. They
are inlined by LLVM (``forceinline=True``): each is typed once and LLVM inlines its code.
Numba's own inlining (``inline='always'``) types a copy of the callee again at every call
site, and compiling the loop took twice as long with it: a dopri5 kernel's first call
13.5 -> 6.9 s, a returning ``f``'s tsit5 ensemble 20.9 -> 11.8 s, with the same steps and
speed. A function that returns a view of its argument (``loop.VIEWS``) cannot be compiled
apart without counting, and keeps Numba's inlining.

Literals. Numba compiles a function called from compiled code once for each distinct
*literal* argument as well: ``part_norm(work, 0, ...)`` and ``part_norm(work, 5, ...)`` are
two compilations, fifteen of them in a dopri5 kernel. :func:`one_copy_per_type` has each
typed by its arguments' plain types; the constants reach the code anyway once it is inlined.
"""

from __future__ import annotations

import numba

from odecore.kernels import loop, replay

# The kernel's own functions: they allocate nothing.
KERNEL = {"_nrt": False}

# The wrapper around the user's f or VJP: counts, and frees what they allocate. Inlined by
# LLVM into the kernel's evaluation like the loop's phases.
USER_CODE = {"_nrt": True, "forceinline": True}

_INLINED = {"forceinline": True, **KERNEL}


def loop_options(name: str, nogil: bool = False) -> dict:
    """Numba's options for the kernel loop's function ``name`` (``odecore.kernels.loop``):
    the entry points (without the interpreter's lock where ``nogil``: a watched solve runs
    in a thread of its own) and the functions the loop calls (``loop.OUT_OF_LINE``) are
    compiled apart, the rest inlined."""
    if name in loop.ENTRY_POINTS:
        return {**({"nogil": True} if nogil else {}), **KERNEL}
    if name in loop.OUT_OF_LINE:
        return KERNEL
    if name in loop.VIEWS:
        return {"inline": "always"}
    return _INLINED


def replay_options(name: str) -> dict:
    """Numba's options for the checkpoint replay's function ``name``
    (``odecore.kernels.replay``): inlined where ``replay.INLINE`` says, else apart."""
    return _INLINED if name in replay.INLINE else KERNEL


def one_copy_per_type(dispatcher):
    """``dispatcher``, typed at its calls from compiled code by its arguments' plain types
    (``Literal[int](5)`` as ``int64``): one compilation per type rather than one per
    constant. Numba compiles the callee for the argument types its caller passes
    (``Dispatcher.get_call_template``); this passes them without their literal values."""
    if dispatcher.targetoptions.get("inline", "never") != "never":
        # Numba's IR inlining copies the source into the caller and types it there.
        return dispatcher
    typed = dispatcher.get_call_template

    def get_call_template(args, kws):
        plain = tuple(numba.types.unliteral(a) for a in args)
        return typed(plain, {key: numba.types.unliteral(v) for key, v in kws.items()})

    dispatcher.get_call_template = get_call_template
    return dispatcher
