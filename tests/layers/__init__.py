"""rkfac.layers: every LayerKind against explicit row, column and gradient-matrix computations."""
