"""rkfac.kfac: the K-FAC preconditioner (statistics, guards, trackers, solve, state) and its variants."""
