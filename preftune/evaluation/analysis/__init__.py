"""Evaluation arithmetic, one concept per file: win rates with bootstrap intervals, sequence KL from samples,
response lengths, rank correlation, and the SimPO likelihood–length analysis of held-out pairs."""
