"""Which arrays a solve differentiates: parameter trees the rules can see into, and no hidden
tensors that need gradients.
"""

from __future__ import annotations

from odecore.backend import differentiate, library_of
from odecore.backend.tree import arrays_held_by
from odecore.backend.tree import leaves as tree_leaves


def check_params_tree(bk, params, leaves, differentiated_only=True):
    """Refuse a ``params`` that hides arrays from the gradient rules: an object (a
    SimpleNamespace, a dataclass, an ``nn.Module``) that is not an array, a tuple, list or
    dict, or a pytree the backend flattens (JAX), holding arrays that are not among
    ``leaves``. They would get no gradient. With ``differentiated_only``, only arrays that
    want a gradient (``Backend.requires_grad``) count."""
    known = {id(x) for x in leaves}
    for path, leaf in tree_leaves(params, "params"):
        if library_of(leaf) is not None:
            continue
        hidden = [x for x in arrays_held_by(leaf, _is_array) if id(x) not in known]
        if not hidden or (
            differentiated_only and not differentiate.requires_grad(bk, {"hidden": hidden})
        ):
            continue
        pytree = " (or a pytree registered with JAX)" if bk.name == "jax" else ""
        remedy = {
            "jax": "register its type as a pytree (jax.tree_util.register_dataclass)",
            "torch": "make func an nn.Module that owns them, list them in adjoint_params, or "
            "use adjoint='direct'",
        }.get(bk.name)
        raise TypeError(
            f"params must be an array or a nested tuple, list or dict of arrays{pytree}; "
            f"{path} is a {type(leaf).__name__} holding {len(hidden)} array(s), which the "
            f"gradient rules cannot see into, so they would get no gradient. Pass its arrays "
            f"in a tuple or dict instead (for example params=vars(obj) or "
            f"dataclasses.asdict(obj)){', or ' + remedy if remedy else ''}"
        )


def _is_array(x) -> bool:
    return library_of(x) is not None


def refuse_hidden_parameters(
    bk,
    func,
    params,
    leaves,
    t,
    y0,
    batch_axis,
    called_as="func(t, y, params)",
    why="adjoint='backsolve' and 'checkpoint' differentiate only with respect to parameters "
    "they know of",
):
    """Refuse arrays ``func`` uses that want a gradient without being among ``leaves``:
    backsolve and checkpoint differentiate only ``leaves``, and would give them none.
    ``called_as``: how the caller's documentation writes ``func`` called with ``params``;
    ``why``: why the caller differentiates ``leaves`` alone."""
    if bk.autodiff is None:
        return
    xp = bk.xp
    # t0 keeps its gradient, as y0 does: the probe detaches both, and reads from them
    # whether the solve may be differentiated.
    t0 = xp.astype(t[0], y0.dtype)
    if batch_axis is not None:
        t0 = xp.broadcast_to(t0, (y0.shape[batch_axis],))
    hidden = bk.autodiff.hidden_parameters(func, params, leaves, t0, y0)
    if hidden:
        shapes = ", ".join(str(tuple(x.shape)) for x in hidden[:5])
        name = called_as.partition("(")[0]
        raise ValueError(
            f"{name} uses {len(hidden)} tensor(s) that require grad but are not among its "
            f"parameters (shapes {shapes}); {why}, so these would "
            f"get no gradient. Pass them with params=... ({called_as}), list them "
            f"in adjoint_params=..., or make {name} an nn.Module that owns them"
        )
