"""Experiment code: datasets, models, presets, training runs, the ``rkfac`` command.

Kept apart from the library core (``rkfac.*`` outside this package), which never imports it.
"""
