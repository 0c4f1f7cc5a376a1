"""The conformance suite: one catalogue of cases (``cases.py``), run once per backend.

Run it with ``python -m pytest conformance -q``; the table at the end of the run has one row
per case and backend and one column per check.
"""
