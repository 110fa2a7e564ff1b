"""Solving a method's reduction knob for a GMACs target (`--target-gmacs G` with the knob `auto`).

Each function takes `build(value) -> model` and `gmacs_of(model) -> float` and returns
`(value, gmacs)` of the closest setting found; a target the method cannot reach is a
`ModelConfigError` naming the reachable range.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Sequence, Tuple

import torch
from torch import nn

from .errors import ModelConfigError

__all__ = ["search_continuous", "search_sequence", "search_merge_schedule", "rng_state", "set_rng_state"]


def rng_state():
    """The torch RNG state (CPU, and every CUDA device when there is one), for `set_rng_state`.

    A method whose GMACs depend on the input (ATS, LTMP) builds and counts every candidate from
    the state its search started from, so all candidates see the same weights and input image.
    """
    return torch.get_rng_state(), (torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)


def set_rng_state(state) -> None:
    """Rewind the torch RNG to a state `rng_state()` returned."""
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state_all(state[1])


def search_continuous(low: float, high: float, build: Callable[[float], nn.Module], target: float,
                      gmacs_of: Callable[[nn.Module], float], iterations: int = 14,
                      decimals: int = 4) -> Tuple[float, float]:
    """Bisection on a parameter whose GMACs grow with it (keep rate, compression ratio).

    Returns (value, gmacs) of the closest value found; raises ModelConfigError when `target`
    lies outside [gmacs(low), gmacs(high)].
    """
    g_low, g_high = gmacs_of(build(low)), gmacs_of(build(high))
    _check_reachable(target, g_low, g_high)
    best = min(((low, g_low), (high, g_high)), key=lambda item: abs(item[1] - target))
    for _ in range(iterations):
        mid = round((low + high) / 2, decimals)
        if mid in (low, high):
            break
        g_mid = gmacs_of(build(mid))
        if abs(g_mid - target) < abs(best[1] - target):
            best = (mid, g_mid)
        if g_mid < target:
            low = mid
        else:
            high = mid
    return best


def search_sequence(candidates: Sequence[Any], build: Callable[[Any], nn.Module], target: float,
                    gmacs_of: Callable[[nn.Module], float]) -> Tuple[Any, float]:
    """Binary search over candidates ordered from most to least reduction (GMACs increasing)."""
    if not candidates:
        raise ModelConfigError("no reduction setting to search")
    g_first, g_last = gmacs_of(build(candidates[0])), gmacs_of(build(candidates[-1]))
    _check_reachable(target, g_first, g_last)
    low, high = 0, len(candidates) - 1
    results = {low: g_first, high: g_last}
    while high - low > 1:
        mid = (low + high) // 2
        results[mid] = gmacs_of(build(candidates[mid]))
        if results[mid] < target:
            low = mid
        else:
            high = mid
    best = min((low, high), key=lambda i: abs(results[i] - target))
    return candidates[best], results[best]


def _check_reachable(target: float, g_min: float, g_max: float) -> None:
    if target > g_max * 1.0005:
        raise ModelConfigError(f"--target-gmacs {target:g} is above the unreduced model ({g_max:.3f} GMACs); "
                               f"pass a value at most {g_max:.3f}")
    if target < g_min * 0.9995:
        raise ModelConfigError(f"--target-gmacs {target:g} is below what the method reaches ({g_min:.3f} GMACs "
                               f"at its strongest setting); pass a value of at least {g_min:.3f}")


def search_merge_schedule(build: Callable[[Any], nn.Module], target: float,
                          gmacs_of: Callable[[nn.Module], float], depth: int, max_r: int) -> Tuple[Any, float]:
    """--target-gmacs for ToMe-style r: the constant r that brackets the target, then per-block
    lists between r + 1 and r: the first k blocks at r + 1 (bisection on k), then the (k + 1)-th
    extra merge moved block by block towards the end (bisection on its block: a later merge
    saves less). The closest schedule seen is returned (an int when it is constant).

    The second step matters when a block's merge is a large share of the model (few tokens,
    many blocks): one more token merged in block 0 removes it from every later block, in the
    last block from that block's MLP only, so the step between neighbours is one token in one
    block rather than one token in every remaining block.
    """
    constant = list(range(max_r, -1, -1))
    r, gmacs = search_sequence(constant, build, target, gmacs_of)
    lower = r if gmacs >= target else r - 1  # GMACs fall with r: GMACs(lower) >= target >= GMACs(lower + 1)
    if lower < 0 or lower >= max_r or depth < 1:
        return r, gmacs
    seen: Dict[Tuple[int, ...], float] = {}

    def measure(extra: Sequence[int]) -> float:
        schedule = tuple(lower + 1 if block in extra else lower for block in range(depth))
        if schedule not in seen:
            seen[schedule] = gmacs_of(build(list(schedule)))
        return seen[schedule]

    # first k blocks at r + 1: GMACs fall as k grows; find GMACs(k = lo) >= target > GMACs(k = lo + 1)
    lo, hi = 0, depth
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if measure(range(mid)) >= target:
            lo = mid
        else:
            hi = mid
    # the first lo blocks at r + 1 plus one more at block p (p = lo .. depth - 1; p = lo is k = lo + 1):
    # GMACs grow with p
    low, high = lo, depth  # high = depth stands for "no extra block" (k = lo)
    while high - low > 1:
        mid = (low + high) // 2
        if measure(list(range(lo)) + [mid]) >= target:
            high = mid
        else:
            low = mid
    if not seen:  # one block: the constant r is every schedule there is
        return r, gmacs
    schedule, best = min(seen.items(), key=lambda item: abs(item[1] - target))
    if abs(best - target) >= abs(gmacs - target):
        return r, gmacs
    if all(v == schedule[0] for v in schedule):
        return schedule[0], best
    return list(schedule), best
