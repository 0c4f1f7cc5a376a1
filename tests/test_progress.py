"""``solve(..., progress=...)``: what the loop reports while it runs, on every backend."""

from __future__ import annotations

import io
import math
import sys

import numpy as np
import pytest

import odecore
from odecore.ode import progress as progress_reports


class Recorder:
    """A progress target that keeps every report."""

    def __init__(self):
        self.reports = []
        self.closed = 0

    def update(self, t, accepted, rejected, note):
        self.reports.append((t, accepted, rejected, note))

    def close(self):
        self.closed += 1


@pytest.fixture
def every_step(monkeypatch):
    """Report after every step, so that each report can be checked against that step."""
    monkeypatch.setattr(progress_reports, "REPORT_INTERVAL", 0.0)


def oscillator(xp):
    def f(t, y):
        return xp.stack([y[1], -y[0]])

    return f


def check_reports(recorder, t0, t1, naccept, nreject):
    """The times move monotonically from t0 towards t1 and end there; one report per step
    (each step adds one accepted or one rejected step) and a final one with the solve's
    counts."""
    times = np.array([r[0] for r in recorder.reports])
    counts = np.array([(r[1], r[2]) for r in recorder.reports])
    direction = np.sign(t1 - t0)
    assert np.all(np.diff(times) * direction >= 0)
    assert np.all((times - t0) * direction >= 0)
    assert times[-1] == t1
    steps = counts.sum(axis=1)
    assert list(steps[:-1]) == list(range(1, naccept + nreject + 1))
    assert tuple(counts[-1]) == (naccept, nreject)
    assert np.all(np.diff(counts, axis=0) >= 0)
    assert recorder.closed == 1


@pytest.mark.parametrize("t1", [20.0, -20.0])
def test_numpy_reports_every_step_and_changes_nothing(every_step, t1):
    f, y0, t = oscillator(np), np.array([1.0, 0.0]), np.linspace(0.0, t1, 5)
    recorder = Recorder()
    watched = odecore.solve(f, y0, t, rtol=1e-9, atol=1e-12, progress=recorder)
    plain = odecore.solve(f, y0, t, rtol=1e-9, atol=1e-12)
    assert np.array_equal(watched.ys, plain.ys)
    assert watched.stats == plain.stats
    check_reports(recorder, 0.0, t1, plain.stats["naccept"], plain.stats["nreject"])


def test_batch_reports_the_least_time_and_summed_counts(every_step):
    # The second sample is ten times faster, so it takes more steps; the least time over
    # the batch is the first sample's, which is what a report shows.
    def f(t, y):
        return y[:, ::-1] * np.array([1.0, -1.0]) * np.array([[1.0], [10.0]])

    y0, t = np.array([[1.0, 0.0], [1.0, 0.0]]), np.linspace(0.0, 5.0, 3)
    recorder = Recorder()
    sol = odecore.solve(f, y0, t, batch_axis=0, progress=recorder)
    plain = odecore.solve(f, y0, t, batch_axis=0)
    assert np.array_equal(sol.ys, plain.ys)
    final = recorder.reports[-1]
    assert final[0] == 5.0
    assert final[1:3] == (int(plain.stats["naccept"].sum()), int(plain.stats["nreject"].sum()))
    times = [r[0] for r in recorder.reports]
    assert times == sorted(times)


def test_a_stopped_sample_does_not_hold_the_reported_time(every_step):
    # The least time over the batch counts the samples still running: a sample that never
    # ran (a NaN y0 with throw=False) held the bar at t0, 0%, to the end; one that failed
    # held it at its failure. Sample 1 is invalid, sample 2 blows up at t = 1 (y' = y^2).
    def f(t, y):
        return y * y * np.array([[0.0], [0.0], [1.0], [0.0]]) - y * np.array(
            [[1.0], [0.0], [0.0], [1.0]]
        )

    y0 = np.array([[1.0], [math.nan], [1.0], [2.0]])
    recorder = Recorder()
    sol = odecore.solve(f, y0, np.array([0.0, 2.0]), batch_axis=0, throw=False, progress=recorder)
    assert sol.status.tolist() == [0, 4, 2, 0]
    assert recorder.reports[-1][0] == 2.0
    # While the others run on past t = 1, the reports move on past the failed sample.
    assert max(r[0] for r in recorder.reports) == 2.0
    assert any(1.0 < r[0] < 2.0 for r in recorder.reports)
    assert recorder.closed == 1


def decay(t, y):
    return -y


@pytest.mark.parametrize("backend", ["numpy", "numba", "torch", "jax"])
def test_a_single_output_time_reports_once_and_closes(backend):
    # The solve returns y0 with no step, so it ends at t0 with no steps: one update saying
    # so, as at the end of any solve, then the close.
    xp = {"numpy": "numpy", "numba": "numpy", "torch": "torch", "jax": "jax.numpy"}[backend]
    xp = pytest.importorskip(xp)
    if backend == "numba":
        pytest.importorskip("numba")
    y0, t = xp.asarray([1.0]), xp.asarray([0.3])
    recorder = Recorder()
    sol = odecore.solve(decay, y0, t, progress=recorder, backend=backend)
    assert int(sol.stats["naccept"]) == 0
    assert recorder.reports == [(float(t[0]), 0, 0, "")] and recorder.closed == 1


def test_a_single_output_time_reports_at_each_run_under_jit(jax_x64):
    jax, jnp = jax_x64, jax_x64.numpy
    recorder = Recorder()
    solve = jax.jit(lambda y0, t: odecore.solve(decay, y0, t, progress=recorder).ys)
    for run in (1, 2):
        jax.block_until_ready(solve(jnp.ones(1), jnp.array([0.3])))
        assert recorder.reports == [(0.3, 0, 0, "")] * run and recorder.closed == run


def test_a_single_output_time_fills_a_tqdm_bar():
    # progress=True made no bar before the solve started, and closing it raised; a bar of
    # the user's own was left without a total. The span is 0, and the bar reaches it.
    tqdm = pytest.importorskip("tqdm")
    out = io.StringIO()
    bar = tqdm.tqdm(file=out)
    sol = odecore.solve(lambda t, y: -y, np.array([1.0]), np.array([0.3]), progress=bar)
    assert bar.total == 0.0 and bar.n == 0.0
    assert "t=0.3, accepted=0, rejected=0" in out.getvalue()
    sol = odecore.solve(lambda t, y: -y, np.array([1.0]), np.array([0.3]), progress=True)
    assert sol.success and sol.stats["naccept"] == 0


def test_torch_reports_and_changes_nothing(every_step):
    torch = pytest.importorskip("torch")
    f = oscillator(torch)
    y0 = torch.tensor([1.0, 0.0], dtype=torch.float64)
    t = torch.linspace(0.0, 20.0, 5, dtype=torch.float64)
    recorder = Recorder()
    watched = odecore.solve(f, y0, t, rtol=1e-9, atol=1e-12, progress=recorder)
    plain = odecore.solve(f, y0, t, rtol=1e-9, atol=1e-12)
    assert torch.equal(watched.ys, plain.ys)
    check_reports(recorder, 0.0, 20.0, plain.stats["naccept"], plain.stats["nreject"])


def test_torch_batch_with_gradients(every_step):
    torch = pytest.importorskip("torch")
    y0 = torch.tensor([[1.0, 0.0], [0.5, 0.5]], dtype=torch.float64, requires_grad=True)
    t = torch.linspace(0.0, 3.0, 4, dtype=torch.float64)
    recorder = Recorder()
    for adjoint in ("direct", "backsolve"):
        watched = odecore.odeint(
            oscillator(torch), y0, t, batch_axis=0, adjoint=adjoint, progress=recorder
        )
        plain = odecore.odeint(oscillator(torch), y0, t, batch_axis=0, adjoint=adjoint)
        assert torch.equal(watched, plain)
        (g_watched,) = torch.autograd.grad(watched.sum(), y0)
        (g_plain,) = torch.autograd.grad(plain.sum(), y0)
        assert torch.equal(g_watched, g_plain)
        assert recorder.reports[-1][0] == 3.0 and recorder.closed >= 1


@pytest.fixture
def jax_x64():
    jax = pytest.importorskip("jax")
    with jax.enable_x64(True):
        yield jax


def test_jax_under_jit_reports_and_changes_nothing(every_step, jax_x64):
    jax, jnp = jax_x64, jax_x64.numpy
    f, y0 = oscillator(jnp), jnp.array([1.0, 0.0])
    recorder = Recorder()

    @jax.jit
    def watched(y0, t):
        return odecore.solve(f, y0, t, rtol=1e-9, atol=1e-12, progress=recorder)

    @jax.jit
    def plain(y0, t):
        return odecore.solve(f, y0, t, rtol=1e-9, atol=1e-12)

    for t1 in (20.0, -20.0):
        recorder.reports, recorder.closed = [], 0
        t = jnp.linspace(0.0, t1, 5)
        sol, ref = watched(y0, t), plain(y0, t)
        jax.block_until_ready(sol.ys)
        assert np.array_equal(np.asarray(sol.ys), np.asarray(ref.ys))
        stats = {k: int(v) for k, v in ref.stats.items()}
        check_reports(recorder, 0.0, t1, stats["naccept"], stats["nreject"])


def test_jax_eager_compiled_solve_reports_to_each_call(every_step, jax_x64):
    jnp = jax_x64.numpy
    f, y0, t = oscillator(jnp), jnp.array([1.0, 0.0]), jnp.linspace(0.0, 10.0, 3)
    plain = odecore.solve(f, y0, t)
    stats = {k: int(v) for k, v in plain.stats.items()}
    for _ in range(2):  # the second call reuses the compiled solve, with its own recorder
        recorder = Recorder()
        sol = odecore.solve(f, y0, t, progress=recorder)
        assert np.array_equal(np.asarray(sol.ys), np.asarray(plain.ys))
        check_reports(recorder, 0.0, 10.0, stats["naccept"], stats["nreject"])


class Switched:
    """A rate that jumps from 0 to 1e3 at t = 0.5 (no jump_t given): the controller rejects
    steps over the jump until they are small enough. The step callbacks record, as an
    independent witness, whether each step was accepted."""

    def __init__(self):
        self.accepted = []

    def __call__(self, t, y):
        return np.full_like(y, 1e3 if t > 0.5 else 0.0)

    def callback_accept_step(self, t0, y0, dt):
        self.accepted.append(True)

    def callback_reject_step(self, t0, y0, dt):
        self.accepted.append(False)


def test_rejecting_steps_is_reported(every_step, monkeypatch):
    monkeypatch.setattr(progress_reports, "REJECTION_RUN", 3)
    func, recorder = Switched(), Recorder()
    odecore.solve(func, np.zeros(1), np.array([0.0, 1.0]), progress=recorder)
    run, expected = 0, []
    for accepted in func.accepted:
        run = 0 if accepted else run + 1
        expected.append(run >= 3)
    notes = [r[3] for r in recorder.reports[:-1]]
    assert any(expected)
    assert [bool(n) for n in notes] == expected
    for (t, *_), note in zip(recorder.reports, notes, strict=False):
        if note:
            assert note.startswith(f"rejecting steps at t={t:.6g}: dt=")
            assert 0.0 < t <= 0.5  # stuck before the jump


@pytest.mark.parametrize("bad", ["yes", 1, object()])
def test_invalid_values_raise(bad):
    with pytest.raises(TypeError, match=r"update\(t, accepted, rejected, note\) and close\(\)"):
        odecore.solve(oscillator(np), np.array([1.0, 0.0]), np.array([0.0, 1.0]), progress=bad)


@pytest.mark.parametrize("make", ["tqdm", "Recorder"])
def test_a_class_is_refused_with_a_call_to_pass_an_instance(make):
    # A class has update and close as attributes, so the protocol check took it, and the
    # solve failed at its end calling close() unbound.
    target = pytest.importorskip("tqdm").tqdm if make == "tqdm" else Recorder
    with pytest.raises(TypeError, match=rf"class {make}, not an instance.*progress={make}\(\)"):
        odecore.solve(oscillator(np), np.array([1.0, 0.0]), np.array([0.0, 1.0]), progress=target)


def test_an_object_without_close_is_refused():
    class UpdateOnly:
        def update(self, t, accepted, rejected, note):
            pass

    with pytest.raises(TypeError, match="close"):
        odecore.odeint(oscillator(np), np.ones(2), np.array([0.0, 1.0]), progress=UpdateOnly())


def test_scipy_solver_refuses_progress():
    with pytest.raises(ValueError, match="scipy_solver"):
        odecore.solve(
            oscillator(np), np.ones(2), np.array([0.0, 1.0]), method="scipy_solver", progress=True
        )


def lorenz_in_place(t, y, dy, p):
    dy[0] = p[0] * (y[1] - y[0])
    dy[1] = y[0] * (p[1] - y[2]) - y[1]
    dy[2] = y[0] * y[1] - p[2] * y[2]


LORENZ = np.array([10.0, 28.0, 8.0 / 3.0])


def test_numba_reports_while_the_compiled_solve_runs(monkeypatch):
    # rk4 with a fixed step: the kernel publishes t after every step, so each report read
    # mid-solve must show t = accepted * dt. The reader copies the row (two vector loads)
    # while the kernel steps (~10 ns a step), so the time and the count may come from
    # neighbouring steps: one step apart, allowed two.
    pytest.importorskip("numba")
    monkeypatch.setattr(progress_reports, "REPORT_INTERVAL", 0.002)
    dt, t1 = 1e-5, 30.0
    y0, t = np.array([1.0, 0.0, 0.0]), np.linspace(0.0, t1, 4)
    kwargs = dict(
        params=LORENZ,
        backend="numba",
        method="rk4",
        options={"step_size": dt, "max_num_steps": 10**7},
    )
    recorder = Recorder()
    watched = odecore.solve(lorenz_in_place, y0, t, progress=recorder, **kwargs)
    plain = odecore.solve(lorenz_in_place, y0, t, **kwargs)
    assert np.array_equal(watched.ys, plain.ys)
    assert watched.stats == plain.stats
    times = np.array([r[0] for r in recorder.reports])
    accepted = np.array([r[1] for r in recorder.reports])
    assert np.all(np.diff(times) >= 0) and np.all(np.diff(accepted) >= 0)
    assert recorder.reports[-1] == (t1, plain.stats["naccept"], 0, "")
    assert recorder.closed == 1
    moving = (times > 0.0) & (times < t1)
    assert moving.sum() >= 3, "the reader saw no step of the running kernel"
    assert np.all(np.abs(times[moving] - accepted[moving] * dt) <= 2 * dt)


def test_numba_ensemble_reports_the_least_time_and_summed_counts(every_step):
    pytest.importorskip("numba")
    count = 16
    y0 = np.tile([1.0, 0.0, 0.0], (count, 1))
    params = np.tile(LORENZ, (count, 1))
    params[:, 1] = np.linspace(0.0, 28.0, count)
    t = np.linspace(0.0, 5.0, 6)
    # rk4 as above: each kernel compiled costs seconds, and these tests share theirs.
    kwargs = dict(params=params, backend="numba", batch_axis=0, method="rk4")
    kwargs["options"] = {"step_size": 1e-3}
    recorder = Recorder()
    watched = odecore.solve(lorenz_in_place, y0, t, progress=recorder, **kwargs)
    plain = odecore.solve(lorenz_in_place, y0, t, **kwargs)
    assert np.array_equal(watched.ys, plain.ys)
    final = recorder.reports[-1]
    assert final == (5.0, int(plain.stats["naccept"].sum()), int(plain.stats["nreject"].sum()), "")
    times = [r[0] for r in recorder.reports]
    assert times == sorted(times)
    assert recorder.closed == 1


def lorenz_batch(t, y, p):
    return np.stack(
        [
            p[:, 0] * (y[:, 1] - y[:, 0]),
            y[:, 0] * (p[:, 1] - y[:, 2]) - y[:, 1],
            y[:, 0] * y[:, 1] - p[:, 2] * y[:, 2],
        ],
        axis=1,
    )


@pytest.mark.filterwarnings("ignore:overflow:RuntimeWarning", "ignore:invalid:RuntimeWarning")
def test_numba_stopped_samples_do_not_hold_the_reported_time(every_step):
    # Sample 1 never runs (a NaN y0 with throw=False); sample 2, at sigma = 1e5, blows up in
    # a few steps of rk4. The watched kernel's reports read the least time over all rows,
    # so a finished batch read t = 0. The reference is the NumPy backend's report, which
    # counts only the samples still running.
    pytest.importorskip("numba")
    y0 = np.tile([1.0, 0.0, 0.0], (3, 1))
    y0[1, 0] = math.nan
    params = np.tile(LORENZ, (3, 1))
    params[2, 0] = 1e5
    t = np.linspace(0.0, 5.0, 6)
    kwargs = dict(params=params, batch_axis=0, method="rk4", throw=False)
    kwargs["options"] = {"step_size": 1e-3}
    recorders = {"numpy": Recorder(), "numba": Recorder()}
    numpy_sol = odecore.solve(lorenz_batch, y0, t, progress=recorders["numpy"], **kwargs)
    numba_sol = odecore.solve(
        lorenz_in_place, y0, t, backend="numba", progress=recorders["numba"], **kwargs
    )
    assert numba_sol.status.tolist() == numpy_sol.status.tolist()
    statuses = numba_sol.status.tolist()
    assert statuses[0] == 0 and statuses[1] != 0 and statuses[2] != 0
    assert recorders["numba"].reports[-1] == recorders["numpy"].reports[-1]
    assert recorders["numba"].reports[-1][:3] == (
        t[-1],
        int(numba_sol.stats["naccept"].sum()),
        int(numba_sol.stats["nreject"].sum()),
    )
    times = [r[0] for r in recorders["numba"].reports]
    assert times == sorted(times)
    assert recorders["numba"].closed == 1


def test_numba_backward_time_reports_in_the_users_direction(every_step):
    pytest.importorskip("numba")
    recorder = Recorder()
    t = np.array([0.0, -0.5])
    sol = odecore.solve(
        lorenz_in_place,
        np.ones(3),
        t,
        params=LORENZ,
        backend="numba",
        method="rk4",
        options={"step_size": 1e-3},
        progress=recorder,
    )
    assert recorder.reports[-1][:3] == (-0.5, sol.stats["naccept"], sol.stats["nreject"])
    assert all(r[0] <= 0.0 for r in recorder.reports)


def test_numba_solve_is_stopped_by_ctrl_c():
    # Ctrl-C while a watched kernel runs stops the kernel after its current step: the call
    # raises KeyboardInterrupt long before the solve could end, and later solves run. In a
    # process of its own (tests/ctrl_c_run.py), which sets Python's own SIGINT handler: a
    # suite started in the background by a shell inherits SIGINT ignored, and the simulated
    # SIGINT then never became a KeyboardInterrupt.
    pytest.importorskip("numba")
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).with_name("ctrl_c_run.py")
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stderr[-4000:]
    results = dict(item.split("=") for item in done.stdout.split())
    assert results["interrupted"] == "True"
    assert float(results["elapsed"]) < 30.0
    assert results["closed"] == "1"
    assert results["later_success"] == "True"


def test_a_watched_call_that_compiles_says_so_until_its_first_step(monkeypatch):
    # run_watched with a stand-in for the kernel: it "compiles" (publishes nothing) for a
    # while, then takes steps. Reports before the first step carry the note, later ones not.
    pytest.importorskip("numba")
    import threading

    from odecore.adapters import numba_watch

    from odecore.kernels import loop

    monkeypatch.setattr(progress_reports, "REPORT_INTERVAL", 0.001)
    watch = numba_watch.watch_rows(1, 0.0)
    compiled, stepped = threading.Event(), threading.Event()

    def call():
        compiled.wait(5.0)
        for k in range(1, 4):
            watch[0, loop.WATCH_T], watch[0, loop.WATCH_DT] = 0.25 * k, 0.25
            watch[0, loop.WATCH_ACCEPTED] = k
        stepped.wait(5.0)
        return "done"

    recorder = Recorder()
    reporting = progress_reports.Reporter(recorder)
    timer = threading.Timer(0.3, compiled.set)
    release = threading.Timer(0.4, stepped.set)
    timer.start()
    release.start()
    assert numba_watch.run_watched(call, watch, reporting, 0.0, 1.0, 1.0, True) == "done"
    timer.join()
    release.join()
    notes = {r[1]: r[3] for r in recorder.reports}
    assert notes.get(0) == numba_watch.COMPILING
    assert notes[3] == ""
    assert recorder.reports[-1] == (0.75, 3, 0, "")


def test_numba_cuda_batch_refuses_progress():
    pytest.importorskip("numba")
    from odecore.adapters import cuda_ensemble

    y0 = np.ones((2, 3))
    with pytest.raises(ValueError, match="backend='numba'"):
        odecore.solve(
            lorenz_in_place,
            y0,
            np.array([0.0, 1.0]),
            params=LORENZ,
            batch_axis=0,
            backend=cuda_ensemble.BACKEND,
            progress=Recorder(),
        )


def test_tqdm_bar_shows_the_counts():
    tqdm = pytest.importorskip("tqdm")
    out = io.StringIO()
    bar = tqdm.tqdm(file=out)
    sol = odecore.solve(oscillator(np), np.array([1.0, 0.0]), np.array([0.0, 2.0]), progress=bar)
    assert bar.total == 2.0 and bar.n == 2.0
    assert f"t=2, accepted={sol.stats['naccept']}, rejected={sol.stats['nreject']}" in (
        out.getvalue()
    )


def test_without_tqdm_a_line_goes_to_stderr(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tqdm", None)
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    sol = odecore.solve(oscillator(np), np.array([1.0, 0.0]), np.array([0.0, 2.0]), progress=True)
    err = capsys.readouterr().err
    assert err == (
        f"odecore: t=2 (100%), accepted={sol.stats['naccept']}, rejected={sol.stats['nreject']}\n"
    )


class LinearWithVjp:
    def __call__(self, t, y, params):
        return -params[0] * y

    def vjp(self, t, y, params, cotangent):
        return -params[0] * cotangent, (-np.sum(y * cotangent, keepdims=True),)


@pytest.mark.parametrize("adjoint", ["checkpoint", "backsolve"])
def test_vjp_odeint_reports_its_forward_solve(every_step, adjoint):
    func, y0, t, params = LinearWithVjp(), np.ones(2), np.linspace(0.0, 2.0, 3), (np.ones(1),)
    recorder = Recorder()
    ys, pullback = odecore.vjp_odeint(func, y0, t, params, adjoint=adjoint, progress=recorder)
    plain, plain_pullback = odecore.vjp_odeint(func, y0, t, params, adjoint=adjoint)
    assert np.array_equal(ys, plain)
    cotangent = np.ones_like(ys)
    for got, expected in zip(pullback(cotangent), plain_pullback(cotangent), strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))
    reference = odecore.solve(func, y0, t, params=params)
    check_reports(recorder, 0.0, 2.0, reference.stats["naccept"], reference.stats["nreject"])


def test_structured_state_reports(every_step, jax_x64):
    """A tuple state, on NumPy's loop and through JAX's compiled structured solve."""
    for xp in (np, jax_x64.numpy):

        def f(t, y):
            return (y[1], -y[0])

        y0, t = (xp.ones(1), xp.zeros(1)), xp.linspace(0.0, 3.0, 3)
        recorder = Recorder()
        watched = odecore.solve(f, y0, t, progress=recorder)
        plain = odecore.solve(f, y0, t)
        for part, part_plain in zip(watched.ys, plain.ys, strict=True):
            assert np.array_equal(np.asarray(part), np.asarray(part_plain))
        stats = {k: int(v) for k, v in plain.stats.items()}
        check_reports(recorder, 0.0, 3.0, stats["naccept"], stats["nreject"])
