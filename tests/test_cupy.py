"""The CuPy backend.

Without a CUDA device (CI, most machines here) three things are tested: that selecting the
backend says why it cannot be used, the source of the fused kernels (generated as plain
Python and evaluated here with NumPy, against the portable path and closed forms), and the
core's path that keeps a single sample's control values on the device (run on a NumPy
backend that asks for it). The tests that need a device skip, saying "no CUDA device" or
"cupy not installed"; ``benchmarks/gpu_check.sh`` runs them where there is one.
"""

from __future__ import annotations

import importlib.util
import math
import re

import numpy as np
import pytest
from backend_params import REQUIRED
from odecore.adapters import _cupy_source
from odecore.adapters.numpy import NumpyBackend

import odecore
from odecore.solvers.explicit_rk import prepared
from odecore.solvers.stage_stores import ListStages

EPS64 = np.finfo(np.float64).eps
EPS32 = np.finfo(np.float32).eps
ADAPTIVE = ("dopri5", "bosh3", "tsit5", "dopri8")


def _cupy_backend():
    """The CuPy backend, or a skip that says why there is none; a failure instead where the
    run requires cupy (ODECORE_REQUIRED_BACKENDS, as benchmarks/gpu_check.sh sets it)."""
    if importlib.util.find_spec("cupy") is None:
        why = "cupy not installed (pip install 'odecore[cupy]')"
    else:
        try:
            return odecore.get_backend("cupy")
        except odecore.DeviceNotAvailableError as exc:
            why = f"no CUDA device: {exc}"
    if "cupy" in REQUIRED:
        pytest.fail(f"the cupy backend is required in this run but unavailable: {why}")
    pytest.skip(why)


@pytest.fixture
def cupy_backend():
    return _cupy_backend()


# --------------------------------------------------------------------------------------------
# Without a device: selecting the backend


def test_selecting_cupy_says_why_it_is_unavailable():
    if importlib.util.find_spec("cupy") is None:
        expected, kind = "cupy, which is not installed", odecore.BackendNotAvailableError
    else:
        try:
            odecore.get_backend("cupy")
        except odecore.DeviceNotAvailableError:
            pass
        else:
            pytest.skip("a CUDA device is present: the backend is available")
        expected, kind = "no CUDA device", odecore.DeviceNotAvailableError
    with pytest.raises(kind, match=expected):
        odecore.get_backend("cupy")
    with pytest.raises(kind, match=expected):
        odecore.odeint(lambda t, y: -y, [1.0], [0.0, 1.0], backend="cupy")


# --------------------------------------------------------------------------------------------
# Without a device: the generated source, evaluated by NumPy


def _c_to_python(expression: str) -> str:
    """A generated CUDA expression as Python on NumPy arrays: casts dropped (the values
    here are float64 throughout), the math functions NumPy's."""
    expression = re.sub(r"\((?:T|double)\)", "", expression)
    for c_name, numpy_name in (("fmax", "np.maximum"), ("fabs", "np.abs"), ("sqrt", "np.sqrt")):
        expression = re.sub(rf"\b{c_name}\(", f"{numpy_name}(", expression)
    return expression


def _run_operation(source: _cupy_source.Source, **arrays) -> np.ndarray:
    assert source.operation.startswith("out = ")
    return eval(_c_to_python(source.operation.removeprefix("out = ")), {"np": np}, arrays)


def _stages(rng, count, shape=(3, 5)):
    return [rng.standard_normal(shape) for _ in range(count)]


@pytest.mark.parametrize("method", ADAPTIVE)
def test_stage_combination_equals_the_portable_store(method):
    # The kernel's operations are the portable store's in the same order (products are
    # commutative), so in float64 they agree exactly.
    rk = prepared(odecore.TABLEAUS[method])
    rng = np.random.default_rng(0)
    ks = _stages(rng, rk.stages)
    y = rng.standard_normal((3, 5))
    hy = rng.uniform(0.01, 0.1, (3, 1))
    reference = ListStages(rk, y, None, None, hy, ks=ks)
    for row in rk.step_rows:
        for with_y in (True, False):
            source = _cupy_source.stage_combination(row.dense, with_y=with_y)
            args = {f"k{j}": ks[j] for j in source.stages}
            out = _run_operation(source, y=y, hy=hy, **args)
            expected = reference.stage_input(row) if with_y else reference.increment(row)
            np.testing.assert_array_equal(out, expected)


def test_stage_combination_reads_only_the_stages_it_weights():
    source = _cupy_source.stage_combination((0.25, 0.0, -1.5))
    assert source.stages == (0, 2)
    assert source.in_params == "T y, T hy, T k0, T k2"
    # The coefficients are the tableau's doubles: each literal reads back exactly.
    literals = [float(x) for x in re.findall(r"\(T\)\(([^)]*)\)", source.operation)]
    assert literals == [0.25, -1.5]


def test_stage_combination_of_zero_weights_is_zero():
    source = _cupy_source.stage_combination((0.0, 0.0))
    out = _run_operation(source, y=np.ones(4), hy=0.5, k0=np.full(4, 3.0))
    np.testing.assert_array_equal(out, np.ones(4))


def test_rms_error_ratio_against_its_definition():
    source = _cupy_source.rms_error_ratio()
    rng = np.random.default_rng(1)
    err, y, y_new = (rng.standard_normal((4, 7)) for _ in range(3))
    rtol, atol = 1e-3, rng.uniform(1e-6, 1e-5, (4, 7))
    assert source.reduce_expr == "a + b" and source.identity == "0"
    arrays = {"err": err, "y": y, "y_new": y_new, "rtol": rtol, "atol": atol}
    square = eval(
        _c_to_python(source.map_expr), {"np": np, "odecore_square": lambda s: s * s}, arrays
    )
    summed = square.sum(axis=1)
    post = source.post_map_expr.removeprefix("out = ")
    post = post.replace("_in_ind.size() / _out_ind.size()", "(7 * 4) // 4")
    out = eval(_c_to_python(post), {"np": np}, {"a": summed})
    scaled = err / (atol + rtol * np.maximum(np.abs(y), np.abs(y_new)))
    expected = np.sqrt(np.mean(scaled**2, axis=1))
    # Seven squares summed in another order, a division and a root: a few roundings.
    np.testing.assert_allclose(out, expected, rtol=16 * EPS64, atol=0)


class _DeviceArray:
    """Stands for a device array: what CuPy reads a kernel argument's type from."""

    __cuda_array_interface__ = {"shape": (1,), "typestr": "<f8", "data": (0, False)}


@pytest.mark.parametrize("atol", [1e-9, _DeviceArray()], ids=["atol-number", "atol-array"])
@pytest.mark.parametrize("rtol", [1e-6, _DeviceArray()], ids=["rtol-number", "rtol-array"])
def test_error_ratio_types_every_parameter_its_argument_can_fill(rtol, atol):
    # CuPy fills a type placeholder from array arguments only; one left to Python numbers
    # alone cannot be resolved, and the call fails (KeyError) before the kernel compiles.
    source = _cupy_source.rms_error_ratio(*_cupy_source.tolerance_types(rtol, atol))
    params = dict(reversed(p.split()) for p in source.in_params.split(", "))
    for name, value in (("rtol", rtol), ("atol", atol)):
        if isinstance(value, float):
            assert params[name] == "float64"
        else:
            assert params[name] in ("R", "A")
    placeholders = {t for t in params.values() if len(t) == 1}
    filled = {params[name] for name in ("err", "y", "y_new")}
    filled |= {params[n] for n, v in (("rtol", rtol), ("atol", atol)) if not isinstance(v, float)}
    assert placeholders <= filled


def test_error_ratio_types_are_checked():
    with pytest.raises(ValueError, match="rtol_type must be"):
        _cupy_source.rms_error_ratio("T", "A")


@pytest.mark.parametrize("method", ADAPTIVE)
def test_dense_output_against_the_interpolant_polynomials(method):
    rk = prepared(odecore.TABLEAUS[method])
    source = _cupy_source.dense_output(rk.dense)
    rng = np.random.default_rng(2)
    ks = _stages(rng, len(rk.dense))
    y = rng.standard_normal((3, 5))
    hy = rng.uniform(0.01, 0.1, (3, 1))
    theta = np.array([0.1, 0.5, 0.9])[:, None]
    out = _run_operation(source, theta=theta, y=y, hy=hy, **{f"k{i}": ks[i] for i in source.stages})
    # b_i(theta) = sum_m dense[i][m] theta^(m + 1), evaluated as polynomials by NumPy.
    weights = [np.polyval([*reversed(row), 0.0], theta) for row in rk.dense]
    expected = y + hy * sum(w * k for w, k in zip(weights, ks, strict=True))
    # Horner against polyval: a few roundings per weight, each scaled by coefficients that
    # reach a few hundred (dopri8), summed over at most 16 stages.
    scale = max(abs(c) for row in rk.dense for c in row)
    np.testing.assert_allclose(out, expected, rtol=0, atol=64 * scale * EPS64)


def test_dense_output_at_theta_one_is_the_step():
    # For a method with its own interpolant, b_i(1) = b_i: the interpolant ends on y_new.
    rk = prepared(odecore.TABLEAUS["dopri5"])
    source = _cupy_source.dense_output(rk.dense)
    rng = np.random.default_rng(3)
    ks = _stages(rng, len(rk.dense))
    y, hy = rng.standard_normal((3, 5)), 0.05
    out = _run_operation(
        source, theta=np.ones((3, 1)), y=y, hy=hy, **{f"k{i}": ks[i] for i in source.stages}
    )
    y_new = y + hy * sum(
        float(b) * k for b, k in zip(odecore.TABLEAUS["dopri5"].b, ks[: rk.stages], strict=True)
    )
    np.testing.assert_allclose(out, y_new, rtol=0, atol=32 * EPS64)


@pytest.mark.parametrize("method", odecore.METHODS)
def test_every_method_has_its_kernels(method):
    rk = prepared(odecore.TABLEAUS[method])
    for row in rk.step_rows:
        assert _cupy_source.stage_combination(row.dense).stages
    assert _cupy_source.dense_output(rk.dense).stages


def _nvrtc():
    """CUDA's runtime compiler, which needs no device; or a skip saying it is missing."""
    try:
        from cupy_backends.cuda.libs import nvrtc

        nvrtc.getVersion()
    except Exception as exc:  # no cupy, or cupy without the NVRTC library
        pytest.skip(f"NVRTC not available to compile the kernels ({type(exc).__name__}: {exc})")
    return nvrtc


def _translation_unit(source: _cupy_source.Source, state_type: str) -> str:
    """The kernel's source as one CUDA function taking each parameter from an array: the
    parameters and the expressions exactly as the kernel gets them, with ``T`` the given type
    and the tolerances' ``R`` and ``A`` double, as CuPy's typedefs make them."""
    params = [p.split() for p in source.in_params.split(", ")]
    loads = []
    for i, (kind, name) in enumerate(params):
        c_type = {"float64": "double"}.get(kind, kind)
        loads.append(f"{c_type} {name} = ({c_type})in_[{i}];")
    if source.operation:
        body = f"T out; {source.operation}; out_[0] = (double)out;"
    else:
        body = (
            f"double v = {source.map_expr}; double a = v, b = v; a = {source.reduce_expr};"
            f" double out; {source.post_map_expr}; out_[0] = out;"
        )
    return f"""
typedef {state_type} T;
typedef double R;
typedef double A;
struct Indexer {{ __device__ long size() const {{ return 4; }} }};
{source.preamble}
extern "C" __global__ void odecore_check(const double* in_, double* out_) {{
    Indexer _in_ind, _out_ind;
    {" ".join(loads)}
    {body}
}}
"""


@pytest.mark.parametrize("state_type", ["float", "double"])
@pytest.mark.parametrize("method", ADAPTIVE + ("rk4",))
def test_generated_kernels_compile(method, state_type):
    nvrtc = _nvrtc()
    rk = prepared(odecore.TABLEAUS[method])
    sources = [
        _cupy_source.rms_error_ratio(),
        _cupy_source.rms_error_ratio("float64", "float64"),
        _cupy_source.dense_output(rk.dense),
    ]
    for row in rk.step_rows:
        sources += [_cupy_source.stage_combination(row.dense, with_y=w) for w in (True, False)]
    for source in sources:
        program = nvrtc.createProgram(_translation_unit(source, state_type), "k.cu", [], [])
        try:
            # Hopper's virtual architecture: no device is asked which one it is.
            nvrtc.compileProgram(program, ["-arch=compute_90"])
        except nvrtc.NVRTCError:
            pytest.fail(f"{source.name} does not compile:\n{nvrtc.getProgramLog(program)}")
        assert nvrtc.getPTX(program)


@pytest.mark.parametrize(
    ("weights", "kind", "message"),
    [
        ((0.5, math.nan), ValueError, r"weights\[0\]\[1\] must be finite"),
        ((0.5, math.inf), ValueError, r"weights\[0\]\[1\] must be finite"),
        ((0.5, "1"), TypeError, r"weights\[0\]\[1\] must be a real number, got str"),
        ((True,), TypeError, r"weights\[0\]\[0\] must be a real number, got bool"),
        ("0.5", TypeError, r"weights\[0\] must be a sequence of numbers, got str"),
        ((0.1,) * 65, ValueError, r"weights\[0\] has 65 numbers, more than 64"),
    ],
)
def test_stage_combination_checks_its_weights(weights, kind, message):
    assert len(_cupy_source.stage_combination((0.1,) * 64).stages) == 64  # the most accepted
    with pytest.raises(kind, match=message):
        _cupy_source.stage_combination(weights)


@pytest.mark.parametrize(
    ("dense", "kind", "message"),
    [
        (((0.0, 0.0), (0.0,)), ValueError, "dense has no nonzero coefficient"),
        ((), ValueError, r"dense must have between 1 and 64 rows, got 0"),
        (((1.0,),) * 65, ValueError, r"dense must have between 1 and 64 rows, got 65"),
        (1.0, TypeError, "dense must be a sequence of coefficient rows, got float"),
        (((1.0, math.nan),), ValueError, r"dense\[0\]\[1\] must be finite"),
    ],
)
def test_dense_output_checks_its_coefficients(dense, kind, message):
    with pytest.raises(kind, match=message):
        _cupy_source.dense_output(dense)


# --------------------------------------------------------------------------------------------
# Without a device: control values kept as arrays for a single sample


class _DeviceControlNumpy(NumpyBackend):
    """NumPy asking, as CuPy does, to keep a single sample's control values as arrays. A
    read of one to the host fails: the solve must not need any."""

    host_control_values = False

    def to_host_float(self, x):
        raise AssertionError("a control value was read to the host during the solve")


class _Decay:
    """y' = -a y, element-wise, with its own VJP."""

    def __call__(self, t, y, a):
        return -a * y

    def vjp(self, t, y, a, cotangent):
        return -a * cotangent, -(cotangent * y)


def test_single_sample_with_device_control_values_matches_closed_form():
    a, y0 = np.array([0.5, 2.0]), np.array([1.0, -3.0])
    t = np.linspace(0.0, 1.5, 4)
    sol = odecore.solve(
        _Decay(), y0, t, params=a, rtol=1e-10, atol=1e-12, backend=_DeviceControlNumpy()
    )
    assert sol.success and sol.ys.shape == (4, 2)
    exact = y0 * np.exp(-np.outer(t, a))
    # Tolerance 1e-10 per step on a solution of size 3: the global error stays below 1e-8.
    np.testing.assert_allclose(sol.ys, exact, rtol=0, atol=1e-8)


@pytest.mark.parametrize("adjoint", ["checkpoint", "backsolve"])
def test_single_sample_with_device_control_values_gradients(adjoint):
    a, y0 = np.array([0.5, 2.0]), np.array([1.0, -3.0])
    t = np.array([0.0, 0.7, 1.5])
    c = np.array([[0.0, 0.0], [1.0, -2.0], [0.5, 3.0]])
    ys, pullback = odecore.vjp_odeint(
        _Decay(),
        y0,
        t,
        a,
        adjoint=adjoint,
        rtol=1e-10,
        atol=1e-12,
        backend=_DeviceControlNumpy(),
    )
    y0_bar, a_bar, _ = pullback(c)
    decay = np.exp(-np.outer(t, a))  # y(t_i) = y0 exp(-a t_i)
    # L = sum_i c_i . y(t_i): dL/dy0 = sum_i c_i exp(-a t_i), dL/da = -sum_i c_i t_i y(t_i).
    np.testing.assert_allclose(y0_bar, (c * decay).sum(axis=0), rtol=1e-8)
    np.testing.assert_allclose(a_bar, -(c * t[:, None] * y0 * decay).sum(axis=0), rtol=1e-8)


# --------------------------------------------------------------------------------------------
# With a device


def test_solve_on_device(cupy_backend):
    import cupy

    a, y0 = cupy.asarray([0.5, 2.0]), cupy.asarray([1.0, -3.0])
    t = cupy.linspace(0.0, 1.5, 4)
    sol = odecore.solve(_Decay(), y0, t, params=a, rtol=1e-10, atol=1e-12)
    assert isinstance(sol.ys, cupy.ndarray) and sol.ys.dtype == cupy.float64
    exact = y0 * cupy.exp(-cupy.outer(t, a))
    # As on NumPy: 1e-10 per step, a solution of size 3.
    assert float(cupy.max(cupy.abs(sol.ys - exact))) < 1e-8


def test_backend_cupy_moves_plain_inputs(cupy_backend):
    import cupy

    ys = odecore.odeint(lambda t, y: -y, [1.0, 2.0], [0.0, 1.0], backend="cupy", rtol=1e-10)
    assert isinstance(ys, cupy.ndarray)
    np.testing.assert_allclose(cupy.asnumpy(ys[-1]), np.exp(-1.0) * np.array([1.0, 2.0]))


def test_batched_float32_stays_on_device(cupy_backend):
    import cupy

    y0 = cupy.asarray([[1.0], [2.0], [4.0]], dtype=cupy.float32)
    t = cupy.asarray([0.0, 1.0])
    ys = odecore.odeint(lambda t, y: -y, y0, t, batch_axis=0, rtol=1e-6, atol=1e-8)
    assert isinstance(ys, cupy.ndarray) and ys.dtype == cupy.float32
    # rtol 1e-6 on a float32 state: about ten roundings of 6e-8 on top of the tolerance.
    np.testing.assert_allclose(
        cupy.asnumpy(ys[-1, :, 0]), np.exp(-1.0) * np.array([1, 2, 4]), rtol=5e-6
    )


def test_mixed_libraries_are_refused(cupy_backend):
    import cupy

    with pytest.raises(TypeError, match="arrays from two libraries"):
        odecore.odeint(lambda t, y: -y, cupy.asarray([1.0]), np.array([0.0, 1.0]))


@pytest.mark.parametrize("adjoint", ["checkpoint", "backsolve"])
def test_gradients_on_device(cupy_backend, adjoint):
    import cupy

    a, y0 = np.array([0.5, 2.0]), np.array([1.0, -3.0])
    t = np.array([0.0, 0.7, 1.5])
    c = np.array([[0.0, 0.0], [1.0, -2.0], [0.5, 3.0]])
    ys, pullback = odecore.vjp_odeint(
        _Decay(), *map(cupy.asarray, (y0, t, a)), adjoint=adjoint, rtol=1e-10, atol=1e-12
    )
    y0_bar, a_bar, _ = pullback(cupy.asarray(c))
    decay = np.exp(-np.outer(t, a))
    np.testing.assert_allclose(cupy.asnumpy(y0_bar), (c * decay).sum(axis=0), rtol=1e-8)
    expected = -(c * t[:, None] * y0 * decay).sum(axis=0)
    np.testing.assert_allclose(cupy.asnumpy(a_bar), expected, rtol=1e-8)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("method", ADAPTIVE)
def test_fused_kernels_match_the_portable_path(cupy_backend, method, dtype):
    import types

    import cupy
    from odecore.adapters.cupy import FusedDenseOutput, FusedStages, _rms_error_ratio

    eps = {"float64": EPS64, "float32": EPS32}[dtype]
    xp = cupy_backend.xp
    rk = prepared(odecore.TABLEAUS[method])
    rng = np.random.default_rng(4)

    def device(x):
        return cupy.asarray(x, dtype=dtype)

    ks = [device(k) for k in _stages(rng, len(rk.dense), (64, 33))]
    y, y_new = device(rng.standard_normal((64, 33))), device(rng.standard_normal((64, 33)))
    hy = device(rng.uniform(0.01, 0.1, (64, 1)))
    n = rk.stages
    fused = FusedStages(rk, y)(rk, y, ks[0], None, hy)
    portable = ListStages(rk, y, ks[0], None, hy)
    for k in ks[1:n]:
        fused.add(k)
        portable.add(k)
    # Sums of up to 12 products: the kernel may contract a product and a sum into one
    # rounding (fused multiply-add), so the two differ by a few roundings of each term.
    for row in rk.step_rows:
        for a, b in (
            (fused.stage_input(row), portable.stage_input(row)),
            (fused.increment(row), portable.increment(row)),
        ):
            bound = 32 * eps * float(cupy.max(cupy.abs(b)) + 1)
            assert float(cupy.max(cupy.abs(a - b))) <= bound

    err = ks[1] * 1e-4
    for rtol, atol in ((1e-3, 1e-6), (1e-5, device(rng.uniform(1e-7, 1e-6, (64, 33))))):
        ratio = _rms_error_ratio(err, y, y_new, rtol, atol, 1)
        scale = atol + rtol * xp.maximum(xp.abs(y), xp.abs(y_new))
        scaled = err / scale
        reference = xp.sqrt(xp.vecdot(scaled, scaled, axis=-1) / 33)
        # The kernel works in double from the state's values; the portable path rounds to
        # the state's type: a few roundings of eps each.
        np.testing.assert_allclose(cupy.asnumpy(ratio), cupy.asnumpy(reference), rtol=64 * eps)

    values = types.SimpleNamespace(scalar=False, xp=xp)
    coeffs = xp.asarray(rk.dense, dtype=xp.float64)
    theta = cupy.asarray(rng.uniform(0, 1, 64))
    out = FusedDenseOutput(rk)(values, coeffs, theta, y, hy, ks)
    reference = rk.interpolate(values, coeffs, theta, y, hy, ks)
    # Weights up to a few hundred (dopri8), cast to the state's type, over up to 16 stages.
    scale = max(abs(c) for row in rk.dense for c in row)
    bound = 64 * scale * eps * float(cupy.max(cupy.abs(y)) + 1)
    assert float(cupy.max(cupy.abs(out - reference))) <= bound


class _Contraction:
    """``z = a z + b`` element-wise, ``|a| < 1``: ``z* = b / (1 - a)``."""

    def __call__(self, z, params):
        a, b = params
        return a * z + b

    def vjp(self, z, params, cotangent):
        a, _ = params
        return a * cotangent, (cotangent * z, cotangent)


def test_fixed_point_gradient_on_device(cupy_backend):
    import cupy

    a, b = np.array([0.5, -0.25, 0.8]), np.array([1.0, 2.0, -1.0])
    sol, pullback = odecore.vjp_fixed_point(
        _Contraction(), cupy.zeros(3), (cupy.asarray(a), cupy.asarray(b)), tol=1e-12, max_iter=500
    )
    z_star = b / (1 - a)
    np.testing.assert_allclose(cupy.asnumpy(sol.z), z_star, rtol=1e-10)
    a_bar, b_bar = pullback(cupy.ones(3))
    # L = sum z*: dL/db = 1 / (1 - a), dL/da = b / (1 - a)^2; solved to tol 1e-12.
    np.testing.assert_allclose(cupy.asnumpy(b_bar), 1 / (1 - a), rtol=1e-9)
    np.testing.assert_allclose(cupy.asnumpy(a_bar), b / (1 - a) ** 2, rtol=1e-9)
