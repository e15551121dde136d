"""Experiment drivers built on the library: the demo and the DPO paper's controlled-sentiment frontier."""
