"""The conformance suite: one catalogue of cases (``cases.py``), run once per backend.

``python -m pytest conformance -m "not slow" -q`` runs the CI subset (every backend x method
family x gradient mode x option still has a cell); ``-m slow`` or no marker the whole matrix
(nox's ``conformance`` session). At the end of the run, per test module, one table has a row
per variant and backend and a column per check, and a second one gives the worst measured
disagreement of every backend, method family, dtype and mode with the reference and with the
other backends. ``ODECORE_CONFORMANCE_BACKENDS`` and ``ODECORE_REQUIRED_BACKENDS`` choose the
backends (see ``test_conformance.py``).
"""
