"""The one bisection: a search's trial fitted to its target, a method's ratio for a MACs goal, and layer_entropy's
λ_min all halve an interval towards where a quantity that grows with the searched number crosses a goal."""

from __future__ import annotations

from collections.abc import Callable


def bisect(side: Callable[[float], int], low: float, high: float, steps: int) -> tuple[float, float]:
    """Halve [low, high] at most ``steps`` times towards where the quantity crosses its goal.

    ``side(x)`` compares the quantity at ``x`` with the goal: negative when it falls short (the upper half is kept),
    positive when it reaches or passes the goal (the lower half is kept), zero when it is close enough to stop.
    Returns the last interval, or ``(x, x)`` for the ``x`` that stopped it; which end to take is the caller's
    choice (the one that meets a constraint, or the one closer to the goal).
    """
    for _ in range(steps):
        middle = (low + high) / 2
        where = side(middle)
        if where == 0:
            return middle, middle
        low, high = (middle, high) if where < 0 else (low, middle)
    return low, high
