"""Interleaved timing: the one helper every CPU benchmark that prints a ratio uses (issue 33, item 2).

On a shared machine the load changes over seconds, so timing option A in one block and option B in the next
measures the neighbours as much as the options (single cells moved by up to 30% between such runs). Here the
options alternate within each repeat: warm-up ``A B C`` (``warmup`` rounds, not recorded), then ``A B C A B C ...``
(``repeats`` rounds; with ``rotate`` each round starts one option later: ``A B C, B C A, C A B``, so no option always
follows the same one). Each cell (option) gets its median, min, max and spread ((max - min) / median) over the
rounds; :func:`paired_ratio` compares two options round by round (both ran within the same seconds).

    from bench.interleave import interleave, paired_ratio
    res = interleave({"ort": lambda: ort(x), "ov": lambda: ov(x)}, repeats=5)
    res["cells"]["ort"]["median"], paired_ratio(res, "ort", "ov")["median"]   # seconds; speed-up of ov over ort
"""

from __future__ import annotations

import statistics
import time
from typing import Callable, Mapping, Sequence

from glad_runtime.errors import UsageError

__all__ = ["interleave", "cell_stats", "paired_ratio", "round_order", "format_cell"]


def round_order(names: Sequence[str], round_index: int, rotate: bool = False) -> list[str]:
    """The options' order in round ``round_index`` (0-based): as given, or rotated left by ``round_index``."""
    names = list(names)
    if not rotate or not names:
        return names
    k = round_index % len(names)
    return names[k:] + names[:k]


def cell_stats(values: Sequence[float]) -> dict:
    """``{"median", "min", "max", "spread", "n", "values"}`` of one cell; ``spread`` = (max - min) / median (0 for a
    single value; inf for a zero median with a nonzero range).

    Raises:
        UsageError: no values.
    """
    v = [float(x) for x in values]
    if not v:
        raise UsageError("cell_stats needs at least one value")
    med, lo, hi = statistics.median(v), min(v), max(v)
    spread = (hi - lo) / med if med else (0.0 if hi == lo else float("inf"))
    return {"median": med, "min": lo, "max": hi, "spread": spread, "n": len(v), "values": v}


def interleave(options: Mapping[str, Callable[[], object]], repeats: int, *, warmup: int = 1, rotate: bool = False,
               clock: Callable[[], float] = time.perf_counter, between: Callable[[str], None] | None = None,
               warmups: Mapping[str, Callable[[], object]] | None = None) -> dict:
    """Time each option once per round, the options alternating within each round.

    Args:
        options: ``{name: fn}``; ``fn()`` is one timed call (its return value is kept, the last one per option).
        repeats: recorded rounds (>= 1).
        warmup: unrecorded rounds first (first-call allocations, OpenVINO's shape specialisation, caches).
        rotate: start each round one option later (see the module docstring).
        clock: seconds (tests pass a fake one).
        between: called with the next option's name before each call, warm-up included (e.g. a clock probe, or
            starting the load an option needs); not timed.
        warmups: ``{name: fn}`` run in the warm-up rounds instead of the option itself (e.g. one small call
            instead of a whole pass); options not named warm up with their own ``fn``.
    Returns:
        ``{"order": [names in the order they were timed, warm-up excluded], "repeats", "warmup", "rotate",
        "cells": {name: cell_stats of its seconds}, "last": {name: last return value}}``.
    Raises:
        UsageError: no options or ``repeats < 1``.
    """
    names = list(options)
    if not names:
        raise UsageError("interleave needs at least one option")
    if repeats < 1:
        raise UsageError(f"repeats must be >= 1, got {repeats}")
    last: dict = {}
    for w in range(max(0, int(warmup))):
        for name in round_order(names, w, rotate):
            fn = (warmups or {}).get(name, options[name])
            if between is not None:
                between(name)
            last[name] = fn()
    times: dict[str, list[float]] = {n: [] for n in names}
    order: list[str] = []
    for r in range(repeats):
        for name in round_order(names, r, rotate):
            if between is not None:
                between(name)
            t = clock()
            last[name] = options[name]()
            times[name].append(clock() - t)
            order.append(name)
    return {"order": order, "repeats": repeats, "warmup": warmup, "rotate": rotate,
            "cells": {n: cell_stats(times[n]) for n in names}, "last": last}


def paired_ratio(result: dict, base: str, other: str) -> dict:
    """Speed-up of ``other`` over ``base`` (base seconds / other seconds), round by round: ``cell_stats`` of the
    per-round ratios, plus ``"of_medians"`` (median base / median other)."""
    b, o = result["cells"][base]["values"], result["cells"][other]["values"]
    ratios = [x / y if y else float("inf") for x, y in zip(b, o)]
    out = cell_stats(ratios)
    out["of_medians"] = result["cells"][base]["median"] / result["cells"][other]["median"]
    return out


def format_cell(stats: dict, scale: float = 1.0, digits: int = 1) -> str:
    """``"median (min-max)"`` of a cell times ``scale`` (e.g. 1e3 for ms), for tables."""
    f = f"{{:.{digits}f}}"
    return f"{f.format(stats['median'] * scale)} ({f.format(stats['min'] * scale)}-{f.format(stats['max'] * scale)})"
