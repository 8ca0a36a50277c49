"""Stochastic-computing stream definition of SPEC section 3.2: LFSR cycles and phase rules.

A stream of value q (0 <= q <= L) at reduction index k has bit t equal to
``C[(t + phase(k)) mod L] < q``; C is a permutation of 0..L-1 built from an LFSR, so the stream
holds exactly q ones. Every backend builds its streams from the threshold tables made here.
"""

from __future__ import annotations

import functools

import torch

from approxctl.errors import ApproxError

# Maximal-length feedback masks (A for activations, B for weights) per register width n.
LFSR_MASKS: dict[int, tuple[int, int]] = {
    4: (0b1100, 0b1001),
    5: (0b10100, 0b10010),
    6: (0b110000, 0b100001),
    7: (0b1100000, 0b1000001),
    8: (0b10111000, 0b10001110),
}
STREAM_LENGTHS = tuple(1 << n for n in LFSR_MASKS)

# (alpha, beta): phase(k) = (alpha * k + beta * floor(k / L)) mod L.
DEFAULT_PHASE_A = (1, 0)
DEFAULT_PHASE_B = (3, 1)


def register_width(length: int) -> int:
    """n with L = 2^n, for a supported stream length."""
    if length not in STREAM_LENGTHS:
        raise ApproxError(
            f"stream length {length} is not supported; use one of "
            f"{', '.join(map(str, STREAM_LENGTHS))}"
        )
    return length.bit_length() - 1


def lfsr_cycle(n: int, mask: int) -> list[int]:
    """``[0, s_0, ..., s_{L-2}]``: 0 then the 2^n - 1 states of a Fibonacci LFSR from state 1."""
    full = (1 << n) - 1
    states = [0]
    s = 1
    for _ in range(full):
        states.append(s)
        s = ((s << 1) & full) | ((s & mask).bit_count() & 1)
    return states


@functools.cache
def _cycles(length: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    n = register_width(length)
    mask_a, mask_b = LFSR_MASKS[n]
    return tuple(lfsr_cycle(n, mask_a)), tuple(lfsr_cycle(n, mask_b))


def cycle(length: int, which: str) -> torch.Tensor:
    """The permutation C_A (``which='a'``) or C_B (``'b'``) as an int64 tensor of shape (L,)."""
    ca, cb = _cycles(length)
    return torch.tensor(ca if which == "a" else cb, dtype=torch.int64)


def phases(
    k: int, length: int, rule: tuple[int, int], device: torch.device | None = None
) -> torch.Tensor:
    """phase(k) for k = 0..K-1 under the rule (alpha, beta), as int64 (K,)."""
    alpha, beta = rule
    idx = torch.arange(k, dtype=torch.int64, device=device)
    return (alpha * idx + beta * (idx // length)) % length


def thresholds(
    k: int, length: int, which: str, rule: tuple[int, int], device: torch.device | None = None
) -> torch.Tensor:
    """T[t, k] = C[(t + phase(k)) mod L], int64 (L, K); stream bit t of k is ``T[t, k] < q``."""
    c = cycle(length, which).to(device)
    t = torch.arange(length, dtype=torch.int64, device=device)
    return c[(t[:, None] + phases(k, length, rule, device)[None, :]) % length]


def validate_phase_rule(rule: tuple[int, int], what: str) -> tuple[int, int]:
    if len(rule) != 2 or not all(isinstance(v, int) and v >= 0 for v in rule):
        raise ApproxError(
            f"{what} phase rule must be two non-negative integers (alpha, beta) for "
            f"phase(k) = (alpha*k + beta*floor(k/L)) mod L, got {rule!r}"
        )
    return (int(rule[0]), int(rule[1]))
