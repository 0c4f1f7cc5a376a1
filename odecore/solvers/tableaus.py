"""Butcher tableaus as data: one record per Runge-Kutta method.

A method is nothing but numbers. The solver (``odecore.solvers.explicit_rk``) reads a
:class:`Tableau` and never branches on the method's name, so adding a method means adding a
record here.

Conventions, shared by every record:

* ``a`` is strictly lower triangular and stored ragged: row ``i`` has exactly ``i`` entries, the
  weights of stages ``0 .. i-1`` used to build stage ``i``.
* ``b_err`` holds ``b - b_hat``: the local error estimate of a step of size ``h`` is
  ``h * sum_i b_err[i] * k_i``. Fixed-step methods have ``b_err = None``.
* ``fsal`` ("first same as last") means ``c[-1] == 1`` and ``a[-1] == b``: the last stage is
  ``f(t + h, y_new)`` and becomes the first stage of the next step for free.
* Dense output. The "dense stages" are the ``s`` main stages, then ``f(t + h, y_new)`` when the
  method is not FSAL, then the extra stages ``dense_c`` / ``dense_a`` (row ``j`` of ``dense_a``
  weights every dense stage before it). The interpolant is
  ``y(t + theta*h) = y + h * sum_i b_i(theta) * K_dense[i]`` with
  ``b_i(theta) = sum_m dense[i][m] * theta**(m + 1)``.
  Methods with ``dense = None`` use cubic Hermite interpolation on ``y, y_new, f, f_new``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from fractions import Fraction


@dataclass(frozen=True)
class Tableau:
    """The Butcher tableau of one explicit Runge-Kutta method, with its error estimate and dense
    output: the data the solver reads (it never branches on a method's name).

    Parameters
    ----------
    name : str
        The method's name, as ``method=`` takes it.
    order : int
        The order of the solution ``b``.
    c : tuple of float
        The stages' nodes.
    a : tuple of tuple of float
        Strictly lower triangular, ragged: row ``i`` has exactly ``i`` entries, the weights of
        stages ``0 .. i-1`` that build stage ``i``.
    b : tuple of float
        The solution's weights.
    b_err : tuple of float, optional
        ``b - b_hat``: the local error estimate of a step of size ``h`` is
        ``h * sum_i b_err[i] * k_i``. None for a fixed-step method.
    error_order : int, optional
        The order ``q`` of the error estimate (``O(h**(q + 1))``); the controller's exponent is
        ``1/(q + 1)``.
    b_err2 : tuple of float, optional
        A second, lower-order error estimate, combined with the first as in Hairer's DOP853
        (``n1**2 / sqrt(n1**2 + 0.01 * n2**2)``).
    fsal : bool, default False
        "First same as last": ``c[-1] == 1`` and ``a[-1] == b``, so the last stage is the next
        step's first.
    dense : tuple of tuple of float, optional
        The interpolant's coefficients: ``y(t + theta h) = y + h sum_i b_i(theta) K_i`` with
        ``b_i(theta) = sum_m dense[i][m] theta**(m + 1)``, over the main stages, then
        ``f(t + h, y_new)`` when not FSAL, then the extra dense stages. None: cubic Hermite
        interpolation.
    dense_c, dense_a : tuple
        The extra stages of the dense output (row ``j`` of ``dense_a`` weights every dense
        stage before it).
    dense_order : int, optional
        The order of the interpolant.

    Examples
    --------
    >>> import odecore
    >>> tableau = odecore.TABLEAUS["dopri5"]
    >>> tableau.order, tableau.stages, tableau.fsal, tableau.adaptive
    (5, 7, True, True)
    >>> abs(sum(tableau.b) - 1.0) < 1e-15
    True
    """

    name: str
    order: int
    c: tuple[float, ...]
    a: tuple[tuple[float, ...], ...]
    b: tuple[float, ...]
    b_err: tuple[float, ...] | None = None
    # The order q of the error estimate: h * sum(b_err * k) (combined with b_err2 when present)
    # is O(h**(q + 1)), so the controller's exponent is 1/(q + 1). For an ordinary embedded
    # pair q is the lower of the orders of b and b - b_err; DOP853's combined estimate
    # behaves like q = 7.
    error_order: int | None = None
    # A second, lower-order error estimate, combined with the first as in Hairer's DOP853
    # (Hairer, Norsett & Wanner, "Solving ODEs I", 2nd ed., section II.10):
    # ratio = n1**2 / sqrt(n1**2 + 0.01 * n2**2), where n1, n2 are the two scaled error norms.
    b_err2: tuple[float, ...] | None = None
    fsal: bool = False
    dense: tuple[tuple[float, ...], ...] | None = None
    dense_c: tuple[float, ...] = ()
    dense_a: tuple[tuple[float, ...], ...] = ()
    dense_order: int | None = None

    @property
    def stages(self) -> int:
        """The number of stages of a step."""
        return len(self.c)

    @property
    def adaptive(self) -> bool:
        """Whether the method has an error estimate (``b_err``), for step-size control."""
        return self.b_err is not None


# --------------------------------------------------------------------------------------------
# Building records from exact numbers.
#
# Coefficients are written as the sources give them: rationals as "p/q" strings or ints,
# decimals as strings with every digit the source prints. Everything is combined exactly
# (``Fraction``) and rounded to float once, at the end, so derived quantities such as
# ``b - b_hat`` or the expanded interpolants carry no intermediate round-off.
# --------------------------------------------------------------------------------------------

_Number = int | str | Fraction
_Poly = list[Fraction]  # coefficients, lowest power first


_FIXED_STEP: dict[str, tuple[Tableau, Tableau]] = {}


def fixed_step(tab: Tableau) -> Tableau:
    """``tab`` without its error estimate: the method at a fixed step (``options["step_size"]``
    or ``options["grid_constructor"]``), as diffrax's ``ConstantStepSize`` runs an embedded
    pair. Its steps, stages and dense output are ``tab``'s; it keeps ``tab``'s name. Built
    once per method, so that the solver's and the kernels' caches see one object."""
    if not tab.adaptive:
        return tab
    kept = _FIXED_STEP.get(tab.name)
    if kept is None or kept[0] is not tab:
        fixed = replace(tab, b_err=None, b_err2=None, error_order=None)
        kept = _FIXED_STEP[tab.name] = (tab, fixed)
    return kept[1]


def _q(x: _Number) -> Fraction:
    return Fraction(x)


def _vec(xs) -> list[Fraction]:
    return [_q(x) for x in xs]


def _sparse(length: int, entries: dict[int, str]) -> list[Fraction]:
    """A dense vector from a source that lists only the nonzero entries (DOP853)."""
    out = [Fraction(0)] * length
    for j, x in entries.items():
        out[j] = _q(x)
    return out


def _minus(u: list[Fraction], v: list[Fraction]) -> list[Fraction]:
    return [x - y for x, y in zip(u, v, strict=True)]


def _lower_triangle(flat: list) -> list[list]:
    """Rows [], [x], [x, x], ... from the strictly lower entries listed row after row."""
    rows: list[list] = [[]]
    start = 0
    while start < len(flat):
        length = len(rows)
        rows.append(flat[start : start + length])
        start += length
    if len(rows[-1]) != len(rows) - 1:
        raise ValueError("entry count is not triangular")
    return rows


def _floats(xs) -> tuple[float, ...]:
    return tuple(float(x) for x in xs)


def _float_rows(rows) -> tuple[tuple[float, ...], ...]:
    return tuple(_floats(row) for row in rows)


def _record(
    name: str,
    order: int,
    c,
    a,
    b,
    *,
    b_hat=None,
    b_err=None,
    b_err2=None,
    dense=None,
    dense_c=(),
    dense_a=(),
    **flags,
) -> Tableau:
    """A :class:`Tableau` from exact data. The embedded weights come either as ``b_hat`` (then
    ``b_err = b - b_hat`` is formed exactly) or directly as ``b_err``."""
    b = _vec(b)
    if b_hat is not None:
        b_err = _minus(b, _vec(b_hat))
    return Tableau(
        name=name,
        order=order,
        c=_floats(_vec(c)),
        a=_float_rows([_vec(row) for row in a]),
        b=_floats(b),
        b_err=None if b_err is None else _floats(b_err),
        b_err2=None if b_err2 is None else _floats(b_err2),
        dense=None if dense is None else _float_rows(dense),
        dense_c=_floats(_vec(dense_c)),
        dense_a=_float_rows(dense_a),
        **flags,
    )


def _poly_add(p: _Poly, q: _Poly) -> _Poly:
    longer, shorter = (p, q) if len(p) >= len(q) else (q, p)
    return [x + (shorter[i] if i < len(shorter) else 0) for i, x in enumerate(longer)]


def _poly_mul(p: _Poly, q: _Poly) -> _Poly:
    out = [Fraction(0)] * (len(p) + len(q) - 1)
    for i, x in enumerate(p):
        for j, y in enumerate(q):
            out[i + j] += x * y
    return out


def _poly_product(scale: _Number, factors) -> _Poly:
    out = [_q(scale)]
    for factor in factors:
        out = _poly_mul(out, _vec(factor))
    return out


def _interpolant_rows(polys: list[_Poly], degree: int) -> list[list[Fraction]]:
    """``dense`` rows from the b_i(theta): the coefficients of theta**1 .. theta**degree."""
    padded = [p + [Fraction(0)] * (degree + 1 - len(p)) for p in polys]
    if any(p[0] != 0 or len(p) != degree + 1 for p in padded):
        raise ValueError("interpolant polynomials must vanish at 0 and have the stated degree")
    return [p[1:] for p in padded]


def _hairer_interpolant(b, tail_rows, n_dense: int, new_stage: int) -> list[list[Fraction]]:
    """Hairer's nested dense output (dopri5.f ``CONTD5``, dop853.f ``CONTD8``) as b_i(theta).

    Hairer stores ``rcont`` vectors and evaluates, with s = theta and s1 = 1 - theta,
    ``y + s*(R0 + s1*(R1 + s*(R2 + s1*(R3 + ...))))`` where R0 = y_new - y, R1 = h*f - R0,
    R2 = R0 - h*f_new - R1, and R3, R4, ... = h * (tail_rows . K). Per stage (R/h as weights)
    that is sum_k R_k * s**(k//2 + 1) * s1**((k + 1)//2); expanding gives the polynomials.
    """
    b = _vec(b) + [Fraction(0)] * (n_dense - len(b))
    first = [Fraction(int(i == 0)) for i in range(n_dense)]
    new = [Fraction(int(i == new_stage)) for i in range(n_dense)]
    r1 = _minus(first, b)
    r2 = _minus(_minus(b, new), r1)
    terms = [b, r1, r2, *tail_rows]
    theta, one_minus_theta = [0, 1], [1, -1]
    polys: list[_Poly] = [[] for _ in range(n_dense)]
    for k, weights in enumerate(terms):
        basis = _poly_product(1, [theta] * (k // 2 + 1) + [one_minus_theta] * ((k + 1) // 2))
        for i, w in enumerate(weights):
            polys[i] = _poly_add(polys[i], [w * x for x in basis])
    return _interpolant_rows(polys, degree=len(terms))


# --------------------------------------------------------------------------------------------
# Fixed-step methods.
# --------------------------------------------------------------------------------------------

# Explicit Euler (Euler, Institutiones Calculi Integralis, 1768). Hairer, Norsett & Wanner,
# "Solving ODEs I", 2nd ed. (1993), section II.1.
EULER = _record("euler", 1, c=[0], a=[[]], b=[1])

# Explicit midpoint rule. Runge, "Ueber die numerische Aufloesung von Differentialgleichungen",
# Math. Ann. 46 (1895) 167-178; Hairer, Norsett & Wanner I, section II.1.
MIDPOINT = _record("midpoint", 2, c=[0, "1/2"], a=[[], ["1/2"]], b=[0, 1])

# Heun's second-order (explicit trapezoidal) method. Heun, "Neue Methoden zur approximativen
# Integration der Differentialgleichungen einer unabhaengigen Veraenderlichen", Z. Math. Phys.
# 45 (1900) 23-38; also Hairer, Norsett & Wanner I, section II.1.
HEUN2 = _record("heun2", 2, c=[0, 1], a=[[], [1]], b=["1/2", "1/2"])

# Heun's third-order method, c = (0, 1/3, 2/3). Heun (1900), as above; tabulated in Hairer,
# Norsett & Wanner I, section II.1 (low-order methods of Runge, Heun and Kutta).
HEUN3 = _record("heun3", 3, c=[0, "1/3", "2/3"], a=[[], ["1/3"], [0, "2/3"]], b=["1/4", 0, "3/4"])

# Kutta's 3/8 rule. Kutta, "Beitrag zur naeherungsweisen Integration totaler
# Differentialgleichungen", Z. Math. Phys. 46 (1901) 435-453; tabulated next to the classical
# RK4 in Hairer, Norsett & Wanner I, section II.1.
RK4 = _record(
    "rk4",
    4,
    c=[0, "1/3", "2/3", 1],
    a=[[], ["1/3"], ["-1/3", 1], [1, -1, 1]],
    b=["1/8", "3/8", "3/8", "1/8"],
)

# --------------------------------------------------------------------------------------------
# Adaptive methods.
# --------------------------------------------------------------------------------------------

# Heun-Euler 2(1): Heun's trapezoidal method propagated, explicit Euler (which shares its first
# stage) embedded. Not FSAL: the last stage is evaluated at the Euler point, not at y_new.
ADAPTIVE_HEUN = _record(
    "adaptive_heun",
    2,
    c=[0, 1],
    a=[[], [1]],
    b=["1/2", "1/2"],
    b_hat=[1, 0],
    error_order=1,
)

# Runge-Kutta-Fehlberg 1(2). Fehlberg, "Low-order classical Runge-Kutta formulas with stepsize
# control and their application to some heat transfer problems", NASA TR R-315 (1969).
# Fehlberg's pair is (1/256, 255/256, 0), order 1, and (1/512, 255/256, 1/512), order 2; the
# third stage is f at the order-1 point, so the pair is FSAL only when the order-1 solution is
# propagated. Like torchdiffeq's "fehlberg2" we propagate the order-2 solution (local
# extrapolation), which makes this record order 2, error order 1 and NOT FSAL: f(t + h, y_new)
# must be evaluated separately (3 evaluations per step instead of 2).
FEHLBERG2 = _record(
    "fehlberg2",
    2,
    c=[0, "1/2", 1],
    a=[[], ["1/2"], ["1/256", "255/256"]],
    b=["1/512", "255/256", "1/512"],
    b_hat=["1/256", "255/256", 0],
    error_order=1,
)

# Bogacki & Shampine, "A 3(2) pair of Runge-Kutta formulas", Appl. Math. Lett. 2 (1989)
# 321-325 (the pair's tableau); same numbers as scipy's ``integrate/_ivp/rk.py`` RK23.
BOSH3 = _record(
    "bosh3",
    3,
    c=[0, "1/2", "3/4", 1],
    a=[[], ["1/2"], [0, "3/4"], ["2/9", "1/3", "4/9"]],
    b=["2/9", "1/3", "4/9", 0],
    b_hat=["7/24", "1/4", "1/3", "1/8"],
    error_order=2,
    fsal=True,
)

# Dormand & Prince, "A family of embedded Runge-Kutta formulae", J. Comput. Appl. Math. 6
# (1980) 19-26; Hairer, Norsett & Wanner I, section II.5 (the DOPRI5 tableau).
_DOPRI5_B = ["35/384", 0, "500/1113", "125/192", "-2187/6784", "11/84", 0]
# The order-4 continuous extension of Hairer's dopri5.f (coefficients d1..d7 of CONTD5;
# Hairer, Norsett & Wanner I, section II.6). Expanded, it equals scipy's RK45 matrix ``P``.
_DOPRI5_D = [
    "-12715105075/11282082432",
    0,
    "87487479700/32700410799",
    "-10690763975/1880347072",
    "701980252875/199316789632",
    "-1453857185/822651844",
    "69997945/29380423",
]
DOPRI5 = _record(
    "dopri5",
    5,
    c=[0, "1/5", "3/10", "4/5", "8/9", 1, 1],
    a=[
        [],
        ["1/5"],
        ["3/40", "9/40"],
        ["44/45", "-56/15", "32/9"],
        ["19372/6561", "-25360/2187", "64448/6561", "-212/729"],
        ["9017/3168", "-355/33", "46732/5247", "49/176", "-5103/18656"],
        _DOPRI5_B[:6],
    ],
    b=_DOPRI5_B,
    # Shampine's order-4 embedded solution for this pair (Shampine, "Some practical
    # Runge-Kutta formulas", Math. Comp. 46 (1986) 135-150), which torchdiffeq's dopri5 also
    # uses, rather than Dormand & Prince's own b_hat = (5179/57600, 0, 7571/16695, 393/640,
    # -92097/339200, 187/2100, 1/40) of dopri5.f and scipy's RK45. With the same controller
    # and first step, odecore and torchdiffeq then make the same step-size decisions at the
    # same tolerances, so a torchdiffeq user who switches gets the same work. On
    # odecore.problems at rtol 1e-4..1e-10 it takes 7% fewer evaluations than the other
    # estimator for errors 1.9x larger (geometric means): a shift along the
    # work-precision line of an order-5 method, not a loss of accuracy for the tolerance.
    b_hat=["1951/21600", 0, "22642/50085", "451/720", "-12231/42400", "649/6300", "1/60"],
    error_order=4,
    fsal=True,
    dense=_hairer_interpolant(_DOPRI5_B, [_vec(_DOPRI5_D)], n_dense=7, new_stage=6),
    dense_order=4,
)

# Tsitouras, "Runge-Kutta pairs of order 5(4) satisfying only the first column simplifying
# assumption", Comput. Math. Appl. 62 (2011) 770-775 (its coefficient table). The paper prints
# fewer digits; those below are the high-precision values of the same method published in
# OrdinaryDiffEq.jl (``src/tableaus/low_order_rk_tableaus.jl``, the BigFloat
# ``Tsit5ConstantCacheActual``): the last row of a equals b (FSAL), b_hat (order 4) ends in 1/66.
_TSIT5_C = [
    0,
    "0.161",
    "0.327",
    "0.9",
    "0.9800255409045096857298102862870245954942137979563024768854764293221195950761080302604",
    1,
    1,
]
_TSIT5_B = [
    "0.9646076681806522951816731316512876333711995238157997181903319145764851595234062815396e-1",
    "0.01",
    "0.4798896504144995747752495322905965199130404621990332488332634944254542060153074523509",
    "1.379008574103741893192274821856872770756462643091360525934940067397245698027561293331",
    "-3.290069515436080679901047585711363850115683290894936158531296799594813811049925401677",
    "2.324710524099773982415355918398765796109060233222962411944060046314465391054716027841",
    0,
]
# Stages 1..5, row after row (stage i has i weights); stage 6 is b (FSAL).
_TSIT5_A_LOWER = [
    "0.161",
    "-0.8480655492356988544426874250230774675121177393430391537369234245294192976164141156943e-2",
    "0.3354806554923569885444268742502307746751211773934303915373692342452941929761641411569",
    "2.897153057105493432130432594192938764924887287701866490314866693455023795137503079289",
    "-6.359448489975074843148159912383825625952700647415626703305928850207288721235210244366",
    "4.362295432869581411017727318190886861027813359713760212991062156752264926097707165077",
    "5.325864828439256604428877920840511317836476253097040101202360397727981648835607691791",
    "-11.74888356406282787774717033978577296188744178259862899288666928009020615663593781589",
    "7.495539342889836208304604784564358155658679161518186721010132816213648793440552049753",
    "-0.9249506636175524925650207933207191611349983406029535244034750452930469056411389539635e-1",
    "5.861455442946420028659251486982647890394337666164814434818157239052507339770711679748",
    "-12.92096931784710929170611868178335939541780751955743459166312250439928519268343184452",
    "8.159367898576158643180400794539253485181918321135053305748355423955009222648673734986",
    "-0.7158497328140099722453054252582973869127213147363544882721139659546372402303777878835e-1",
    "-0.2826905039406838290900305721271224146717633626879770007617876201276764571291579142206e-1",
]
_TSIT5_A = [*_lower_triangle(_TSIT5_A_LOWER), _TSIT5_B[:6]]
_TSIT5_B_HAT = [
    "0.9468075576583945807478876255758922856117527357724631226139574065785592789071067303271e-1",
    "0.9183565540343253096776363936645313759813746240984095238905939532922955247253608687270e-2",
    "0.4877705284247615707855642599631228241516691959761363774365216240304071651579571959813",
    "1.234297566930478985655109673884237654035539930748192848315425833500484878378061439761",
    "-2.707712349983525454881109975059321670689605166938197378763992255714444407154902012702",
    "1.866628418170587035753719399566211498666255505244122593996591602841258328965767580089",
    "1/66",
]
# Tsitouras' own order-4 interpolant (same paper), given there in factored form
# b_i(theta) = scale * product of factors; each factor lists its coefficients, lowest power
# first. Digits as transcribed in diffrax's ``_solver/tsit5.py`` (OrdinaryDiffEq.jl's
# ``Tsit5Interp`` holds the same polynomials expanded).
_TSIT5_INTERPOLANT = [
    (
        "-1.0530884977290216",
        [[0, 1], ["-1.3299890189751412", 1], ["0.7139816917074209", "-1.4364028541716351", 1]],
    ),
    ("0.1017", [[0, 0, 1], ["1.2949852507374631", "-2.1966568338249754", 1]]),
    ("2.490627285651252793", [[0, 0, 1], ["1.57803468208092486", "-2.38535645472061657", 1]]),
    (
        "-16.54810288924490272",
        [[0, 0, 1], ["-1.21712927295533244", 1], ["-0.61620406037800089", 1]],
    ),
    (
        "47.37952196281928122",
        [[0, 0, 1], ["-1.203071208372362603", 1], ["-0.658047292653547382", 1]],
    ),
    ("-34.87065786149660974", [[0, 0, 1], ["-1.2", 1], ["-0.666666666666666667", 1]]),
    ("2.5", [[0, 0, 1], [-1, 1], ["-0.6", 1]]),
]
TSIT5 = _record(
    "tsit5",
    5,
    c=_TSIT5_C,
    a=_TSIT5_A,
    b=_TSIT5_B,
    b_hat=_TSIT5_B_HAT,
    error_order=4,
    fsal=True,
    dense=_interpolant_rows([_poly_product(s, f) for s, f in _TSIT5_INTERPOLANT], degree=4),
    dense_order=4,
)

# --------------------------------------------------------------------------------------------
# DOP853: E. Hairer's Fortran code dop853.f (described in Hairer, Norsett & Wanner I, 2nd ed.),
# with the digits of dop853.f as transcribed in scipy's ``integrate/_ivp/dop853_coefficients.py``
# (stage indices below are 0-based, as there).
# --------------------------------------------------------------------------------------------

_DOP853_C = (
    "0.0",
    "0.526001519587677318785587544488e-01",
    "0.789002279381515978178381316732e-01",
    "0.118350341907227396726757197510",
    "0.281649658092772603273242802490",
    "0.333333333333333333333333333333",
    "0.25",
    "0.307692307692307692307692307692",
    "0.651282051282051282051282051282",
    "0.6",
    "0.857142857142857142857142857142",
    "1.0",
)
# Row i holds the nonzero a[i][j] of stage i. Stage 12 is f(t + h, y_new) (its weights are b), and
# stages 13-15 are the extra dense-output stages.
_DOP853_A = {
    1: {
        0: "5.26001519587677318785587544488e-2",
    },
    2: {
        0: "1.97250569845378994544595329183e-2",
        1: "5.91751709536136983633785987549e-2",
    },
    3: {
        0: "2.95875854768068491816892993775e-2",
        2: "8.87627564304205475450678981324e-2",
    },
    4: {
        0: "2.41365134159266685502369798665e-1",
        2: "-8.84549479328286085344864962717e-1",
        3: "9.24834003261792003115737966543e-1",
    },
    5: {
        0: "3.7037037037037037037037037037e-2",
        3: "1.70828608729473871279604482173e-1",
        4: "1.25467687566822425016691814123e-1",
    },
    6: {
        0: "3.7109375e-2",
        3: "1.70252211019544039314978060272e-1",
        4: "6.02165389804559606850219397283e-2",
        5: "-1.7578125e-2",
    },
    7: {
        0: "3.70920001185047927108779319836e-2",
        3: "1.70383925712239993810214054705e-1",
        4: "1.07262030446373284651809199168e-1",
        5: "-1.53194377486244017527936158236e-2",
        6: "8.27378916381402288758473766002e-3",
    },
    8: {
        0: "6.24110958716075717114429577812e-1",
        3: "-3.36089262944694129406857109825",
        4: "-8.68219346841726006818189891453e-1",
        5: "2.75920996994467083049415600797e1",
        6: "2.01540675504778934086186788979e1",
        7: "-4.34898841810699588477366255144e1",
    },
    9: {
        0: "4.77662536438264365890433908527e-1",
        3: "-2.48811461997166764192642586468",
        4: "-5.90290826836842996371446475743e-1",
        5: "2.12300514481811942347288949897e1",
        6: "1.52792336328824235832596922938e1",
        7: "-3.32882109689848629194453265587e1",
        8: "-2.03312017085086261358222928593e-2",
    },
    10: {
        0: "-9.3714243008598732571704021658e-1",
        3: "5.18637242884406370830023853209",
        4: "1.09143734899672957818500254654",
        5: "-8.14978701074692612513997267357",
        6: "-1.85200656599969598641566180701e1",
        7: "2.27394870993505042818970056734e1",
        8: "2.49360555267965238987089396762",
        9: "-3.0467644718982195003823669022",
    },
    11: {
        0: "2.27331014751653820792359768449",
        3: "-1.05344954667372501984066689879e1",
        4: "-2.00087205822486249909675718444",
        5: "-1.79589318631187989172765950534e1",
        6: "2.79488845294199600508499808837e1",
        7: "-2.85899827713502369474065508674",
        8: "-8.87285693353062954433549289258",
        9: "1.23605671757943030647266201528e1",
        10: "6.43392746015763530355970484046e-1",
    },
    13: {
        0: "5.61675022830479523392909219681e-2",
        6: "2.53500210216624811088794765333e-1",
        7: "-2.46239037470802489917441475441e-1",
        8: "-1.24191423263816360469010140626e-1",
        9: "1.5329179827876569731206322685e-1",
        10: "8.20105229563468988491666602057e-3",
        11: "7.56789766054569976138603589584e-3",
        12: "-8.298e-3",
    },
    14: {
        0: "3.18346481635021405060768473261e-2",
        5: "2.83009096723667755288322961402e-2",
        6: "5.35419883074385676223797384372e-2",
        7: "-5.49237485713909884646569340306e-2",
        10: "-1.08347328697249322858509316994e-4",
        11: "3.82571090835658412954920192323e-4",
        12: "-3.40465008687404560802977114492e-4",
        13: "1.41312443674632500278074618366e-1",
    },
    15: {
        0: "-4.28896301583791923408573538692e-1",
        5: "-4.69762141536116384314449447206",
        6: "7.68342119606259904184240953878",
        7: "4.06898981839711007970213554331",
        8: "3.56727187455281109270669543021e-1",
        12: "-1.39902416515901462129418009734e-3",
        13: "2.9475147891527723389556272149",
        14: "-9.15095847217987001081870187138",
    },
}
# The weights b (order 8); b[1:5] vanish.
_DOP853_B = {
    0: "5.42937341165687622380535766363e-2",
    5: "4.45031289275240888144113950566",
    6: "1.89151789931450038304281599044",
    7: "-5.8012039600105847814672114227",
    8: "3.1116436695781989440891606237e-1",
    9: "-1.52160949662516078556178806805e-1",
    10: "2.01365400804030348374776537501e-1",
    11: "4.47106157277725905176885569043e-2",
}
# Nodes of the three extra dense-output stages.
_DOP853_DENSE_C = ("0.1", "0.2", "0.777777777777777777777777777778")
# Hairer's er_1..er_12, the weights of the order-5 error estimate err5 (the ``E5`` of scipy).
_DOP853_ER = {
    0: "0.1312004499419488073250102996e-1",
    5: "-0.1225156446376204440720569753e+1",
    6: "-0.4957589496572501915214079952",
    7: "0.1664377182454986536961530415e+1",
    8: "-0.3503288487499736816886487290",
    9: "0.3341791187130174790297318841",
    10: "0.8192320648511571246570742613e-1",
    11: "-0.2235530786388629525884427845e-1",
}
# Hairer's bhh_1..bhh_3: an order-3 quadrature on stages 0, 8 and 11; err3 = (b - bhh) . k.
_DOP853_BHH = {
    0: "0.244094488188976377952755905512",
    8: "0.733846688281611857341361741547",
    11: "0.220588235294117647058823529412e-1",
}
# Hairer's d4j..d7j: the dense-output vectors rcont5..rcont8 are h * (d . K) over 16 stages.
_DOP853_D = (
    {
        0: "-0.84289382761090128651353491142e+1",
        5: "0.56671495351937776962531783590",
        6: "-0.30689499459498916912797304727e+1",
        7: "0.23846676565120698287728149680e+1",
        8: "0.21170345824450282767155149946e+1",
        9: "-0.87139158377797299206789907490",
        10: "0.22404374302607882758541771650e+1",
        11: "0.63157877876946881815570249290",
        12: "-0.88990336451333310820698117400e-1",
        13: "0.18148505520854727256656404962e+2",
        14: "-0.91946323924783554000451984436e+1",
        15: "-0.44360363875948939664310572000e+1",
    },
    {
        0: "0.10427508642579134603413151009e+2",
        5: "0.24228349177525818288430175319e+3",
        6: "0.16520045171727028198505394887e+3",
        7: "-0.37454675472269020279518312152e+3",
        8: "-0.22113666853125306036270938578e+2",
        9: "0.77334326684722638389603898808e+1",
        10: "-0.30674084731089398182061213626e+2",
        11: "-0.93321305264302278729567221706e+1",
        12: "0.15697238121770843886131091075e+2",
        13: "-0.31139403219565177677282850411e+2",
        14: "-0.93529243588444783865713862664e+1",
        15: "0.35816841486394083752465898540e+2",
    },
    {
        0: "0.19985053242002433820987653617e+2",
        5: "-0.38703730874935176555105901742e+3",
        6: "-0.18917813819516756882830838328e+3",
        7: "0.52780815920542364900561016686e+3",
        8: "-0.11573902539959630126141871134e+2",
        9: "0.68812326946963000169666922661e+1",
        10: "-0.10006050966910838403183860980e+1",
        11: "0.77771377980534432092869265740",
        12: "-0.27782057523535084065932004339e+1",
        13: "-0.60196695231264120758267380846e+2",
        14: "0.84320405506677161018159903784e+2",
        15: "0.11992291136182789328035130030e+2",
    },
    {
        0: "-0.25693933462703749003312586129e+2",
        5: "-0.15418974869023643374053993627e+3",
        6: "-0.23152937917604549567536039109e+3",
        7: "0.35763911791061412378285349910e+3",
        8: "0.93405324183624310003907691704e+2",
        9: "-0.37458323136451633156875139351e+2",
        10: "0.10409964950896230045147246184e+3",
        11: "0.29840293426660503123344363579e+2",
        12: "-0.43533456590011143754432175058e+2",
        13: "0.96324553959188282948394950600e+2",
        14: "-0.39177261675615439165231486172e+2",
        15: "-0.14972683625798562581422125276e+3",
    },
)


def _dop853() -> Tableau:
    stages, n_dense = 12, 16
    b = _sparse(stages, _DOP853_B)
    # Hairer's err5 uses the er_i directly; they are b - b_hat for an order-5 b_hat (the sign
    # is immaterial to the norm). err3 is b - bhh, bhh being an order-3 quadrature.
    b_err5 = _sparse(stages, _DOP853_ER)
    b_err3 = _minus(b, _sparse(stages, _DOP853_BHH))
    tail_rows = [_sparse(n_dense, row) for row in _DOP853_D]
    return _record(
        "dopri8",
        8,
        c=_DOP853_C,
        a=[_sparse(i, _DOP853_A.get(i, {})) for i in range(stages)],
        b=b,
        b_err=b_err5,
        # The combined estimate n5**2 / sqrt(n5**2 + 0.01 * n3**2) is O(h**6)**2 / O(h**4) =
        # O(h**8), hence 7 although the embedded solutions have orders 5 and 3; scipy's DOP853
        # uses the same ``error_estimator_order = 7``.
        error_order=7,
        b_err2=b_err3,
        dense=_hairer_interpolant(b, tail_rows, n_dense=n_dense, new_stage=stages),
        # Three extra stages after f(t + h, y_new); row j weights every dense stage before it.
        dense_c=_DOP853_DENSE_C,
        dense_a=[_sparse(i, _DOP853_A[i]) for i in range(stages + 1, n_dense)],
        dense_order=7,
    )


DOPRI8 = _dop853()

# --------------------------------------------------------------------------------------------
# Registry.
# --------------------------------------------------------------------------------------------

FIXED_STEP_METHODS: tuple[str, ...] = ("euler", "midpoint", "heun2", "heun3", "rk4")
"""The fixed-step methods' names: they need ``options={"step_size": ...}`` (or
``grid_constructor``)."""

ADAPTIVE_METHODS: tuple[str, ...] = (
    "adaptive_heun",
    "fehlberg2",
    "bosh3",
    "dopri5",
    "tsit5",
    "dopri8",
)
"""The adaptive methods' names: embedded error estimates, step size chosen by ``rtol`` and
``atol``. ``"dopri5"`` is the default method."""

TABLEAUS: dict[str, Tableau] = {
    tab.name: tab
    for tab in (
        EULER,
        MIDPOINT,
        HEUN2,
        HEUN3,
        RK4,
        ADAPTIVE_HEUN,
        FEHLBERG2,
        BOSH3,
        DOPRI5,
        TSIT5,
        DOPRI8,
    )
}
"""Every method's [`Tableau`][odecore.Tableau], by name."""
