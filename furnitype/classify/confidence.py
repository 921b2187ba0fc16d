"""How far an accuracy measured on n test photos can be trusted: the Wilson score interval."""

from __future__ import annotations

import math

#: The normal quantile of a two-sided 95 % interval.
Z95 = 1.959963984540054


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a share ``successes / n`` (95 % by default): ``(low, high)`` in [0, 1].

    Unlike the normal approximation it stays inside [0, 1] and is not empty at 0 or n successes; on 56 test
    photos an accuracy of 0.911 (51 right) is (0.807, 0.961).
    """
    if n <= 0 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n and n >= 1. Received: successes={successes}, n={n}")
    share = successes / n
    denominator = 1 + z * z / n
    centre = (share + z * z / (2 * n)) / denominator
    half = z * math.sqrt(share * (1 - share) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)
