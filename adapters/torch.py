"""The PyTorch backend: eager, with torch autograd.

The core's gradient rules (backsolve, checkpoint) become one ``torch.autograd.Function``; the
dynamics' VJPs come from ``torch.autograd.grad``. ``direct`` mode is plain autograd through
the core's loop. No gradient algorithm lives here.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from typing import Any

import array_api_compat.torch as xp_torch
import numpy as np
import torch
from torch.autograd import forward_ad

from odecore.backend import Autodiff, Backend, Kernels
from odecore.backend.structured import StructuredFunc
from odecore.backend.tree import leaves as tree_leaves
from odecore.backend.tree import replace_leaves


class TorchAutodiff(Autodiff):
    """torch autograd: VJPs from ``torch.autograd.grad``, rules as one
    ``torch.autograd.Function``."""

    def param_leaves(self, func, params) -> list[Any]:
        """Tensors in ``params``, then the parameters of an ``nn.Module`` ``func`` (found
        without being passed, as torchdiffeq users expect), each once."""
        leaves = [
            x
            for _, x in (tree_leaves(params) if params is not None else [])
            if isinstance(x, torch.Tensor) and x.is_floating_point()
        ]
        if isinstance(func, torch.nn.Module):
            seen = {id(x) for x in leaves}
            leaves += [p for p in func.parameters() if p.requires_grad and id(p) not in seen]
        if torch.is_grad_enabled():
            _refuse_inference_leaves(leaves)
        return leaves

    def requires_grad(self, values: Any) -> bool:
        return torch.is_grad_enabled() and any(
            isinstance(x, torch.Tensor) and x.requires_grad for _, x in tree_leaves(values)
        )

    def _differentiable_call(self, func, params, leaves, t, y, track=True):
        """``func(t, y[, params])`` recorded for autograd, and the tensors to differentiate
        with respect to: ``y``, then one per entry of ``leaves``. Tensors of ``params`` are
        replaced by detached copies that require grad, so that a plain tensor gets a
        gradient too and nothing accumulates on the user's own graph; other leaves (a
        Module's parameters, tensors named in adjoint_params) are used as they are.
        ``track=False``: ``y`` and the copies do not require grad."""
        y = _fresh_leaf(y, track)
        inputs = list(leaves)
        if params is not None:
            copies = {}

            def copy(x):
                if id(x) not in copies:
                    copies[id(x)] = _fresh_leaf(x, track)
                return copies[id(x)]

            explicit = [x for _, x in tree_leaves(params)]
            params = replace_leaves(
                params, [copy(x) for x in _float_tensors(explicit)], _is_float_tensor
            )
            inputs = [copies.get(id(x), x) for x in inputs]
        out = func(t, y) if params is None else func(t, y, params)
        return out, [y, *inputs]

    def linearize(self, func, params, leaves, t, y):
        with torch.enable_grad():
            out, inputs = self._differentiable_call(func, params, leaves, t, y)
        # A tensor that takes no part in the graph (unused, or named in adjoint_params
        # without requiring grad) gets a zero gradient, not None and not an error.
        wanted = [i for i, x in enumerate(inputs) if x.requires_grad]

        def pullback(cot):
            grads = [None] * len(inputs)
            if out.requires_grad:
                # Called once per evaluation: the graph is freed as the gradient runs.
                found = torch.autograd.grad(
                    out, [inputs[i] for i in wanted], cot, allow_unused=True
                )
                for i, g in zip(wanted, found, strict=True):
                    grads[i] = g
            grads = [
                torch.zeros_like(x) if g is None else g for g, x in zip(grads, inputs, strict=True)
            ]
            return grads[0], grads[1:]

        return out.detach(), pullback

    def linearize_reusable(self, func, params, leaves, t, y):
        with torch.enable_grad():
            out, inputs = self._differentiable_call(func, params, leaves, t, y)
        wanted = [x for x in inputs if x.requires_grad]

        def pull(cot, wrt):
            # The graph is kept (retain_graph) for the next cotangent; autograd computes
            # only the paths that reach ``wrt``, so pull_y skips the parameters' products.
            found = [None] * len(wrt)
            if out.requires_grad and wrt:
                found = torch.autograd.grad(out, wrt, cot, allow_unused=True, retain_graph=True)
            return [
                torch.zeros_like(x) if g is None else g for g, x in zip(found, wrt, strict=True)
            ]

        def pull_y(cot):
            return pull(cot, [inputs[0]])[0]

        def pull_all(cot):
            found = iter(pull(cot, wanted))
            grads = [next(found) if x.requires_grad else torch.zeros_like(x) for x in inputs]
            return grads[0], grads[1:]

        return out.detach(), pull_y, pull_all

    def residual(self, x):
        return x.detach()

    def first_order_only(self, x, message):
        return _FirstOrderIdentity.apply(x, message) if x.requires_grad else x

    def attach_zero_gradients(self, out, leaves):
        if torch.is_grad_enabled():  # the leaves of adjoint_params in direct mode
            _refuse_inference_leaves(leaves)
        leaves = [x for x in leaves if x.requires_grad]
        return _ZeroGradient.apply(out, *leaves) if leaves else out

    def hidden_parameters(self, func, params, leaves, t0, y0):
        # An evaluation recorded for autograd from copies of y and t: every tensor the graph
        # reaches that requires grad must be a listed leaf (or its stand-in copy). Without
        # grad mode nothing gets a gradient, and nothing is missed.
        if not torch.is_grad_enabled():
            return []
        # A copy of t0 that records nothing, and is an ordinary tensor where t0 was made
        # under inference_mode: func may save it for a gradient.
        time = _fresh_leaf(t0, requires_grad=False)
        try:
            # y and the copies of params require grad, as in a backward's evaluations:
            # dynamics that differentiate themselves (a flow's divergence) differentiate
            # with respect to y itself then, and otherwise make a leaf of their own, which
            # would look hidden.
            return self._unlisted_leaves(func, params, leaves, time, y0, track=True)
        except RuntimeError as error:
            if _INFERENCE_SAVED not in str(error):
                raise
            # func saves a tensor made under inference_mode (a weight of a frozen model
            # built there) for the gradient with respect to y or a parameter. Every
            # evaluation of a backward is made as the probe's, and would fail alike.
            if any(x.requires_grad for x in (t0, y0, *leaves)):
                raise RuntimeError(_INFERENCE_WEIGHTS_MESSAGE) from error
        # Nothing asks for a gradient, so no backward evaluates func, and the solve
        # evaluates it with nothing requiring grad but what func captures: so does the
        # probe now. Its graph holds only what reaches a tensor that already requires
        # grad; where that path needs an inference tensor, torch's error is the solve's
        # own. What looks hidden and is not: a leaf func makes for itself from the
        # untracked y, as dynamics that differentiate themselves do. A flow's divergence
        # differentiates the model with respect to y, and fails on its inference weights in
        # the solve itself; only dynamics that differentiate themselves around an inference
        # tensor they use elsewhere would be refused wrongly.
        return self._unlisted_leaves(func, params, leaves, time, y0, track=False)

    def _unlisted_leaves(self, func, params, leaves, t, y, track):
        with torch.enable_grad():
            out, inputs = self._differentiable_call(func, params, leaves, t, y, track)
        return _graph_leaves(out, {id(x) for x in inputs})

    def vjp(self, fn, *primals):
        """``(fn(*primals), pullback)`` with ``pullback(cotangent) -> tuple of cotangents``."""
        primals = [_fresh_leaf(p) for p in primals]
        with torch.enable_grad():
            out = fn(*primals)

        def pullback(cotangent):
            grads = torch.autograd.grad(
                out, primals, cotangent, allow_unused=True, retain_graph=True
            )
            return tuple(
                torch.zeros_like(p) if g is None else g for g, p in zip(grads, primals, strict=True)
            )

        return out.detach(), pullback

    def jvp(self, fn, primals, tangents):
        """``(fn(*primals), tangent of the output)``, by forward-mode autodiff."""
        # Forward mode writes a tangent into each primal's storage: an expanded tensor (one
        # row seen many times) would alias its elements, which torch refuses.
        primals = tuple(p.contiguous() for p in primals)
        out, tangent = torch.func.jvp(fn, primals, tuple(tangents))
        return out, tangent

    def differentiable_vjp(self, fn, x, differentiable=True):
        # Records a graph of the VJP itself (create_graph) only when the caller records one
        # and wants it: a solve evaluating under no_grad (a rule's forward, evaluation) or
        # one that nothing differentiates pays for none.
        recording = torch.is_grad_enabled()
        higher = differentiable and recording
        with torch.enable_grad():
            x = _differentiable_input(x, recording)
            out = fn(x)

        def pullback(cotangent):
            if not out.requires_grad:
                return torch.zeros_like(x)
            with torch.enable_grad():
                (grad,) = torch.autograd.grad(
                    out, x, cotangent, retain_graph=True, create_graph=higher, allow_unused=True
                )
            return torch.zeros_like(x) if grad is None else grad

        return (out if higher else out.detach()), pullback

    def basis_products(self, fn, x, differentiable=True):
        # One backward pass for the whole basis (autograd's batched gradients, vmap over the
        # backward graph) instead of one per basis vector.
        recording = torch.is_grad_enabled()
        higher = differentiable and recording
        with torch.enable_grad():
            x = _differentiable_input(x, recording)
            out = fn(x)
        size = math.prod(x.shape[1:])
        basis = torch.eye(size, dtype=x.dtype, device=x.device)
        basis = basis.reshape(size, 1, *x.shape[1:]).expand(size, *x.shape)
        if not out.requires_grad:
            return out, torch.zeros_like(basis)
        with torch.enable_grad():
            (rows,) = torch.autograd.grad(
                out, x, basis, create_graph=higher, allow_unused=True, is_grads_batched=True
            )
        rows = torch.zeros_like(basis) if rows is None else rows
        return (out if higher else out.detach()), rows

    def custom_vjp(self, rule):
        def apply(*primals):
            # The rule's aux values (a solve's status and statistics) have no gradient: they
            # leave the Function beside it rather than as outputs autograd would track.
            if torch.is_grad_enabled():  # the leaves of adjoint_params in the rules' modes
                _refuse_inference_leaves(primals)
            aux = []
            out = _RuleFunction.apply(rule, aux, *primals)
            return out, aux[0]

        return apply


def _differentiable_input(x, recording):
    """``x`` to differentiate ``fn`` at: itself where the caller records a graph through it
    (its derivatives then reach what ``x`` came from), else a fresh leaf. Under no_grad a
    view of a tensor that requires grad (a rule's forward slicing its input) still says
    ``requires_grad``, though nothing recorded how it was made: differentiating from it gave
    a Jacobian of zeros, and a flow's log-density without its trace."""
    if recording and x.requires_grad:
        return x
    return _fresh_leaf(x)


def _fresh_leaf(x, requires_grad=True):
    """A new leaf tensor with ``x``'s values. A tensor made under torch.inference_mode()
    (data prepared for evaluation) cannot require grad outside it, nor be saved for a
    backward; its clone is an ordinary tensor."""
    return (x.clone() if x.is_inference() else x.detach()).requires_grad_(requires_grad)


def _stacked_stages(method, y0):
    return _StackedStages


def _rms_error_ratio(err, y, y_new, rtol, atol, axis):
    """odecore.control.norms.error_ratio for the rms norm, ``rms(err / (atol + rtol *
    max(|y|, |y_new|)))``, in five kernels on temporaries and outside autograd (the
    step-size control is not differentiated). A Python float for one sample (axis
    None), else a (B,) tensor."""
    with torch.no_grad():
        scale = torch.maximum(y.abs(), y_new.abs()).mul_(rtol).add_(atol)
        scaled = torch.div(err, scale, out=scale)
        if axis is None:
            return torch.linalg.vector_norm(scaled).item() / math.sqrt(scaled.numel())
        n = scaled.shape[axis]
        return torch.linalg.vector_norm(scaled, dim=axis).mul_(1.0 / math.sqrt(n))


_FUNCTORCH_MESSAGE = (
    "odecore cannot run under torch.func's transforms (grad, vmap, jacrev, jacfwd, "
    "hessian): its solves branch on tensor values and its gradient rules are "
    "autograd.Functions. Use torch.autograd.grad or .backward() for gradients, {instead}; "
    "torch.func.functional_call works"
)

# What each kind of call (Backend.check_context's ``call``) offers in the transforms' place:
# an ODE solve, a fixed point and a fixed point's diagnostics take different options, and
# only the solve has second derivatives.
_FUNCTORCH_INSTEAD = {
    "solve": (
        "batch_axis= for a batch of samples (each with its own steps), and adjoint='direct' "
        "with create_graph=True for second derivatives"
    ),
    "fixed point": (
        "backward= ('implicit', 'one_step' or 'unrolled') to choose how they are computed, "
        "batch_axis=0 for a batch of samples (each stops once it has converged), and "
        "torch.autograd.functional.jacobian for a Jacobian; a fixed point has first "
        "derivatives only"
    ),
    "diagnostic": (
        "and batch_axis=0 for one estimate per sample of a batch (jacobian_frobenius is "
        "differentiable with respect to params)"
    ),
}


_FORWARD_AD_MESSAGE = (
    "odecore does not support forward-mode autodiff (torch.autograd.forward_ad dual "
    "tensors): its solves branch on tensor values and its gradient rules are reverse-mode "
    "autograd.Functions. Use reverse mode (torch.autograd.grad or .backward()); for a "
    "Jacobian, torch.autograd.functional.jacobian (reverse mode, its default); {instead}"
)

_FORWARD_AD_INSTEAD = {
    "solve": (
        "for a Jacobian-vector product, torch.autograd.functional.jvp with adjoint='direct' "
        "(it differentiates a reverse pass)"
    ),
    "fixed point": (
        "a fixed point has first derivatives only, so no Jacobian-vector product "
        "(torch.autograd.functional.jvp differentiates a reverse pass)"
    ),
    "diagnostic": (
        "for jacobian_frobenius's derivative in one direction, the dot product of its "
        "gradient (torch.autograd.grad) with that direction"
    ),
}


class TorchBackend(Backend):
    name = "torch"
    xp = xp_torch
    eager = True
    # Autograd records in-place writes into a buffer (CopySlices) correctly as long as the
    # overwritten values are not needed for the backward pass, which holds for the output
    # buffer: the loop only reads from it what it is about to overwrite.
    inplace_ok = True
    singular_matrix_errors = (torch.linalg.LinAlgError,)
    # torch's matmul and nn layers raise on float32 weights and a float64 input.
    promotes_floats = False
    autodiff = TorchAutodiff()
    kernels = Kernels(stage_store=_stacked_stages, rms_error_ratio=_rms_error_ratio)

    def owns(self, x: Any) -> bool:
        return isinstance(x, torch.Tensor)

    def asarray(self, x: Any, dtype: Any = None, like: Any = None) -> Any:
        device = like.device if isinstance(like, torch.Tensor) else None
        if isinstance(x, torch.Tensor):
            if x.is_inference() and not torch.is_inference_mode_enabled():
                # Data prepared under inference_mode cannot be saved for a backward outside
                # it, and a solve recorded for autograd (direct mode) saves y0 and the times
                # where func's gradient needs them; a clone of it is an ordinary tensor.
                x = x.clone()
            return x.to(dtype=dtype or x.dtype, device=device or x.device)
        if isinstance(x, np.ndarray) and any(stride < 0 for stride in x.strides):
            # torch refuses to share memory with a reversed view (``t[::-1]``).
            x = np.ascontiguousarray(x)
        return torch.as_tensor(x, dtype=dtype, device=device)

    def holds_values(self, x: Any) -> bool:
        return not (isinstance(x, torch.Tensor) and x.device.type == "meta")

    def device_scope(self, x: Any):
        # torch creates tensors on the CPU unless told otherwise; a device used as a context
        # sets the default for every factory call inside. The CPU needs none, and the
        # context's function mode costs time on every operation.
        scope = _device_scope(x)
        settings = _autocast_settings()
        return _outside_autocast(scope, settings) if settings else scope

    def generic_form(self, func, params, batched=False):
        # Under the caller's torch.autocast, func runs as the caller asked (generic_form is
        # called inside device_scope, which took autocast off for the solver's own
        # arithmetic).
        settings = _caller_autocast.get()
        if not settings:
            return func
        if isinstance(func, StructuredFunc):
            return StructuredFunc(self, _under_autocast(func.func, settings), func.structure)
        return _under_autocast(func, settings)

    def scalar_maker(self, dtype: Any):
        # Much cheaper than torch.asarray through array-api-compat, and called once per
        # function evaluation (docs/performance.md).
        return functools.partial(torch.scalar_tensor, dtype=dtype)

    def write(self, out, where, value):
        # The loop owns the output buffer, so it is written in place: a plain item
        # assignment costs a fraction of array-api-extra's general-purpose ``at``.
        out[where] = value
        return out

    # On a CPU, torch's batched products of a (B, m, N) stack with (B, N, 1) vectors take
    # 4 to 7 times as long as a product and a sum over the same elements (one thread,
    # float32 (256, 6, 128): 215 against 43 us), and of (B, 1, m) weights with the stack up
    # to 5 times (1024 samples of (5, 64)). The DEQ solvers take two or four such products
    # an iteration.
    def row_products(self, rows, x):
        if rows.device.type != "cpu":
            return super().row_products(rows, x)
        return (rows * x[:, None, :]).sum(-1)

    def weighted_rows(self, weights, rows):
        if rows.device.type != "cpu":
            return super().weighted_rows(weights, rows)
        return (weights[:, :, None] * rows).sum(1)

    def no_grad(self):
        return torch.no_grad()

    def stop_gradient(self, x: Any) -> Any:
        return x.detach()

    random_sources = (
        "a torch.Generator or a numpy.random.Generator (generator=...), or an int seed (seed=...)"
    )

    def random_normal(self, source, shape, dtype, like):
        if not isinstance(source, torch.Generator):
            return super().random_normal(source, shape, dtype, like)
        device = like.device if isinstance(like, torch.Tensor) else source.device
        return torch.randn(shape, generator=source, dtype=dtype, device=device)

    def check_context(self, inputs: Any = (), call: str = "solve") -> None:
        # Under torch.func's transforms the solve fails deep inside (functorch refuses the
        # rules' autograd.Function, a batching rule is missing), each time with a message
        # about torch's internals.
        if torch._C._are_functorch_transforms_active():
            raise RuntimeError(_FUNCTORCH_MESSAGE.format(instead=_FUNCTORCH_INSTEAD[call]))
        # A dual tensor failed in the step-size control's out= kernels, with torch's words.
        # Dual tensors exist only inside a dual level, so outside one (every other call)
        # the inputs are not looked at.
        if getattr(forward_ad, "_current_level", -1) >= 0 and any(
            isinstance(x, torch.Tensor) and forward_ad.unpack_dual(x).tangent is not None
            for _, x in tree_leaves(inputs)
        ):
            raise RuntimeError(_FORWARD_AD_MESSAGE.format(instead=_FORWARD_AD_INSTEAD[call]))

    def outside_compiler(self, fn, *args, **kwargs):
        # torch.compile traced the solve's Python loop: every step reads values on the host
        # (a graph break) and every new step size recompiled, so that compiling a model
        # around a small ODE took minutes. The solve runs eagerly instead; what func
        # calls is not compiled either.
        if torch.compiler.is_compiling():
            return _eager_call(fn, args, kwargs)
        return fn(*args, **kwargs)

    def to_host_float(self, x: Any) -> float:
        return float(x.detach()) if isinstance(x, torch.Tensor) else float(x)

    def reads_cheaply(self, x: Any) -> bool:
        return not isinstance(x, torch.Tensor) or x.device.type == "cpu"


@torch.compiler.disable
def _eager_call(fn, args, kwargs):
    return fn(*args, **kwargs)


class _RuleFunction(torch.autograd.Function):
    """One rule (a solve, a fixed point) as one autograd node; the rule holds the
    framework-neutral math."""

    @staticmethod
    def forward(ctx, rule, aux, *primals):
        out, values, residuals = rule.forward(*primals)
        aux.append(values)
        ctx.rule, ctx.residuals = rule, residuals
        # Attributes, not saved tensors: an in-place change of an input after the solve
        # must not break the first-order backward, which does not read them.
        ctx.primals = primals
        # What the backward does read is saved, so that autograd refuses a backward after
        # it was changed in place (ys.mul_(2), an optimizer's step): the backsolve then
        # restarted from the changed outputs, or evaluated func at the changed parameters,
        # and failed or gave a wrong gradient without a word.
        rereads = getattr(rule, "rereads", None)
        if rereads is not None:
            ctx.save_for_backward(*rereads(primals, out))
        return out

    @staticmethod
    def backward(ctx, out_bar):
        # The residuals stay on ctx until autograd frees the graph: a backward with
        # retain_graph=True may run again.
        # needs_input_grad tells the rule which cotangents nobody asked for (the times,
        # most often), so it can skip their work.
        needs = ctx.needs_input_grad[2:]
        ctx.saved_tensors  # noqa: B018 -- reading them checks that none was written since
        # A backward run inside torch.autocast: the backward solve's arithmetic stays in the
        # state's dtype, as the forward's did (func's evaluations follow the forward's
        # autocast, see generic_form).
        settings = _autocast_settings()
        outside = _outside_autocast(None, settings) if settings else contextlib.nullcontext()
        with _device_scope(out_bar), outside:
            grads = ctx.rule.backward(ctx.residuals, out_bar, needs)
        if torch.is_grad_enabled():  # create_graph=True: a derivative of grads may follow
            grads = _first_order_only(ctx, out_bar, grads)
        return (None, None, *grads)


def _first_order_only(ctx, out_bar, grads):
    """``grads`` as the rule computed them, but recorded as depending on the rule's inputs
    and ``out_bar`` through a node whose own backward raises: the rule's backward is
    not differentiable, and a second derivative must not come out as zero or as torch's
    error about a tensor that does not require grad."""
    anchors = [x for x in (*ctx.primals, out_bar) if x.requires_grad]
    slots = [i for i, g in enumerate(grads) if g is not None]
    if not anchors or not slots:
        return grads
    message = ctx.rule.second_order_message
    wrapped = _FirstOrderOnly.apply(message, len(slots), *(grads[i] for i in slots), *anchors)
    grads = list(grads)
    for i, g in zip(slots, wrapped, strict=True):
        grads[i] = g
    return tuple(grads)


class _FirstOrderOnly(torch.autograd.Function):
    """The identity on the first ``count`` tensors; the others only connect it to the graph.
    Differentiating through it raises NotImplementedError with ``message``."""

    @staticmethod
    def forward(ctx, message, count, *tensors):
        ctx.message = message
        return tuple(x.clone() for x in tensors[:count])

    @staticmethod
    def backward(ctx, *grads):
        raise NotImplementedError(ctx.message)


class _FirstOrderIdentity(torch.autograd.Function):
    """The identity, whose gradient may be taken once: under ``create_graph`` the gradient
    it passes on is marked (``_FirstOrderOnly``), so that differentiating that gradient
    raises NotImplementedError with ``message``."""

    @staticmethod
    def forward(ctx, x, message):
        ctx.message = message
        ctx.save_for_backward(x)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        if torch.is_grad_enabled():
            (x,) = ctx.saved_tensors
            (grad,) = _FirstOrderOnly.apply(ctx.message, 1, grad, x)
        return grad, None


# The torch.autocast settings ((device type, dtype) for each device type where it is on) of
# the code that called the solve, for generic_form: device_scope turns autocast off inside.
_caller_autocast: contextvars.ContextVar[tuple] = contextvars.ContextVar(
    "odecore_torch_autocast", default=()
)


def _autocast_settings() -> tuple:
    return tuple(
        (device, torch.get_autocast_dtype(device))
        for device in ("cpu", "cuda")
        if torch.is_autocast_enabled(device)
    )


@contextlib.contextmanager
def _outside_autocast(scope, settings):
    """``scope`` (a context, or None) with torch.autocast off for the device types of
    ``settings``, which generic_form finds. autocast runs matrix products in its 16-bit
    dtype, and the solver's stage sums are matrix products: a float32 solve's error
    estimates were rounded to bfloat16, and the steps chosen from them."""
    token = _caller_autocast.set(settings)
    try:
        with contextlib.ExitStack() as stack:
            if scope is not None:
                stack.enter_context(scope)
            for device, _ in settings:
                stack.enter_context(torch.autocast(device, enabled=False))
            yield
    finally:
        _caller_autocast.reset(token)


def _under_autocast(func, settings):
    """``func`` evaluated under the caller's torch.autocast ``settings``, its rates in the
    dtype of the state: an autocast operation (a Linear layer) returns its 16-bit dtype for
    a float32 state, and the state keeps its precision, as autocast keeps a model's
    weights and optimizer state in float32."""
    low = {dtype for _, dtype in settings}

    def call(t, y, *args, **keywords):
        with contextlib.ExitStack() as stack:
            for device, dtype in settings:
                stack.enter_context(torch.autocast(device, dtype=dtype))
            out = func(t, y, *args, **keywords)
        return _in_state_dtype(out, y, low)

    call.__wrapped__ = func  # its signature is func's, for the messages about it
    return call


def _in_state_dtype(out, y, low):
    """``out`` with each tensor of an autocast dtype (``low``) cast to the dtype of the same
    part of ``y``; anything else is left for the solve's checks to report."""
    if isinstance(out, torch.Tensor):
        if (
            isinstance(y, torch.Tensor)
            and out.dtype in low
            and out.dtype != y.dtype
            and y.is_floating_point()
        ):
            return out.to(y.dtype)
        return out
    if isinstance(out, dict) and isinstance(y, dict):
        return {k: _in_state_dtype(v, y[k], low) if k in y else v for k, v in out.items()}
    if isinstance(out, (tuple, list)) and isinstance(y, (tuple, list)) and len(out) == len(y):
        parts = [_in_state_dtype(o, part, low) for o, part in zip(out, y, strict=True)]
        return type(out)(*parts) if hasattr(out, "_fields") else type(out)(parts)
    return out


def _device_scope(x):
    if isinstance(x, torch.Tensor) and x.device.type != "cpu":
        return torch.device(x.device)
    return contextlib.nullcontext()


class _ZeroGradient(torch.autograd.Function):
    """The identity on ``out`` that also takes ``leaves``, giving each a zero gradient."""

    @staticmethod
    def forward(ctx, out, *leaves):
        ctx.leaves = [(x.shape, x.dtype, x.device) for x in leaves]
        return out.view_as(out)

    @staticmethod
    def backward(ctx, out_bar):
        zeros = [torch.zeros(s, dtype=d, device=dev) for s, d, dev in ctx.leaves]
        return (out_bar, *zeros)


def _refuse_inference_leaves(leaves) -> None:
    """Refuse parameters made under torch.inference_mode() that require grad (a model built
    there), where a gradient may be taken: torch cannot give them one outside
    inference_mode. Some operations fail with torch's words about saved tensors; others
    (a product with a 0-d parameter) record nothing, and the gradient came out zero."""
    made = [x for x in leaves if x.requires_grad and x.is_inference()]
    if made:
        shapes = ", ".join(str(tuple(x.shape)) for x in made[:5])
        raise RuntimeError(
            f"{len(made)} parameter(s) that require grad were created under "
            f"torch.inference_mode() (shapes {shapes}); such tensors cannot take part in "
            f"autograd outside it, so they can get no gradient. Build the model (or create "
            f"the tensors) outside inference_mode, or replace each with a clone made outside "
            f"it (torch.nn.Parameter(p.clone())); if they need no gradient, freeze them "
            f"(requires_grad_(False)) or run the solve under torch.no_grad()"
        )


# The start of torch's message for an inference tensor saved for a backward. torch checks
# before any saved-tensor hook runs, so its message is the only sign of that failure.
_INFERENCE_SAVED = "Inference tensors cannot be saved for backward"

_INFERENCE_WEIGHTS_MESSAGE = (
    "func uses a tensor created under torch.inference_mode() (the weights of a model built "
    "there, say) where func's gradient with respect to y or a parameter needs that tensor, and "
    "torch cannot keep such a tensor for a backward, so this solve can give no gradient. "
    "Build the model outside inference_mode (or load its state_dict into one built "
    "outside), or clone the tensor outside it; if no gradient is wanted, run the solve "
    "under torch.no_grad()"
)


def _float_tensors(values):
    return [x for x in values if isinstance(x, torch.Tensor) and x.is_floating_point()]


def _graph_leaves(out, allowed_ids) -> list:
    """Leaf tensors that ``out``'s autograd graph reaches, other than those in
    ``allowed_ids``."""
    if not isinstance(out, torch.Tensor) or out.grad_fn is None:
        return []
    found, seen, stack = [], set(), [out.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)  # AccumulateGrad: a leaf tensor
        if variable is not None:
            if id(variable) not in allowed_ids:
                found.append(variable)
            continue
        stack.extend(next_node for next_node, _ in node.next_functions)
    return found


def _is_float_tensor(x) -> bool:
    return isinstance(x, torch.Tensor) and x.is_floating_point()


@functools.lru_cache(maxsize=512)
def _weights(dense: tuple, dtype, device) -> torch.Tensor:
    # Cached so that a step does not copy its coefficients to the device again.
    return torch.tensor(dense, dtype=dtype, device=device)


class _StackedStages:
    """Stages kept in a list and combined with one matmul over the stacked stages: a single
    kernel launch per combination instead of two per nonzero coefficient."""

    def __init__(self, method, y, first, h, hy):
        self.y, self.hy = y, hy
        self.ks = [first]

    def add(self, k: torch.Tensor) -> None:
        self.ks.append(k)

    def stage_input(self, row) -> torch.Tensor:
        if not isinstance(self.hy, float) or not row.terms:
            return self.y + self.hy * self.combine(row)
        # One fused multiply-add per nonzero weight (torch.add's alpha, with h folded in):
        # on a small state each kernel costs its launch, and stack + matmul + mul + add
        # is four launches plus a copy of the stages. The in-place adds act on a fresh
        # tensor that autograd does not need (add saves no inputs), so direct mode is safe.
        (j, w), *rest = row.terms
        out = torch.add(self.y, self.ks[j], alpha=self.hy * w)
        for j, w in rest:
            out.add_(self.ks[j], alpha=self.hy * w)
        return out

    def increment(self, row) -> torch.Tensor:
        if not isinstance(self.hy, float) or not row.terms:
            return self.hy * self.combine(row)
        (j, w), *rest = row.terms
        out = torch.mul(self.ks[j], self.hy * w)
        for j, w in rest:
            out.add_(self.ks[j], alpha=self.hy * w)
        return out

    def combine(self, row) -> torch.Tensor:
        m = len(row.dense)
        if len(row.terms) <= 2:
            out = None
            for j, w in row.terms:
                out = self.ks[j] * w if out is None else out + self.ks[j] * w
            return out if out is not None else self.ks[0] * 0.0
        first = self.ks[0]
        w = _weights(row.dense, first.dtype, first.device)
        stacked = torch.stack(self.ks[:m], dim=-1)
        return stacked @ w

    def as_list(self) -> list[torch.Tensor]:
        return self.ks


BACKEND = TorchBackend()
