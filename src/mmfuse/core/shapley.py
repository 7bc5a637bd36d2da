"""Exact Shapley values of a small cooperative game: how much each modality adds, averaged over the
orders in which modalities could join. Pure arithmetic, so that training (its end-of-run note),
analysis and serving share one definition."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence


def shapley_values(players: Sequence[str], value: Callable[[frozenset[str]], float]) -> dict[str, float]:
    """Exact Shapley values of the cooperative game ``value`` (called once per subset of ``players``).

    phi_i = sum over S not containing i of |S|! (n - |S| - 1)! / n! * (v(S + i) - v(S)).
    """
    names = sorted(set(players))
    n = len(names)
    cache = {frozenset(c): float(value(frozenset(c)))
             for k in range(n + 1) for c in itertools.combinations(names, k)}
    result = {}
    for player in names:
        others = [p for p in names if p != player]
        total = 0.0
        for k in range(n):
            weight = math.factorial(k) * math.factorial(n - k - 1) / math.factorial(n)
            for coalition in itertools.combinations(others, k):
                s = frozenset(coalition)
                total += weight * (cache[s | {player}] - cache[s])
        result[player] = total
    return result
