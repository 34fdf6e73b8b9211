"""rkfac.seng: SENG against dense references from per-sample gradients (torch.func)."""
