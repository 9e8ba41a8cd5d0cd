"""The shared engine: loaders, training step, evaluation, metrics, checkpoints, result writers, plots, distributed helpers."""
