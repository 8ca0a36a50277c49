"""The integer-domain functional ops of SPEC section 3, validated and dispatched to a backend.

Every approximate layer reduces to one of these GEMM-shaped ops ``(N,K) x (O,K) -> (N,O)``
(convolutions on im2col patches, K ordered (in_channel, kh, kw)). Results are identical on every
backend; ``backend="auto"`` picks the fastest one available for the tensors' device.
"""

from __future__ import annotations

import torch

from approxctl import streams
from approxctl.backends import registry
from approxctl.errors import ApproxError

__all__ = ["analog_matmul", "lut_matmul", "sc_matmul"]


def _check_int_matrix(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise ApproxError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise ApproxError(f"{name} must be an integer tensor, got {t.dtype}; quantize it first")
    if t.dim() != 2:
        raise ApproxError(f"{name} must be 2-D (rows, K), got shape {tuple(t.shape)}")


def _check_range(name: str, t: torch.Tensor, lo: int, hi: int) -> None:
    if t.numel() == 0:
        return
    t_min, t_max = int(t.min()), int(t.max())
    if t_min < lo or t_max > hi:
        raise ApproxError(f"{name} values must lie in [{lo}, {hi}], found [{t_min}, {t_max}]")


def _check_same_k(a: torch.Tensor, *others: tuple[str, torch.Tensor]) -> None:
    for name, t in others:
        if t.shape[1] != a.shape[1]:
            raise ApproxError(
                f"{name} has K = {t.shape[1]} but a has K = {a.shape[1]}; both must share K"
            )
        if t.device != a.device:
            raise ApproxError(f"{name} is on {t.device} but a is on {a.device}")


def lut_matmul(
    a: torch.Tensor,
    b: torch.Tensor,
    lut: torch.Tensor,
    signed: bool = False,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """Approximate-multiplier GEMM (SPEC 3.1), int64 (N, O).

    Unsigned table (M, M): ``out[n,o] = sum_k sign(a)sign(b) lut[|a|, |b|]`` with |a|, |b| < M
    (sign-magnitude operands). Signed table (256, 256): ``out = sum_k lut[a+128, b+128]`` with
    a, b in [-128, 127]. The row index is the activation, the column the weight.
    """
    _check_int_matrix("a", a)
    _check_int_matrix("b", b)
    _check_int_matrix("lut", lut)
    _check_same_k(a, ("b", b))
    m = lut.shape[0]
    if lut.shape != (m, m) or m not in (128, 256):
        raise ApproxError(f"lut must have shape (128, 128) or (256, 256), got {tuple(lut.shape)}")
    if signed:
        if m != 256:
            raise ApproxError("a signed table must be (256, 256), indexed [a+128, b+128]")
        _check_range("a", a, -128, 127)
        _check_range("b", b, -128, 127)
    else:
        _check_range("a", a, -(m - 1), m - 1)
        _check_range("b", b, -(m - 1), m - 1)
    return registry.get(backend, a.device).lut_matmul(a, b, lut, signed)


def sc_matmul(
    a: torch.Tensor,
    b_pos: torch.Tensor,
    b_neg: torch.Tensor,
    length: int = 32,
    *,
    phase_a: tuple[int, int] = streams.DEFAULT_PHASE_A,
    phase_b: tuple[int, int] = streams.DEFAULT_PHASE_B,
    backend: str = "auto",
) -> torch.Tensor:
    """Split-unipolar stochastic-computing GEMM (SPEC 3.2), int64 (N, O, 2).

    ``[..., 0]`` / ``[..., 1]`` count the ones of the positive / negative output stream, the OR
    over k of ``stream(a[n,k]) AND stream(b[o,k])``. All inputs are stream values in [0, L].
    ``phase_a`` / ``phase_b`` are (alpha, beta) with phase(k) = (alpha k + beta floor(k/L)) mod L.
    """
    streams.register_width(length)
    phase_a = streams.validate_phase_rule(tuple(phase_a), "activation")
    phase_b = streams.validate_phase_rule(tuple(phase_b), "weight")
    for name, t in (("a", a), ("b_pos", b_pos), ("b_neg", b_neg)):
        _check_int_matrix(name, t)
        _check_range(name, t, 0, length)
    if b_pos.shape != b_neg.shape:
        raise ApproxError(
            f"b_pos {tuple(b_pos.shape)} and b_neg {tuple(b_neg.shape)} must have the same shape"
        )
    _check_same_k(a, ("b_pos", b_pos), ("b_neg", b_neg))
    return registry.get(backend, a.device).sc_matmul(
        a, b_pos, b_neg, length, phase_a=phase_a, phase_b=phase_b
    )


def analog_matmul(
    a: torch.Tensor,
    b: torch.Tensor,
    array_size: int,
    adc_bits: int,
    adc_max: int,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """Compute-in-memory GEMM with ADC-quantized partial sums (SPEC 3.3), int64 (N, O).

    K is cut into arrays of ``array_size``; each array's positive- and negative-weight partial
    sums are converted by an ``adc_bits`` ADC of full scale ``adc_max`` (in units of one product)
    and the codes are summed. The result is in units of ``adc_max / (2^adc_bits - 1)``.
    """
    _check_int_matrix("a", a)
    _check_int_matrix("b", b)
    _check_same_k(a, ("b", b))
    _check_range("a", a, 0, 255)
    _check_range("b", b, -127, 127)
    validate_analog_params(array_size, adc_bits, adc_max)
    return registry.get(backend, a.device).analog_matmul(a, b, array_size, adc_bits, int(adc_max))


def validate_analog_params(array_size: int, adc_bits: int, adc_max: int) -> None:
    if not isinstance(array_size, int) or array_size < 1:
        raise ApproxError(f"array_size must be a positive integer, got {array_size!r}")
    if not isinstance(adc_bits, int) or not 1 <= adc_bits <= 16:
        raise ApproxError(f"adc_bits must be an integer in [1, 16], got {adc_bits!r}")
    if isinstance(adc_max, bool) or not isinstance(adc_max, int) or adc_max < 1:
        raise ApproxError(
            f"adc_max must be a positive integer (units of one product), got {adc_max!r}"
        )
