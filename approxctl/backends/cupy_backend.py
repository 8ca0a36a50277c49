"""The CUDA backend: the kernels of ``approxctl/kernels/*.cu`` run with CuPy (SPEC section 7).

Chosen automatically for CUDA tensors when CuPy imports (``pip install 'approxctl[cuda]'``);
``--backend torch`` / ``APPROXCTL_BACKEND=torch`` force the reference instead. Each source file
is compiled once per process by NVRTC (``cupy.RawModule``, which also keeps CuPy's on-disk kernel
cache) and its kernels are looked up per device. Torch tensors are handed to the kernels
zero-copy through DLPack, and every launch goes to torch's current stream on the tensors'
device, so it is ordered with the surrounding torch work without extra synchronization.

The host-side planning (element types, tables, grids) lives in :mod:`cuda_kernels`; results are
bit-identical to :mod:`torch_ref`. Inputs are assumed valid (``approxctl.functional`` validates).
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from approxctl import streams
from approxctl.backends import cuda_kernels, torch_ref
from approxctl.errors import ApproxError

try:  # any failure to import (missing package, broken CUDA libraries) means "not installed"
    import cupy
except Exception as exc:  # pragma: no cover - depends on the machine
    raise ImportError(f"cupy is not usable: {exc}") from exc


@functools.cache
def _module(name: str) -> Any:
    """The RawModule of ``kernels/<name>.cu`` (NVRTC compiles it lazily, once per device)."""
    return cupy.RawModule(code=cuda_kernels.source(name), options=cuda_kernels.NVRTC_OPTIONS)


@functools.cache
def _kernel(module: str, name: str, device_index: int) -> Any:
    with cupy.cuda.Device(device_index):
        try:
            return _module(module).get_function(name)
        except cupy.cuda.compiler.CompileException as exc:
            raise ApproxError(
                f"compiling approxctl/kernels/{module}.cu failed: {exc}; "
                "set APPROXCTL_BACKEND=torch to use the reference backend"
            ) from exc


@functools.cache
def _dynamic_shared_limit(device_index: int) -> int:
    """Dynamic shared memory a block of the lut kernels may use on this device."""
    runtime = cupy.cuda.runtime
    attribute = runtime.cudaDevAttrMaxSharedMemoryPerBlockOptin
    optin = runtime.deviceGetAttribute(attribute, device_index)
    kernel = _kernel("lut_matmul", "lut_matmul_i16_unsigned_shared", device_index)
    with cupy.cuda.Device(device_index):
        static = kernel.shared_size_bytes  # the same for every lut entry point
    return int(optin) - int(static)


def tensor_device_index(t: torch.Tensor) -> int:
    return t.device.index if t.device.index is not None else torch.cuda.current_device()


def _as_cupy(t: torch.Tensor) -> Any:
    return cupy.from_dlpack(t)  # zero-copy view of the same device memory


# Dynamic shared memory each kernel has been allowed so far, per device.
_allowed_shared: dict[tuple[str, int], int] = {}


class _StreamHandle:
    """A raw cudaStream_t behind the CUDA stream protocol (``__cuda_stream__``)."""

    def __init__(self, handle: int) -> None:
        self.handle = handle

    def __cuda_stream__(self) -> tuple[int, int]:
        return (0, self.handle)


@functools.lru_cache(maxsize=64)
def _cupy_stream(handle: int, device_index: int) -> Any:
    """CuPy's view of the torch stream ``handle``: Stream.from_external where CuPy has it
    (ExternalStream is deprecated since CuPy 14), else ExternalStream."""
    from_external = getattr(cupy.cuda.Stream, "from_external", None)
    if from_external is not None:
        try:
            with cupy.cuda.Device(device_index):
                return from_external(_StreamHandle(handle))
        except (TypeError, ValueError):
            pass
    return cupy.cuda.ExternalStream(handle, device_index)


def run(launch: cuda_kernels.Launch, device_index: int) -> None:
    """Launch on ``device_index`` in torch's current stream."""
    kernel = _kernel(launch.module, launch.kernel, device_index)
    stream = torch.cuda.current_stream(device_index)
    with cupy.cuda.Device(device_index), _cupy_stream(stream.cuda_stream, device_index):
        if launch.shared_mem > _allowed_shared.get((launch.kernel, device_index), 0):
            # Static plus dynamic shared memory beyond 48 KiB needs the kernel's opt-in
            # (the lut kernels hold 16 KiB of static tiles besides the table).
            kernel.max_dynamic_shared_size_bytes = launch.shared_mem
            _allowed_shared[(launch.kernel, device_index)] = launch.shared_mem
        args = tuple(_as_cupy(x) if isinstance(x, torch.Tensor) else x for x in launch.args)
        kernel(launch.grid, launch.block, args, shared_mem=launch.shared_mem)


def _trivial(n: int, o: int, k: int) -> bool:
    """Empty operands (nothing to launch) or sizes past the kernels' 32-bit indexing: the
    reference computes these."""
    return n == 0 or o == 0 or k == 0 or not cuda_kernels.fits_kernels(n, o, k)


def lut_matmul(
    a: torch.Tensor, b: torch.Tensor, lut: torch.Tensor, signed: bool = False
) -> torch.Tensor:
    n, k = a.shape
    o = b.shape[0]
    if _trivial(n, o, k):
        return torch_ref.lut_matmul(a, b, lut, signed)
    index = tensor_device_index(a)
    launch, out = cuda_kernels.plan_lut_matmul(
        a, b, lut, signed, dynamic_shared_limit=_dynamic_shared_limit(index)
    )
    run(launch, index)
    return out


def sc_matmul(
    a: torch.Tensor,
    b_pos: torch.Tensor,
    b_neg: torch.Tensor,
    length: int = 32,
    *,
    phase_a: tuple[int, int] = streams.DEFAULT_PHASE_A,
    phase_b: tuple[int, int] = streams.DEFAULT_PHASE_B,
) -> torch.Tensor:
    n, k = a.shape
    o = b_pos.shape[0]
    if _trivial(n, o, k):
        return torch_ref.sc_matmul(a, b_pos, b_neg, length, phase_a=phase_a, phase_b=phase_b)
    launch, out = cuda_kernels.plan_sc_matmul(a, b_pos, b_neg, length, phase_a, phase_b)
    run(launch, tensor_device_index(a))
    return out


def analog_matmul(
    a: torch.Tensor, b: torch.Tensor, array_size: int, adc_bits: int, adc_max: int
) -> torch.Tensor:
    n, k = a.shape
    o = b.shape[0]
    if _trivial(n, o, k) or adc_max >= cuda_kernels.ANALOG_ADC_MAX_LIMIT:
        return torch_ref.analog_matmul(a, b, array_size, adc_bits, adc_max)
    launch, out = cuda_kernels.plan_analog_matmul(a, b, array_size, adc_bits, adc_max)
    run(launch, tensor_device_index(a))
    return out


__all__ = ["analog_matmul", "lut_matmul", "run", "sc_matmul"]
