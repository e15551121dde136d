"""Stand-in judges for the on-policy tests: every verdict can be recomputed by hand."""


def count_e(completion: str) -> float:
    """How many letters e a completion has."""
    return float(completion.count("e"))
