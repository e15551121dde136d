"""The DPO paper's controlled-sentiment experiment: its config, the stages that run it, and its report."""
