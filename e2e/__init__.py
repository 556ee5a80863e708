"""End-to-end tests on a kind cluster (``e2e/run.sh``); see e2e/README.md.

A package so its test modules share ``e2e.cluster`` and ``e2e.inference``
under unambiguous names (``tests/`` has its own ``support`` package).
"""
