"""Checks of the Butcher tableaus in ``odecore.tableaus``.

Three independent lines of evidence: the layout conventions of the records, Butcher's order
conditions evaluated over every rooted tree (for the solutions, the embedded solutions and the
dense interpolants), and convergence orders observed by actually integrating problems whose
solutions are known. Where scipy ships the same method, its numbers are compared as well.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import scipy.integrate
from scipy.linalg import expm

from odecore.tableaus import ADAPTIVE_METHODS, FIXED_STEP_METHODS, TABLEAUS, Tableau

NAMES = tuple(TABLEAUS)
DENSE_NAMES = tuple(name for name, tab in TABLEAUS.items() if tab.dense is not None)

# Coefficients are float64, so satisfied conditions hold to round-off (the worst seen is ~6e-14,
# DOP853's interpolant near theta = 1, whose coefficients reach ~1e3).
HOLDS = 1e-12
# A violated condition misses by far more: the smallest miss seen is ~7e-6.
FAILS = 1e-7
# Observed convergence orders must be this close to the claimed ones.
ORDER_SLACK = 0.3

# The orders of the embedded solutions b - b_err (and b - b_err2). For an ordinary pair the
# embedded order is error_order; DOP853's two estimators are the exception.
EMBEDDED_ORDERS = {"dopri8": {"b_err": 5, "b_err2": 3}}


# ---------------------------------------------------------------------------------------------
# Registry and layout
# ---------------------------------------------------------------------------------------------


def test_registry_lists_exactly_the_promised_methods():
    assert FIXED_STEP_METHODS == ("euler", "midpoint", "heun2", "heun3", "rk4")
    assert ADAPTIVE_METHODS == (
        "adaptive_heun",
        "fehlberg2",
        "bosh3",
        "dopri5",
        "tsit5",
        "dopri8",
    )
    assert set(TABLEAUS) == set(FIXED_STEP_METHODS) | set(ADAPTIVE_METHODS)
    assert all(tab.name == name for name, tab in TABLEAUS.items())


@pytest.mark.parametrize("name", FIXED_STEP_METHODS)
def test_fixed_step_methods_carry_no_estimator_or_interpolant(name):
    tab = TABLEAUS[name]
    assert (tab.b_err, tab.error_order, tab.b_err2, tab.dense) == (None, None, None, None)
    assert not tab.adaptive and not tab.fsal


@pytest.mark.parametrize("name", ADAPTIVE_METHODS)
def test_adaptive_methods_have_an_estimator(name):
    tab = TABLEAUS[name]
    assert tab.adaptive and tab.error_order is not None
    assert len(tab.b_err) == tab.stages
    assert tab.b_err2 is None or len(tab.b_err2) == tab.stages


@pytest.mark.parametrize("name", NAMES)
def test_a_is_ragged_strictly_lower(name):
    tab = TABLEAUS[name]
    assert [len(row) for row in tab.a] == list(range(tab.stages))
    assert len(tab.b) == len(tab.c) == tab.stages
    assert tab.c[0] == 0


@pytest.mark.parametrize("name", NAMES)
def test_c_is_the_row_sum_of_a(name):
    # Also for the extra dense stages, whose rows weight every dense stage before them.
    a_dense, c_dense = dense_stage_matrix(TABLEAUS[name])
    np.testing.assert_allclose(a_dense.sum(axis=1), c_dense, rtol=0, atol=1e-14)


@pytest.mark.parametrize("name", NAMES)
def test_fsal_flag_is_exactly_the_fsal_property(name):
    tab = TABLEAUS[name]
    last_stage_is_y_new = (
        tab.stages > 1
        and tab.c[-1] == 1
        and tab.b[-1] == 0
        and np.allclose(tab.a[-1], tab.b[:-1], rtol=0, atol=1e-15)
    )
    assert tab.fsal == last_stage_is_y_new


@pytest.mark.parametrize("name", NAMES)
def test_dense_layout(name):
    tab = TABLEAUS[name]
    n_main = tab.stages if tab.fsal else tab.stages + 1
    assert len(tab.dense_c) == len(tab.dense_a)
    assert [len(row) for row in tab.dense_a] == [n_main + j for j in range(len(tab.dense_a))]
    if tab.dense is None:
        assert tab.dense_order is None and not tab.dense_c
        return
    assert len(tab.dense) == n_main + len(tab.dense_c)
    assert len({len(row) for row in tab.dense}) == 1


# ---------------------------------------------------------------------------------------------
# Rooted trees and elementary weights
#
# A rooted tree is the sorted tuple of its subtrees (a leaf is ``()``), which makes equal trees
# equal tuples. For weights w and stage matrix A, w . Phi(t) = 1/gamma(t) for all trees up to
# order p is equivalent to order p (Butcher; Hairer, Norsett & Wanner I, section II.2).
# ---------------------------------------------------------------------------------------------

Tree = tuple


def _grown_by_one_leaf(tree: Tree):
    yield tuple(sorted((*tree, ())))
    for i, child in enumerate(tree):
        for grown in _grown_by_one_leaf(child):
            yield tuple(sorted((*tree[:i], grown, *tree[i + 1 :])))


@functools.cache
def trees_of_order(n: int) -> tuple[Tree, ...]:
    if n == 1:
        return ((),)
    return tuple(sorted({g for tree in trees_of_order(n - 1) for g in _grown_by_one_leaf(tree)}))


@functools.cache
def tree_order(tree: Tree) -> int:
    return 1 + sum(tree_order(child) for child in tree)


@functools.cache
def density(tree: Tree) -> int:
    return tree_order(tree) * math.prod(density(child) for child in tree)


class StageWeights:
    """Phi(t) as a vector over the stages: Phi_i(t) = prod over subtrees u of (A Phi(u))_i."""

    def __init__(self, a_matrix: np.ndarray):
        self.a = a_matrix
        self._memo: dict[Tree, np.ndarray] = {}

    def __call__(self, tree: Tree) -> np.ndarray:
        if tree not in self._memo:
            phi = np.ones(self.a.shape[0])
            for child in tree:
                phi = phi * (self.a @ self(child))
            self._memo[tree] = phi
        return self._memo[tree]


def worst_residual(weights, stage_weights: StageWeights, n: int, theta: float = 1.0) -> float:
    """max over trees t of order n of |weights . Phi(t) - theta**n / gamma(t)|."""
    return max(
        abs(np.dot(weights, stage_weights(t)) - theta**n / density(t)) for t in trees_of_order(n)
    )


def check_exact_order(weights, stage_weights: StageWeights, order: int, theta: float = 1.0):
    for n in range(1, order + 1):
        assert worst_residual(weights, stage_weights, n, theta) < HOLDS, f"order {n} violated"
    # The stated order is not an under-claim: some tree of the next order is violated.
    assert worst_residual(weights, stage_weights, order + 1, theta) > FAILS


def main_matrix(tab: Tableau) -> np.ndarray:
    a = np.zeros((tab.stages, tab.stages))
    for i, row in enumerate(tab.a):
        a[i, :i] = row
    return a


def dense_stage_matrix(tab: Tableau) -> tuple[np.ndarray, np.ndarray]:
    """A and c over the dense stages: main stages, f(t + h, y_new) unless FSAL, extra stages."""
    rows, nodes = [list(row) for row in tab.a], list(tab.c)
    if tab.dense is not None and not tab.fsal:
        rows.append(list(tab.b))
        nodes.append(1.0)
    rows += [list(row) for row in tab.dense_a]
    nodes += list(tab.dense_c)
    a = np.zeros((len(rows), len(rows)))
    for i, row in enumerate(rows):
        a[i, : len(row)] = row
    return a, np.array(nodes)


def dense_weights(tab: Tableau, theta: float) -> np.ndarray:
    """b_i(theta) = sum_m dense[i][m] * theta**(m + 1)."""
    coefficients = np.array(tab.dense)
    return coefficients @ theta ** np.arange(1, coefficients.shape[1] + 1)


def embedded_solutions(tab: Tableau) -> dict[str, tuple[np.ndarray, int]]:
    expected = EMBEDDED_ORDERS.get(tab.name, {"b_err": tab.error_order})
    estimators = {"b_err": tab.b_err, "b_err2": tab.b_err2}
    return {
        key: (np.array(tab.b) - np.array(estimators[key]), order) for key, order in expected.items()
    }


def test_tree_counts_match_oeis_a000081():
    assert [len(trees_of_order(n)) for n in range(1, 10)] == [1, 1, 2, 4, 9, 20, 48, 115, 286]
    assert sum(len(trees_of_order(n)) for n in range(1, 9)) == 200


def test_tree_densities():
    bushy, tall = ((), (), ()), ((((),),),)
    # The bushy tree of order n has gamma = n, the tall one n!.
    assert (density(bushy), density(tall)) == (4, 24)
    assert sorted(density(t) for t in trees_of_order(3)) == [3, 6]


# ---------------------------------------------------------------------------------------------
# Order conditions
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_solution_has_exactly_the_stated_order(name):
    tab = TABLEAUS[name]
    check_exact_order(np.array(tab.b), StageWeights(main_matrix(tab)), tab.order)


@pytest.mark.parametrize("name", ADAPTIVE_METHODS)
def test_embedded_solutions_have_exactly_their_orders(name):
    tab = TABLEAUS[name]
    stage_weights = StageWeights(main_matrix(tab))
    for weights, order in embedded_solutions(tab).values():
        check_exact_order(weights, stage_weights, order)


@pytest.mark.parametrize("name", sorted(set(ADAPTIVE_METHODS) - set(EMBEDDED_ORDERS)))
def test_ordinary_pairs_propagate_the_higher_order_solution(name):
    # Then the estimate b_err . k is O(h**(q + 1)) with q the embedded order, which the test
    # above has shown to be error_order.
    tab = TABLEAUS[name]
    assert tab.error_order < tab.order


def test_dop853_error_order_matches_scipy():
    # 7 is not the order of either embedded solution (5 and 3), but the exponent of Hairer's
    # combined estimate, O(h**6)**2 / O(h**4) = O(h**8); scipy steps with the same exponent.
    assert TABLEAUS["dopri8"].error_order == scipy.integrate.DOP853.error_estimator_order == 7


# ---------------------------------------------------------------------------------------------
# Dense output
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", DENSE_NAMES)
def test_interpolant_matches_the_step_at_both_ends(name):
    tab = TABLEAUS[name]
    n_dense = len(tab.dense)
    b_padded = np.concatenate([tab.b, np.zeros(n_dense - tab.stages)])
    np.testing.assert_array_equal(dense_weights(tab, 0.0), np.zeros(n_dense))
    np.testing.assert_allclose(dense_weights(tab, 1.0), b_padded, rtol=0, atol=HOLDS)


@pytest.mark.parametrize("theta", [0.1, 0.37, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("name", DENSE_NAMES)
def test_interpolant_satisfies_the_dense_order_conditions(name, theta):
    tab = TABLEAUS[name]
    stage_weights = StageWeights(dense_stage_matrix(tab)[0])
    weights = dense_weights(tab, theta)
    for n in range(1, tab.dense_order + 1):
        assert worst_residual(weights, stage_weights, n, theta) < HOLDS, f"order {n} violated"


@pytest.mark.parametrize("theta", [0.1, 0.37, 0.9])
@pytest.mark.parametrize("name", DENSE_NAMES)
def test_dense_order_is_not_an_under_claim(name, theta):
    tab = TABLEAUS[name]
    stage_weights = StageWeights(dense_stage_matrix(tab)[0])
    weights = dense_weights(tab, theta)
    assert worst_residual(weights, stage_weights, tab.dense_order + 1, theta) > FAILS


# ---------------------------------------------------------------------------------------------
# The same numbers as scipy, where scipy has the method (its E is b_hat - b, the opposite sign)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "solver"), [("bosh3", "RK23"), ("dopri5", "RK45")])
def test_matches_scipy_low_order_pairs(name, solver):
    tab, ref = TABLEAUS[name], getattr(scipy.integrate, solver)
    # scipy leaves out the FSAL stage, whose row is b, and stores A as a full (rows, cols) block.
    rows, cols = ref.A.shape
    np.testing.assert_allclose(tab.c[:rows], ref.C, rtol=0, atol=1e-16)
    np.testing.assert_allclose(main_matrix(tab)[:rows, :cols], ref.A, rtol=0, atol=1e-15)
    main_stages = ref.n_stages
    np.testing.assert_allclose(tab.b[:main_stages], ref.B, rtol=0, atol=1e-16)
    if name != "dopri5":  # dopri5 takes Shampine's embedded weights: see the next test
        np.testing.assert_allclose(tab.b_err, -ref.E, rtol=0, atol=1e-16)


def test_dopri5_error_weights_match_torchdiffeq():
    # odecore's dopri5 uses the same embedded solution as torchdiffeq (odecore/tableaus.py
    # says why), so that both take the same steps. Its order is checked with the other
    # tableaus' order conditions above.
    tableau = pytest.importorskip("torchdiffeq._impl.dopri5")._DORMAND_PRINCE_SHAMPINE_TABLEAU
    theirs = [float(x) for x in tableau.c_error]
    np.testing.assert_allclose(TABLEAUS["dopri5"].b_err, theirs, rtol=0, atol=1e-16)


def test_dopri5_interpolant_matches_scipy_rk45():
    np.testing.assert_allclose(TABLEAUS["dopri5"].dense, scipy.integrate.RK45.P, atol=1e-15)


def test_dopri8_matches_scipy_dop853():
    tab, ref = TABLEAUS["dopri8"], scipy.integrate.DOP853
    dense_a, _ = dense_stage_matrix(tab)
    np.testing.assert_allclose(tab.c, ref.C, rtol=0, atol=1e-16)
    np.testing.assert_allclose(main_matrix(tab), ref.A, rtol=0, atol=1e-15)
    np.testing.assert_allclose(tab.b, ref.B, rtol=0, atol=1e-16)
    np.testing.assert_allclose(tab.b_err, ref.E5[:-1], rtol=0, atol=1e-16)
    np.testing.assert_allclose(tab.b_err2, ref.E3[:-1], rtol=0, atol=1e-16)
    np.testing.assert_allclose(tab.dense_c, ref.C_EXTRA, rtol=0, atol=1e-16)
    np.testing.assert_allclose(dense_a[ref.n_stages + 1 :], ref.A_EXTRA, rtol=0, atol=1e-15)


# ---------------------------------------------------------------------------------------------
# Observed convergence, with a standalone RK driver (no tree code involved)
# ---------------------------------------------------------------------------------------------

# Eigenvalues 1.01 +- 0.91i and -2.03: growing and decaying modes.
LINEAR_MATRIX = np.array([[1.0, 1.0, 0.5], [-1.0, 1.0, 1.0], [0.5, 0.0, -2.0]])
LINEAR_Y0 = np.array([1.0, -0.5, 0.25])
HOPF_R0 = 0.2


def linear_rhs(t, y):
    return LINEAR_MATRIX @ y


def linear_solution(t):
    return expm(LINEAR_MATRIX * t) @ LINEAR_Y0


def hopf_rhs(t, y):
    """Hopf normal form: in polar coordinates r' = r - r**3, phi' = 1."""
    r2 = y[0] ** 2 + y[1] ** 2
    return np.array([y[0] - y[1] - y[0] * r2, y[0] + y[1] - y[1] * r2])


def hopf_solution(t):
    r = 1 / np.sqrt(1 + (1 / HOPF_R0**2 - 1) * np.exp(-2 * t))
    return np.array([r * np.cos(t), r * np.sin(t)])


PROBLEMS = {"linear": (linear_rhs, linear_solution), "hopf": (hopf_rhs, hopf_solution)}

# Steps over [0, 1] for the coarser of the two runs: fine enough to be in the asymptotic
# regime, coarse enough that the finer run's error stays far above round-off. Tsit5 needs more
# steps than DOPRI5 because its principal error coefficient is made very small, so the next
# term dominates longer; DOP853 needs very few.
GLOBAL_STEPS = {
    "euler": 64,
    "midpoint": 32,
    "heun2": 32,
    "adaptive_heun": 32,
    "fehlberg2": 32,
    "heun3": 16,
    "bosh3": 16,
    "rk4": 16,
    "dopri5": 16,
    "tsit5": 32,
    "dopri8": 2,
}
DENSE_STEP = {"dopri5": 1 / 16, "tsit5": 1 / 16, "dopri8": 1 / 4}
ESTIMATE_STEP = 1 / 16
THETA = 0.37


def combine(weights, ks):
    return sum(w * k for w, k in zip(weights, ks, strict=True))


def rk_step(tab: Tableau, rhs, t, y, h):
    ks = []
    for c_i, a_i in zip(tab.c, tab.a, strict=True):
        ks.append(rhs(t + c_i * h, y + h * combine(a_i, ks)))
    return y + h * combine(tab.b, ks), ks


def integrate(tab: Tableau, rhs, y0, t_end, steps):
    y, h = y0, t_end / steps
    for i in range(steps):
        y, _ = rk_step(tab, rhs, i * h, y, h)
    return y


def interpolate(tab: Tableau, rhs, y, h, theta):
    """One step from t = 0, then the dense output at t = theta * h."""
    y_new, ks = rk_step(tab, rhs, 0.0, y, h)
    if not tab.fsal:
        ks.append(rhs(h, y_new))
    for c_j, a_j in zip(tab.dense_c, tab.dense_a, strict=True):
        ks.append(rhs(c_j * h, y + h * combine(a_j, ks)))
    return y + h * combine(dense_weights(tab, theta), ks)


def observed_order(error_at) -> float:
    """log2 of the error ratio between step sizes h and h/2; ``error_at(halvings)``."""
    return math.log2(error_at(0) / error_at(1))


def test_linear_problem_has_modes_of_both_signs():
    real_parts = np.linalg.eigvals(LINEAR_MATRIX).real
    assert real_parts.min() < 0 < real_parts.max()


@pytest.mark.parametrize("name", NAMES)
def test_global_error_converges_at_the_stated_order(name):
    tab, steps = TABLEAUS[name], GLOBAL_STEPS[name]
    exact = linear_solution(1.0)

    def error_at(halvings):
        y_end = integrate(tab, linear_rhs, LINEAR_Y0, 1.0, steps * 2**halvings)
        return np.linalg.norm(y_end - exact)

    assert abs(observed_order(error_at) - tab.order) < ORDER_SLACK


@pytest.mark.parametrize("problem", PROBLEMS)
@pytest.mark.parametrize("name", DENSE_NAMES)
def test_interpolant_local_error_converges_at_dense_order_plus_one(name, problem):
    # A nonlinear problem too: on a linear one only the "tall" trees are exercised.
    tab, (rhs, solution) = TABLEAUS[name], PROBLEMS[problem]
    y0 = solution(0.0)

    def error_at(halvings):
        h = DENSE_STEP[name] / 2**halvings
        return np.linalg.norm(interpolate(tab, rhs, y0, h, THETA) - solution(THETA * h))

    assert abs(observed_order(error_at) - (tab.dense_order + 1)) < ORDER_SLACK


def error_estimate(tab: Tableau, rhs, y0, h, which=("b_err", "b_err2")) -> float:
    """The unscaled error estimate of one step; two estimators are combined as in DOP853."""
    _, ks = rk_step(tab, rhs, 0.0, y0, h)
    norms = [
        np.linalg.norm(h * combine(getattr(tab, key), ks))
        for key in which
        if getattr(tab, key) is not None
    ]
    if len(norms) == 1:
        return norms[0]
    n1, n2 = norms
    return n1 * n1 / math.sqrt(n1 * n1 + 0.01 * n2 * n2)


@pytest.mark.parametrize("problem", PROBLEMS)
@pytest.mark.parametrize("name", ADAPTIVE_METHODS)
def test_error_estimate_scales_as_error_order_plus_one(name, problem):
    tab, (rhs, solution) = TABLEAUS[name], PROBLEMS[problem]
    y0 = solution(0.0)

    def estimate_at(halvings):
        return error_estimate(tab, rhs, y0, ESTIMATE_STEP / 2**halvings)

    assert abs(observed_order(estimate_at) - (tab.error_order + 1)) < ORDER_SLACK


@pytest.mark.parametrize("problem", PROBLEMS)
def test_dop853_estimators_separately(problem):
    # Each estimator alone scales like the local error of its embedded solution.
    tab, (rhs, solution) = TABLEAUS["dopri8"], PROBLEMS[problem]
    y0 = solution(0.0)
    for key, embedded_order in EMBEDDED_ORDERS["dopri8"].items():

        def estimate_at(halvings, key=key):
            return error_estimate(tab, rhs, y0, ESTIMATE_STEP / 2**halvings, which=(key,))

        assert abs(observed_order(estimate_at) - (embedded_order + 1)) < ORDER_SLACK
