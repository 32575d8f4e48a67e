"""Training: the Accelerate loop, checkpoints, logging, optimiser and distributed helpers."""
