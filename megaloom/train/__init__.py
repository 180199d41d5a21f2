"""Training: the step, the loop, optimizer and schedule, mixed precision, checkpoints."""
