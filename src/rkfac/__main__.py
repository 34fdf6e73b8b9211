"""``python -m rkfac`` runs the ``rkfac`` command (also under ``torchrun``)."""

from rkfac.experiments.cli import main

raise SystemExit(main())
