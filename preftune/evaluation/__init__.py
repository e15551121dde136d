"""Evaluation: held-out pair metrics, win rates against a baseline, and the analyses behind them."""
