"""The argument checks of ``odecore.cnf``, each written once: the divergence, the augmented
dynamics, the log-density and the sampler share them, so that one mistake gets one message
wherever it is made."""

from __future__ import annotations

import math
import numbers
import sys
import weakref

import numpy as np

from odecore import _validate
from odecore._validate import differing, dtype_kind
from odecore.backend.host import host_array

TRACE_METHODS = ("exact", "hutchinson")
NOISES = ("rademacher", "gaussian")
ERROR_CONTROLS = ("state", "all")
REGULARIZERS = ("kinetic", "jacobian_frobenius")
"""The names of RNODE's regularisers, as ``regularizers=`` of [`log_prob`][odecore.cnf.log_prob]
and [`augmented_dynamics`][odecore.cnf.augmented_dynamics] take them."""


def check_trace(method, name: str) -> None:
    if not isinstance(method, str) or method not in TRACE_METHODS:
        raise ValueError(f"{name} must be 'exact' or 'hutchinson', got {method!r}")


def check_noise(noise) -> None:
    if not isinstance(noise, str) or noise not in NOISES:
        raise ValueError(f"noise must be 'rademacher' or 'gaussian', got {noise!r}")


def check_error_control(error_control) -> None:
    if not isinstance(error_control, str) or error_control not in ERROR_CONTROLS:
        raise ValueError(
            f"error_control must be 'state' (log-density and regularisers left out of the "
            f"step-size control) or 'all', got {error_control!r}"
        )


def check_regularizers(regularizers) -> tuple[str, ...]:
    if isinstance(regularizers, str) or not isinstance(regularizers, (tuple, list)):
        raise TypeError(
            f"regularizers must be a tuple of names from {REGULARIZERS}, got {regularizers!r}"
        )
    for name in regularizers:
        if name not in REGULARIZERS:
            raise ValueError(f"unknown regularizer {name!r}; choose from {REGULARIZERS}")
    if len(set(regularizers)) != len(regularizers):
        raise ValueError(f"regularizers lists a name twice: {tuple(regularizers)!r}")
    return tuple(regularizers)


def check_regularizer_range(xp, dtype, regularizers, size: int) -> None:
    """Refuse ``jacobian_frobenius`` in a dtype whose range its rate outgrows (see
    :func:`check_frobenius_range`): the solve failed on a non-finite rate with a message
    that blamed the velocity."""
    if "jacobian_frobenius" in regularizers:
        check_frobenius_range(
            xp,
            dtype,
            size,
            "the 'jacobian_frobenius' regularizer cannot be integrated",
            "its rate",
            "Give x in float32 or bfloat16 (float32's range), or leave the regularizer out",
        )


def check_frobenius_range(xp, dtype, size: int, refused: str, term: str, fix: str) -> None:
    """Refuse a dtype whose range ``||df/dz||_F^2`` outgrows: it sums ``size * size``
    squares (Hutchinson's ``||eps^T J||^2`` estimates that sum), so in float16 (largest
    65504) it overflowed to inf once the root mean square of the Jacobian's entries reached
    ``256 / size``. ``refused`` says what cannot be done, ``term`` names the sum, ``fix``
    says what to do instead."""
    largest = float(xp.finfo(dtype).max)
    # Below 2^127: less than float32's exponent range, which bfloat16 shares.
    if largest < 2.0**127:
        raise TypeError(
            f"{refused} in {dtype}: {term} sums the squares of the {size}x{size} entries of "
            f"df/dz, and exceeds {dtype}'s largest value {largest:g} once their root mean "
            f"square reaches {math.sqrt(largest) / size:.3g}. {fix}"
        )


def check_event_shape(event_shape) -> tuple[int, ...]:
    """One sample's shape: a positive int or a tuple of them."""
    if isinstance(event_shape, numbers.Integral) and not isinstance(event_shape, bool):
        event_shape = (event_shape,)
    if not isinstance(event_shape, (tuple, list)) or not all(
        isinstance(n, numbers.Integral) and not isinstance(n, bool) and n > 0 for n in event_shape
    ):
        raise ValueError(
            f"event_shape must be a positive int or a tuple of them (one sample's shape), "
            f"got {event_shape!r}"
        )
    return tuple(int(n) for n in event_shape)


def check_velocity(f) -> None:
    if not callable(f):
        raise TypeError(f"f must be a callable f(t, z) or f(t, z, params), got {f!r}")


def check_velocity_value(bk, value, z) -> None:
    """The velocity ``f`` returned at ``z``: an array of the backend shaped like ``z``, of a
    real floating dtype. Anything else failed inside the framework's autodiff, in words that
    named neither ``f`` nor its value; an integer velocity was a constant to autodiff, whose
    divergence came out zero, and a complex one made it complex."""
    if not bk.owns(value):
        raise TypeError(
            f"f must return a {bk.name} array shaped like z, the velocity dz/dt; it returned "
            f"{type(value).__name__}"
        )
    if tuple(value.shape) != tuple(z.shape):
        raise ValueError(
            f"f returned shape {tuple(value.shape)} for z of shape {tuple(z.shape)}; return "
            f"the velocity dz/dt shaped like z: one rate per element of each sample"
        )
    if dtype_kind(bk.xp, value.dtype) != "real floating":
        raise TypeError(
            f"f returned dtype {value.dtype} for z of dtype {z.dtype}; the velocity must be "
            f"real floating, as z is: return it in z's dtype"
        )


def check_batch_axis(batch_axis) -> None:
    if batch_axis not in (None, 0) or isinstance(batch_axis, bool):
        raise ValueError(
            f"batch_axis must be None (one solve for the whole batch) or 0 (each sample "
            f"steps on its own): the samples of x are along its first axis, got {batch_axis!r}"
        )


def batch_state(bk, value, name: str, finite: bool, dtype=None):
    """``value`` as the backend's array of samples, checked as an ODE's ``y0`` is (and named
    ``name``, where the solve would name it ``y0``), then for its sample axis. A plain value
    is read at ``dtype`` (None: the library's default). ``finite``: whether NaN and inf are
    refused here, or left to a batched solve's per-sample statuses."""
    if not bk.owns(value):
        value = _validate.as_array(
            bk, value, name, "an array of real floating numbers", dtype=dtype
        )
    array = _validate.initial_state(bk, value, finite=finite, name=name, empty=True)
    check_batch_state(bk.xp, array, name)
    return array


def time_value(bk, value, name: str):
    """A time, or times, given as numbers or arrays of real numbers (a string or None is
    refused naming ``name``, where the library raised its own error or parsed it)."""
    return _validate.real_numbers(bk, value, name, "a time", convert=_validate.time_array)


def check_time(bk, t) -> None:
    """``t`` at which a velocity is evaluated: real and finite, one time or one per sample;
    the velocity is called with ``t`` as it was given."""
    if isinstance(t, numbers.Real) and not isinstance(t, bool):
        finite = math.isfinite(t)
    else:
        arr = time_value(bk, t, "t")
        finite = bk.is_traced(arr) or bool(bk.xp.all(bk.xp.isfinite(arr)))
    if not finite:
        raise ValueError(f"t contains NaN or infinite values, got {t!r}")


def check_batch_state(xp, z, name: str) -> None:
    """A real floating-point state with the samples along its first axis and at least one
    element each."""
    if not xp.isdtype(z.dtype, "real floating"):
        raise TypeError(f"{name} must hold real floating-point numbers, got dtype {z.dtype}")
    if z.ndim < 2:
        raise ValueError(
            f"{name} must have shape (batch, *event_shape), with the samples along the first "
            f"axis, got shape {tuple(z.shape)}; for one sample, add an axis: {name}[None]"
        )
    if math.prod(z.shape[1:]) == 0 or z.shape[0] == 0:
        raise ValueError(f"{name} has no elements (shape {tuple(z.shape)})")


def check_probes_for_trace(trace: str, eps, name: str) -> None:
    """Hutchinson's trace needs probes; the exact trace takes none. ``name`` is the trace
    argument's name."""
    if trace == "hutchinson" and eps is None:
        raise ValueError(
            f"{name}='hutchinson' needs the probes: pass eps, an array shaped like the state "
            f"(B, *event_shape), with Rademacher or standard normal entries"
        )
    if trace == "exact" and eps is not None:
        raise ValueError(f"eps is for {name}='hutchinson'; the exact trace uses no probes")


def probes(bk, eps, z):
    """The Hutchinson probes ``eps``, one per sample of the state ``z``: real and finite, in
    ``z``'s dtype. A probe of another real dtype is converted (the VJP of JAX refused one,
    while NumPy and torch promoted it); a complex probe made the divergence complex, and
    NaN made it NaN, or failed the log-density's solve naming the dynamics."""
    if not bk.owns(eps):
        eps = _validate.as_array(
            bk, eps, "eps", "an array shaped like the state", dtype=z.dtype, like=z
        )
    if not _validate.is_real(bk.xp, eps.dtype):
        raise TypeError(
            f"eps must hold real numbers (Rademacher or standard normal probes), got dtype "
            f"{eps.dtype}"
        )
    if eps.dtype != z.dtype:
        eps = bk.xp.astype(eps, z.dtype)
    eps = _validate.initial_state(bk, eps, name="eps", empty=True)
    check_probes(eps, z)
    return eps


def check_probes(eps, z) -> None:
    if tuple(eps.shape) != tuple(z.shape):
        raise ValueError(
            f"eps must have the shape of the state, {tuple(z.shape)} (one probe per sample), "
            f"got {tuple(eps.shape)}"
        )


def check_parameter_dtype(bk, dtype, leaves, given: str, fix: str) -> None:
    """Refuse a state dtype that none of the velocity's floating parameters (``leaves``) has,
    on a backend that does not promote between floating dtypes: the velocity's first product
    raised the library's own dtype mismatch from deep inside the solve, naming neither
    argument. ``given`` says where the state's dtype came from, ``fix`` how to change it."""
    if bk.promotes_floats:
        return
    floats = floating_dtypes(bk, leaves)
    if floats and dtype not in floats:
        raise TypeError(
            f"{given} is {dtype}, and f's parameters are {floats[0]}: the velocity "
            f"computes with both, and {bk.name} does not mix floating dtypes in one product. "
            f"{fix.format(params=floats[0])}, or convert the parameters to {dtype} "
            f"(.to({dtype}) on the module or the params)"
        )


def floating_dtypes(bk, leaves) -> list:
    """The real floating dtypes of ``leaves``, in order; leaves that are not arrays (a
    number, or what a velocity ignores) have none."""
    return [
        leaf.dtype
        for leaf in leaves
        if hasattr(leaf, "dtype") and dtype_kind(bk.xp, leaf.dtype) == "real floating"
    ]


def random_source(what: str, **given):
    """The one source of random numbers among ``given`` (``seed``, ``key``, ``generator``,
    or what stands in for the draws, ``eps`` or ``z``) that is not None: ``(name, value)``,
    or ``(None, None)``. ``what`` names what is drawn, for the message."""
    named = [(name, value) for name, value in given.items() if value is not None]
    if len(named) > 1:
        raise ValueError(
            f"{' and '.join(name for name, _ in named)} each give the {what}: pass at most "
            f"one of {', '.join(given)}"
        )
    name, value = named[0] if named else (None, None)
    if name == "seed" and (isinstance(value, bool) or not isinstance(value, numbers.Integral)):
        raise TypeError(f"seed must be an int, got {value!r}")
    if name == "seed" and value < 0:
        # NumPy's generator refused it, in words that named no argument.
        raise ValueError(f"seed must be a non-negative int, got {value!r}")
    if name == "generator" and isinstance(value, numbers.Integral):
        # An int generator was read as a seed: a mistake passed for a choice, as an int key.
        raise TypeError(
            f"generator must be a numpy.random.Generator (or a torch.Generator on torch), got "
            f"the int {value!r}; an int seeds the draws as seed={value!r}"
        )
    if name == "key" and isinstance(value, numbers.Integral):
        # An int key was read as a seed, on every backend: a mistake passed for a choice.
        raise TypeError(
            f"key must be a JAX PRNG key (jax.random.key({value!r})), got the int {value!r}; "
            f"an int seeds the draws as seed={value!r}, and on torch a torch.Generator goes "
            f"in generator="
        )
    generator = _generator_name(value) if name == "key" else None
    if generator is not None:
        # A generator in key drew the same numbers as in generator=, and the docs say key
        # is a JAX PRNG key: accepting it hid which argument was meant.
        raise TypeError(
            f"key must be a JAX PRNG key, got a {generator}: pass a generator as generator= instead"
        )
    return name, value


def _generator_name(value) -> str | None:
    """The name of ``value``'s kind where it is a NumPy or torch random generator, else
    None; torch is looked for only where it was imported, since then a torch.Generator
    can exist."""
    if isinstance(value, np.random.Generator):
        return "numpy.random.Generator"
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(value, torch.Generator):
        return "torch.Generator"
    return None


# velocity -> the (shape, dtype) of x it was found not to mix samples at. A velocity's
# architecture, not its weights, decides whether it mixes them: checked once per shape.
_SEPARATE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def check_samples_separate(bk, f, t, x, params, per_sample_time: bool) -> None:
    """Raise where the velocity ``f`` mixes samples: the log-density takes the trace of each
    sample's own Jacobian block, so a velocity that makes one sample's rate depend on
    another's state (statistics over the batch, a batch norm in training mode, attention
    across it) gives every sample a wrong log-density, without a word. ``f`` is called at
    ``x`` twice, and with its first and its last sample moved; the other samples'
    velocities must not change. A velocity not shaped like ``x`` is refused here too. A
    velocity whose two calls at ``x`` differ (dropout) is not checked, nor are values not
    known yet (under ``jit``), nor one that fails on these calls (the solve reports that
    itself)."""
    if x.shape[0] < 2 or any(bk.is_traced(v) for v in (x, t)):
        return
    key = (tuple(x.shape), str(x.dtype))
    try:
        if key in _SEPARATE.get(f, ()):
            return
    except TypeError:  # a velocity that cannot be referenced weakly is checked every time
        pass
    xp = bk.xp
    t0 = xp.broadcast_to(t[0], (x.shape[0],)) if per_sample_time else t[0]
    # The first sample moved, and the last: a rate that reads a neighbour is seen from one
    # side or the other (sample 0 reading sample 1 is seen only by moving the last).
    first_moved = xp.concat([x[:1] * 0.5 + 1.0, x[1:]])
    last_moved = xp.concat([x[:-1], x[-1:] * 0.5 + 1.0])

    def call(z):
        return f(t0, z) if params is None else f(t0, z, params)

    try:
        with bk.no_grad():
            # On copies: the caller's x must not change whatever f does with its argument.
            first, again = call(_copy(bk, x)), call(_copy(bk, x))
            shape = tuple(getattr(first, "shape", ()))
            if shape != tuple(x.shape):
                changed = None
            elif _differ(xp, first, again) is not None:
                return
            else:
                changed = _differ(xp, first[1:], call(first_moved)[1:])
                changed = None if changed is None else changed + 1
                if changed is None:
                    changed = _differ(xp, first[:-1], call(last_moved)[:-1])
    except Exception:  # noqa: BLE001 - the solve calls f itself and reports what it raises
        return
    if shape != tuple(x.shape):
        raise ValueError(
            f"f returned shape {shape} for x of shape {tuple(x.shape)}; return the velocity "
            f"dz/dt shaped like z: one rate per element of each sample"
        )
    if changed is not None:
        raise ValueError(
            f"f mixes samples: moving another sample changed the velocity of x[{changed}]. "
            f"The log-density takes each sample's own trace of df/dz, so each "
            f"sample's velocity must depend on that sample alone: no statistics over the "
            f"batch (a batch norm must be in eval mode), no attention across it"
        )
    try:
        _SEPARATE.setdefault(f, set()).add(key)
    except TypeError:
        pass


def _differ(xp, a, b) -> int | None:
    """The first sample (along the first axis) where ``a`` and ``b`` differ, NaN equal to NaN;
    None where none does."""
    different = differing(xp, a, b)
    rows = xp.reshape(different, (different.shape[0], -1))
    found = np.flatnonzero(host_array(xp.any(rows, axis=1)))
    return int(found[0]) if found.size else None


def _copy(bk, x):
    """A copy of ``x`` that records nothing: the probes of ``check_samples_separate`` run
    under no_grad, where torch warns about copying a tensor that requires grad."""
    return bk.xp.asarray(bk.stop_gradient(x), copy=True)
