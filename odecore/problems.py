"""A catalogue of classic initial value problems, each with a trusted value of ``y(t1)``.

The problems are here to test and benchmark solvers, so every reference is independent of
odecore: it is either a closed form (evaluated with mpmath at 30+ digits) or a high-precision
Taylor-series solution from ``mpmath.odefun``. The script that produced the mpmath digits is
``tests/test_problems.py``; run ``python tests/test_problems.py --dps 45`` to print them again.

Every ``func(t, y, params)`` is written against the Python array API: it reads components as
``y[..., i]`` and assembles the derivative with ``xp.stack(..., axis=-1)``, so it runs unchanged
on any backend and with any number of leading batch axes. Parameters are read component by
component too, so a parameter may be a float, a 0-d array or an array with the batch's shape.

Example::

    import odecore
    from odecore.problems import get_problem

    p = get_problem("lorenz")
    sol = odecore.solve(p.func, p.y0, [p.t0, p.t1], params=p.params)
    error = abs(sol.ys[-1] - p.reference).max()
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import array_api_compat
import numpy as np

__all__ = ["PROBLEMS", "Problem", "get_problem"]


@dataclass(frozen=True)
class Problem:
    """An initial value problem ``y' = func(t, y, params)``, ``y(t0) = y0``, on ``[t0, t1]``.

    ``reference`` is ``y(t1)``, known to more digits than float64 holds, and
    ``reference_source`` says where it comes from. ``exact(t)``, when a closed form exists,
    returns ``y(t)`` for this problem's own ``y0`` and ``params``: ``t`` may be a float or an
    array of any backend, and the result has shape ``(*t.shape, dim)``, like ``Solution.ys``.
    """

    name: str
    description: str
    func: Callable
    y0: tuple[float, ...]
    t0: float
    t1: float
    params: tuple[float, ...]
    reference: tuple[float, ...] | None
    reference_source: str
    exact: Callable | None
    stiff: bool = False

    @property
    def dim(self) -> int:
        return len(self.y0)


# --------------------------------------------------------------------------------------------
# Helpers shared by the dynamics and the closed forms.


def _stack(components):
    """The derivative (or state) from its components, as the last axis."""
    xp = array_api_compat.array_namespace(*components)
    return xp.stack(components, axis=-1)


def _time_like(t, y):
    """``t`` as an array of ``y``'s dtype and device, for dynamics that use ``xp.sin(t)``.

    Solvers keep ``t`` in float64 while the state may be float32; casting keeps the derivative
    in the state's dtype. A Python number is converted; an array keeps its autodiff history.
    """
    xp = array_api_compat.array_namespace(y)
    if not array_api_compat.is_array_api_obj(t):
        return xp.asarray(t, dtype=y.dtype, device=array_api_compat.device(y))
    if t.dtype != y.dtype:
        return xp.astype(t, y.dtype)
    return t


def _time_array(t):
    """``t`` as a floating array and its namespace; plain numbers become float64 NumPy arrays."""
    if not array_api_compat.is_array_api_obj(t):
        t = np.asarray(t, dtype=np.float64)
    xp = array_api_compat.array_namespace(t)
    if not xp.isdtype(t.dtype, "real floating"):
        t = xp.astype(t, xp.float64)
    return t, xp


# --------------------------------------------------------------------------------------------
# Dynamics. Every one reads the state as y[..., i] so that leading batch axes pass through.


def _decay_rhs(t, y, params):
    (k,) = params
    return _stack([-k * y[..., 0]])


_DECAY_RATE = 0.5


def _decay_exact(t, k=_DECAY_RATE):
    t, xp = _time_array(t)
    return _stack([xp.exp(-k * t)])


def _harmonic_rhs(t, y, params):
    (omega,) = params
    x, v = y[..., 0], y[..., 1]
    return _stack([v, -(omega**2) * x])


_OMEGA = 2.0


def _harmonic_exact(t, omega=_OMEGA):
    t, xp = _time_array(t)
    return _stack([xp.cos(omega * t), -omega * xp.sin(omega * t)])


def _nonautonomous_rhs(t, y, params):
    t = _time_like(t, y)
    xp = array_api_compat.array_namespace(y)
    return _stack([-y[..., 0] + xp.sin(t)])


def _nonautonomous_exact(t):
    # Variation of constants with y(0) = 1.
    t, xp = _time_array(t)
    return _stack([1.5 * xp.exp(-t) + 0.5 * (xp.sin(t) - xp.cos(t))])


def _a1_rhs(t, y, params):
    return _stack([-y[..., 0]])


def _a1_exact(t):
    t, xp = _time_array(t)
    return _stack([xp.exp(-t)])


def _a2_rhs(t, y, params):
    return _stack([-0.5 * y[..., 0] ** 3])


def _a2_exact(t):
    t, xp = _time_array(t)
    return _stack([1.0 / xp.sqrt(t + 1.0)])


def _a3_rhs(t, y, params):
    t = _time_like(t, y)
    xp = array_api_compat.array_namespace(y)
    return _stack([y[..., 0] * xp.cos(t)])


def _a3_exact(t):
    t, xp = _time_array(t)
    return _stack([xp.exp(xp.sin(t))])


def _a4_rhs(t, y, params):
    y1 = y[..., 0]
    return _stack([0.25 * y1 * (1.0 - y1 / 20.0)])


def _a4_exact(t):
    # The logistic curve through y(0) = 1 with capacity 20.
    t, xp = _time_array(t)
    return _stack([20.0 / (1.0 + 19.0 * xp.exp(-0.25 * t))])


def _a5_rhs(t, y, params):
    t = _time_like(t, y)
    y1 = y[..., 0]
    return _stack([(y1 - t) / (y1 + t)])


def _rigid_body_rhs(t, y, params):
    (m,) = params
    y1, y2, y3 = y[..., 0], y[..., 1], y[..., 2]
    return _stack([y2 * y3, -y1 * y3, -m * y1 * y2])


_RIGID_BODY_M = 0.51


def _rigid_body_exact(t, m=_RIGID_BODY_M):
    """Jacobi's sn, cn, dn(t | m) by the arithmetic-geometric mean.

    The descending AGM (Abramowitz & Stegun 16.4) needs only ``asin`` and ``sin``, so it is
    written against the array API instead of leaning on scipy.special.ellipj.
    """
    t, xp = _time_array(t)
    a, b = 1.0, math.sqrt(1.0 - m)
    ratios = []  # c_n / a_n for n = 1 .. N
    for _ in range(30):
        a, b, c = 0.5 * (a + b), math.sqrt(a * b), 0.5 * (a - b)
        ratios.append(c / a)
        if abs(c) < 1e-17:
            break
    phi = (2.0 ** len(ratios) * a) * t
    for ratio in reversed(ratios):
        phi = 0.5 * (phi + xp.asin(ratio * xp.sin(phi)))
    sn, cn = xp.sin(phi), xp.cos(phi)
    return _stack([sn, cn, xp.sqrt(1.0 - m * sn**2)])


def _kepler_rhs(t, y, params):
    q1, q2, p1, p2 = y[..., 0], y[..., 1], y[..., 2], y[..., 3]
    r3 = (q1**2 + q2**2) ** 1.5
    return _stack([p1, p2, -q1 / r3, -q2 / r3])


_KEPLER_E = 0.5


def _kepler_exact(t, e=_KEPLER_E):
    """The orbit from perihelion, via Kepler's equation ``E - e sin E = t`` (period 2 pi)."""
    t, xp = _time_array(t)
    anomaly = t + e * xp.sin(t)
    for _ in range(50):  # Newton; converges quadratically from this start for e < 0.8
        anomaly = anomaly - (anomaly - e * xp.sin(anomaly) - t) / (1.0 - e * xp.cos(anomaly))
    cos_e, sin_e = xp.cos(anomaly), xp.sin(anomaly)
    root = math.sqrt(1.0 - e**2)
    denom = 1.0 - e * cos_e
    return _stack([cos_e - e, root * sin_e, -sin_e / denom, root * cos_e / denom])


def _arenstorf_rhs(t, y, params):
    (mu,) = params
    x, z, vx, vz = y[..., 0], y[..., 1], y[..., 2], y[..., 3]
    mu_earth = 1.0 - mu
    d_earth = ((x + mu) ** 2 + z**2) ** 1.5
    d_moon = ((x - mu_earth) ** 2 + z**2) ** 1.5
    ax = x + 2.0 * vz - mu_earth * (x + mu) / d_earth - mu * (x - mu_earth) / d_moon
    az = z - 2.0 * vx - mu_earth * z / d_earth - mu * z / d_moon
    return _stack([vx, vz, ax, az])


def _lorenz_rhs(t, y, params):
    sigma, rho, beta = params
    x, v, z = y[..., 0], y[..., 1], y[..., 2]
    return _stack([sigma * (v - x), x * (rho - z) - v, x * v - beta * z])


def _vanderpol_rhs(t, y, params):
    (mu,) = params
    x, v = y[..., 0], y[..., 1]
    return _stack([v, mu * (1.0 - x**2) * v - x])


def _lotka_volterra_rhs(t, y, params):
    a, b, c, d = params
    prey, predator = y[..., 0], y[..., 1]
    return _stack([a * prey - b * prey * predator, -c * predator + d * prey * predator])


def _brusselator_rhs(t, y, params):
    a, b = params
    u, v = y[..., 0], y[..., 1]
    return _stack([a + u**2 * v - (b + 1.0) * u, b * u - u**2 * v])


# --------------------------------------------------------------------------------------------
# The catalogue. Reference digits beyond float64 are kept on purpose: they document the value.

# DETEST: Hull, Enright, Fellen & Sedgwick, "Comparing numerical methods for ordinary
# differential equations", SIAM J. Numer. Anal. 9(4):603-637, 1972.
# Closed forms were evaluated with mpmath at 40 digits (checked in tests/test_problems.py).
_CLOSED_FORM = "closed form"
# Problems without a closed form: `python tests/test_problems.py --dps 45 NAME` runs
# mpmath.odefun(F, t0, y0)(t1) under mpmath.mp.dps = 45, with F written out in mpmath there.
# Runs at 35 and 45 digits agree to 30+ digits; the 45-digit values are kept.
_MPMATH = "mpmath.odefun at 45 digits (computed offline, see tests/test_problems.py)"

_ALL = (
    Problem(
        name="decay",
        description="exponential decay y' = -k y, k = 0.5",
        func=_decay_rhs,
        y0=(1.0,),
        t0=0.0,
        t1=10.0,
        params=(_DECAY_RATE,),
        reference=(0.00673794699908546709663604842315,),  # exp(-5)
        reference_source=_CLOSED_FORM,
        exact=_decay_exact,
    ),
    Problem(
        name="harmonic",
        description="harmonic oscillator x'' = -omega^2 x, omega = 2, state (x, x')",
        func=_harmonic_rhs,
        y0=(1.0, 0.0),
        t0=0.0,
        t1=10.0,
        params=(_OMEGA,),
        reference=(0.408082061813391986062267860928, -1.82589050145525530875219996769),
        reference_source=_CLOSED_FORM,  # (cos 20, -2 sin 20)
        exact=_harmonic_exact,
    ),
    Problem(
        name="nonautonomous",
        description="forced decay y' = -y + sin t",
        func=_nonautonomous_rhs,
        y0=(1.0,),
        t0=0.0,
        t1=10.0,
        params=(),
        # 3/2 exp(-10) + (sin 10 - cos 10) / 2
        reference=(0.14759330898818504670436153026,),
        reference_source=_CLOSED_FORM,
        exact=_nonautonomous_exact,
    ),
    Problem(
        name="detest_a1",
        description="y' = -y (DETEST A1, Hull et al. 1972)",
        func=_a1_rhs,
        y0=(1.0,),
        t0=0.0,
        t1=20.0,
        params=(),
        reference=(2.06115362243855782796594038016e-9,),  # exp(-20)
        reference_source=_CLOSED_FORM,
        exact=_a1_exact,
    ),
    Problem(
        name="detest_a2",
        description="y' = -y^3 / 2 (DETEST A2, Hull et al. 1972)",
        func=_a2_rhs,
        y0=(1.0,),
        t0=0.0,
        t1=20.0,
        params=(),
        reference=(0.218217890235992381266097485416,),  # 1 / sqrt(21)
        reference_source=_CLOSED_FORM,
        exact=_a2_exact,
    ),
    Problem(
        name="detest_a3",
        description="y' = y cos t (DETEST A3, Hull et al. 1972)",
        func=_a3_rhs,
        y0=(1.0,),
        t0=0.0,
        t1=20.0,
        params=(),
        reference=(2.49165027185041452346117537237,),  # exp(sin 20)
        reference_source=_CLOSED_FORM,
        exact=_a3_exact,
    ),
    Problem(
        name="detest_a4",
        description="logistic y' = y/4 (1 - y/20) (DETEST A4, Hull et al. 1972)",
        func=_a4_rhs,
        y0=(1.0,),
        t0=0.0,
        t1=20.0,
        params=(),
        reference=(17.7301664813148398488682900586,),  # 20 / (1 + 19 exp(-5))
        reference_source=_CLOSED_FORM,
        exact=_a4_exact,
    ),
    Problem(
        name="detest_a5",
        description="spiral y' = (y - t) / (y + t) (DETEST A5, Hull et al. 1972)",
        func=_a5_rhs,
        y0=(4.0,),
        t0=0.0,
        t1=20.0,
        params=(),
        # mpmath.mp.dps = 45; mpmath.odefun(lambda t, y: (y - t) / (y + t), 0, 4)(20)
        reference=(-0.788782668896401423730715579699570040212128232,),
        reference_source=_MPMATH,
        exact=None,
    ),
    Problem(
        name="rigid_body",
        description="Euler's rigid body, y = (sn, cn, dn)(t | 0.51) (DETEST B5)",
        func=_rigid_body_rhs,
        y0=(0.0, 1.0, 1.0),
        t0=0.0,
        t1=20.0,
        params=(_RIGID_BODY_M,),
        # mpmath.ellipfun(kind, 20, m=0.51) for kind in ("sn", "cn", "dn")
        reference=(
            -0.939657079872920396188436231591,
            -0.342117775400074906534822116696,
            0.741412659619995300782558677874,
        ),
        reference_source="closed form: Jacobi elliptic functions (mpmath.ellipfun)",
        exact=_rigid_body_exact,
    ),
    Problem(
        name="kepler",
        description="Kepler orbit, eccentricity 0.5, state (q1, q2, p1, p2) (DETEST D3)",
        func=_kepler_rhs,
        y0=(1.0 - _KEPLER_E, 0.0, 0.0, math.sqrt((1.0 + _KEPLER_E) / (1.0 - _KEPLER_E))),
        t0=0.0,
        t1=20.0,
        params=(),
        # Kepler's equation E - sin(E)/2 = 20 solved by mpmath.findroot at 40 digits.
        reference=(
            -0.578043295303536123275145836161,
            0.863384000919419280133573065247,
            -0.959508373038072735626449003247,
            -0.0650491512671209016771935462991,
        ),
        reference_source="closed form: Kepler's equation (mpmath.findroot)",
        exact=_kepler_exact,
    ),
    Problem(
        name="arenstorf",
        description="Arenstorf orbit of the restricted three-body problem, one period",
        func=_arenstorf_rhs,
        y0=(0.994, 0.0, 0.0, -2.00158510637908252240537862224),
        t0=0.0,
        t1=17.0652165601579625588917206249,
        params=(0.012277471,),
        # The orbit is periodic, so y(T) = y0. An mpmath.odefun solve at 35 digits returns
        # to y0 within 5e-27 (see tests/test_problems.py).
        reference=(0.994, 0.0, 0.0, -2.00158510637908252240537862224),
        reference_source=(
            "periodic orbit, y(T) = y0 (Hairer, Norsett & Wanner, Solving ODEs I); "
            "mpmath.odefun agrees to 5e-27"
        ),
        exact=None,
    ),
    Problem(
        name="lorenz",
        description="Lorenz system, sigma = 10, rho = 28, beta = 8/3, short horizon",
        func=_lorenz_rhs,
        y0=(1.0, 1.0, 1.0),
        t0=0.0,
        t1=1.0,
        params=(10.0, 28.0, 8.0 / 3.0),
        reference=(
            -9.37857001092506236084232454430531313971217728,
            -8.35703378842664473290241661633371810260760748,
            29.362325337363428180335970317663989315091384,
        ),
        reference_source=_MPMATH,
        exact=None,
    ),
    Problem(
        name="vanderpol",
        description="Van der Pol oscillator, mu = 1 (non-stiff)",
        func=_vanderpol_rhs,
        y0=(2.0, 0.0),
        t0=0.0,
        t1=10.0,
        params=(1.0,),
        reference=(
            -2.00834078257971233278073014663389910965603905,
            0.0329070658633240644314717007211797246566242583,
        ),
        reference_source=_MPMATH,
        exact=None,
    ),
    Problem(
        name="lotka_volterra",
        description="Lotka-Volterra predator-prey, (a, b, c, d) = (1.5, 1, 3, 1)",
        func=_lotka_volterra_rhs,
        y0=(1.0, 1.0),
        t0=0.0,
        t1=10.0,
        params=(1.5, 1.0, 3.0, 1.0),
        reference=(
            1.02634476757508931913868672647303058723466322,
            0.909691078136041617548245883481738489937550508,
        ),
        reference_source=_MPMATH,
        exact=None,
    ),
    Problem(
        name="brusselator",
        description="Brusselator (Prigogine & Lefever) reaction, A = 1, B = 3",
        func=_brusselator_rhs,
        y0=(1.5, 3.0),
        t0=0.0,
        t1=20.0,
        params=(1.0, 3.0),
        reference=(
            0.498637071268347848649855482993279825398378589,
            4.59678034945201118320174395313341170374328574,
        ),
        reference_source=_MPMATH,
        exact=None,
    ),
)

PROBLEMS: dict[str, Problem] = {problem.name: problem for problem in _ALL}


def get_problem(name: str) -> Problem:
    """The problem called ``name``; a ``ValueError`` listing the valid names otherwise."""
    try:
        return PROBLEMS[name]
    except KeyError:
        valid = ", ".join(PROBLEMS)
        raise ValueError(f"unknown problem {name!r}; valid names are: {valid}") from None
