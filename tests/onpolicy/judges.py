"""Stand-in judges for the on-policy tests: every verdict can be recomputed by hand."""


def count_e(completion: str) -> float:
    """How many letters e a completion has."""
    return float(completion.count("e"))


def distinct(completion: str) -> float:
    """A score no two different texts share: the first 8 hex digits of the text's md5, as a number."""
    import hashlib

    return float(int(hashlib.md5(completion.encode()).hexdigest()[:8], 16))


def constant(completion: str) -> float:
    """Every text the same score: every comparison is a tie."""
    return 1.0
