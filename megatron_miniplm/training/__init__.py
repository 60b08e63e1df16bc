"""Training: the megatron-core engine (DDP, optimizer, pipeline schedules) and the trainer."""
