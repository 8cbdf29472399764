"""Training engine: the Accelerate trainer, checkpoints, losses, schedules."""
