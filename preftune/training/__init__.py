"""Training: the loop, one step, log-probs, the reference (and its sync), schedule, checkpoints, metrics, export."""
