"""rkfac's tests, grouped by the rooms of ``src/rkfac`` (ARCHITECTURE.md).

Shared dense references live in :mod:`tests.oracles`, the multi-process gloo harness in
:mod:`tests.gloo`; the golden trajectories (:mod:`tests.golden`) stay here, beside the tests of
the top-level modules (``rkfac.KFAC`` / ``rkfac.SENG``).
"""
