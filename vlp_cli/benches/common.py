"""What every benchmark shares: interleaved arms, ratios of their medians, worst-part results.

Absolute timings on shared machines drift by 3x from minute to minute; a ratio of two arms run
alternately, repetition by repetition, does not. Each benchmark reports the median of the
per-repetition ratios after one warm-up repetition, with its target.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable


def interleave(arms: dict[str, Callable[[], float]], reps: int) -> dict[str, list[float]]:
    """Run each arm once per repetition, in alternating order; each returns a rate (items/s)."""
    rates: dict[str, list[float]] = {k: [] for k in arms}
    names = list(arms)
    for rep in range(reps + 1):  # repetition 0 is the warm-up
        for name in (names if rep % 2 == 0 else names[::-1]):
            rate = arms[name]()
            if rep > 0:
                rates[name].append(rate)
    return rates


def spread(values: list[float]) -> list[float]:
    """(min, median, max) of per-repetition values: how far one repetition can stray."""
    if not values:
        return []
    return [round(min(values), 3), round(statistics.median(values), 3), round(max(values), 3)]


def ratio_summary(rates: dict[str, list[float]], num: str, den: str, target: float) -> dict:
    ratios = [a / b for a, b in zip(rates[num], rates[den])]
    med = statistics.median(ratios)
    return {"ratio": round(med, 3), "target": target, "met": med >= target,
            "ratios": [round(r, 3) for r in ratios], "spread": spread(ratios),
            f"{num}_per_s": round(statistics.median(rates[num]), 2),
            f"{den}_per_s": round(statistics.median(rates[den]), 2)}


def combine(parts: dict[str, dict], target: float, direction: str = ">=") -> dict:
    """One result from several: the worst part's ratio and per-rep ratios, met if all met."""
    pick = min if direction == ">=" else max
    worst = pick(parts, key=lambda name: parts[name]["ratio"])
    return {"ratio": parts[worst]["ratio"], "target": target, "direction": direction,
            "met": all(p["met"] for p in parts.values()), "ratios": parts[worst]["ratios"],
            "spread": spread(parts[worst]["ratios"]), "worst": worst, "parts": parts}


def value_summary(values: list[float], target: float, direction: str, unit: str) -> dict:
    """A result that is a measured value (a rate, a fraction) against a target, not a ratio of
    two arms: the median over repetitions, with their spread."""
    med = statistics.median(values)
    return {"ratio": round(med, 4), "unit": unit, "target": target, "direction": direction,
            "met": med >= target if direction == ">=" else med <= target,
            "ratios": [round(v, 4) for v in values], "spread": spread(values)}
