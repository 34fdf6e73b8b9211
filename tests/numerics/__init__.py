"""The math without state: decompositions, the damped low-rank solve, Brand updates, spectra.

(Not ``tests/math``: ``python tests/golden.py`` puts ``tests/`` first on ``sys.path``, where a
``math`` package would shadow the standard library.)
"""
