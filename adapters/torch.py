"""The PyTorch backend: eager, with torch autograd.

The core's gradient rules (backsolve, checkpoint) become one ``torch.autograd.Function``; the
dynamics' VJPs come from ``torch.autograd.grad``. ``direct`` mode is plain autograd through
the core's loop. No gradient algorithm lives here.
"""

from __future__ import annotations

import functools
from typing import Any

import array_api_compat.torch as xp_torch
import torch

from odecore._backend import Backend


class TorchBackend(Backend):
    name = "torch"
    xp = xp_torch
    eager = True
    has_autodiff = True
    # Autograd records in-place writes into a buffer (CopySlices) correctly as long as the
    # overwritten values are not needed for the backward pass, which holds for the output
    # buffer: the loop only reads from it what it is about to overwrite.
    inplace_ok = True

    def owns(self, x: Any) -> bool:
        return isinstance(x, torch.Tensor)

    def asarray(self, x: Any, dtype: Any = None, like: Any = None) -> Any:
        device = like.device if isinstance(like, torch.Tensor) else None
        if isinstance(x, torch.Tensor):
            return x.to(dtype=dtype or x.dtype, device=device or x.device)
        return torch.as_tensor(x, dtype=dtype, device=device)

    def write(self, out, where, value):
        # The loop owns the output buffer, so it is written in place: a plain item
        # assignment costs a fraction of array-api-extra's general-purpose ``at``.
        out[where] = value
        return out

    def stage_store(self, method, y, first, h, hy):
        return _StackedStages(method, y, first, h, hy)

    # ---- gradients -------------------------------------------------------------------------

    def param_leaves(self, func, params) -> list[Any]:
        """Tensors in ``params``, else the parameters of an ``nn.Module`` ``func`` (found
        without being passed, as torchdiffeq users expect)."""
        leaves = super().param_leaves(func, params)
        if params is None and isinstance(func, torch.nn.Module):
            leaves = [p for p in func.parameters() if p.requires_grad]
        return [x for x in leaves if isinstance(x, torch.Tensor) and x.is_floating_point()]

    def requires_grad(self, values: Any) -> bool:
        from odecore._backend import _leaves

        return torch.is_grad_enabled() and any(
            isinstance(x, torch.Tensor) and x.requires_grad for _, x in _leaves(values)
        )

    def dynamics_vjp(self, func, params, leaves, t, y, cot, want_value=False):
        with torch.enable_grad():
            y = y.detach().requires_grad_(True)
            if params is None:
                # Implicit parameters (an nn.Module's) are leaves that require grad already.
                out = func(t, y)
            else:
                # Explicit parameters are replaced by detached copies that require grad, so
                # that a plain tensor gets a gradient too and nothing accumulates on the
                # user's own graph.
                leaves = [x.detach().requires_grad_(True) for x in leaves]
                out = func(t, y, _replace_leaves(params, leaves))
            inputs = [y, *leaves]
            grads = torch.autograd.grad(out, inputs, cot, allow_unused=True)
        # A parameter the dynamics do not use gets a zero gradient, not None.
        grads = [
            torch.zeros_like(x) if g is None else g for g, x in zip(grads, inputs, strict=True)
        ]
        return (out.detach() if want_value else None), grads[0], grads[1:]

    def vjp(self, fn, *primals):
        """``(fn(*primals), pullback)`` with ``pullback(cotangent) -> tuple of cotangents``."""
        primals = [p.detach().requires_grad_(True) for p in primals]
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
        out, tangent = torch.func.jvp(fn, tuple(primals), tuple(tangents))
        return out, tangent

    def custom_vjp(self, rule):
        def apply(*primals):
            return _RuleFunction.apply(rule, *primals)

        return apply

    def no_grad(self):
        return torch.no_grad()

    def stop_gradient(self, x: Any) -> Any:
        return x.detach()

    def to_host_float(self, x: Any) -> float:
        return float(x.detach()) if isinstance(x, torch.Tensor) else float(x)


class _RuleFunction(torch.autograd.Function):
    """One rule (a solve, a fixed point) as one autograd node; the rule holds the
    framework-neutral math."""

    @staticmethod
    def forward(ctx, rule, *primals):
        out, residuals = rule.forward(*primals)
        ctx.rule, ctx.residuals = rule, residuals
        return out

    @staticmethod
    def backward(ctx, out_bar):
        # The residuals stay on ctx until autograd frees the graph: a backward with
        # retain_graph=True may run again.
        return (None, *ctx.rule.backward(ctx.residuals, out_bar))


def _replace_leaves(params, leaves):
    """``params`` with its tensors replaced, in order, by ``leaves``."""
    it = iter(leaves)

    def rebuild(value):
        if isinstance(value, (tuple, list)):
            return type(value)(rebuild(v) for v in value)
        if isinstance(value, dict):
            return {k: rebuild(v) for k, v in value.items()}
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            return next(it)
        return value

    return rebuild(params)


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
        return self.y + self.hy * self.combine(row)

    def increment(self, row) -> torch.Tensor:
        return self.hy * self.combine(row)

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
