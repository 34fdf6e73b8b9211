"""rkfac.experiments: CLI, run config schema, datasets, models, transforms, metrics, spectrum command."""
