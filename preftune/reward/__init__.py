"""Reward models: a scalar head on any backbone, its data, its losses (Bradley-Terry, Plackett-Luce), training."""
