"""Every CUDA kernel source compiles for sm_80 and sm_90 with no error and no warning.

No GPU is needed: NVRTC (the compiler CuPy uses at run time) builds cubins for any listed
architecture on a machine without a device. The compile uses the backend's own options plus
those cupy.RawModule adds, runs ptxas with warnings as errors, and fails on any line in the
compile log (NVRTC has no -Werror of its own). NVRTC comes from CuPy's bindings
(``approxctl[cuda]``, installed by ``make test``) or, without CuPy, from the cuda-bindings
package that CUDA builds of torch depend on.
"""

from __future__ import annotations

import pytest

from approxctl.backends import cuda_kernels

ARCHS = ("sm_80", "sm_90")


def _nvrtc_compile(source: str, filename: str, options: list[str]) -> tuple[bool, str, bytes]:
    """(compiled, log, cubin) from NVRTC through whichever binding is installed."""
    try:
        from cupy_backends.cuda.libs import nvrtc
    except Exception:
        nvrtc = None
    if nvrtc is not None:
        program = nvrtc.createProgram(source, filename, [], [])
        try:
            try:
                nvrtc.compileProgram(program, options)
            except nvrtc.NVRTCError:
                return False, nvrtc.getProgramLog(program), b""
            return True, nvrtc.getProgramLog(program), bytes(nvrtc.getCUBIN(program))
        finally:
            nvrtc.destroyProgram(program)
    try:
        from cuda.bindings import nvrtc as cb
    except Exception:
        pytest.skip("no NVRTC binding: install approxctl[cuda] (cupy) or a CUDA build of torch")
    err, program = cb.nvrtcCreateProgram(source.encode(), filename.encode(), 0, [], [])
    assert err == cb.nvrtcResult.NVRTC_SUCCESS, err
    try:
        encoded = [o.encode() for o in options]
        (status,) = cb.nvrtcCompileProgram(program, len(encoded), encoded)
        _, size = cb.nvrtcGetProgramLogSize(program)
        log = b" " * size
        cb.nvrtcGetProgramLog(program, log)
        if status != cb.nvrtcResult.NVRTC_SUCCESS:
            return False, log.decode(errors="replace"), b""
        _, size = cb.nvrtcGetCUBINSize(program)
        cubin = b" " * size
        cb.nvrtcGetCUBIN(program, cubin)
        return True, log.decode(errors="replace"), cubin
    finally:
        cb.nvrtcDestroyProgram(program)


def _options(arch: str) -> list[str]:
    return [
        *cuda_kernels.NVRTC_OPTIONS,
        *cuda_kernels.CUPY_ADDED_OPTIONS,
        f"-arch={arch}",
        "--ptxas-options=-Werror",
    ]


def _clean(log: str) -> str:
    return log.replace("\x00", "").strip()


def test_every_source_is_known() -> None:
    assert sorted(p.stem for p in cuda_kernels.source_files()) == sorted(cuda_kernels.KERNELS)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("module", sorted(cuda_kernels.KERNELS))
def test_kernel_compiles_without_warnings(module: str, arch: str) -> None:
    compiled, log, cubin = _nvrtc_compile(
        cuda_kernels.source(module), f"{module}.cu", _options(arch)
    )
    assert compiled, f"{module}.cu does not compile for {arch}:\n{log}"
    assert _clean(log) == "", f"{module}.cu compiles for {arch} with warnings:\n{log}"
    for kernel in cuda_kernels.KERNELS[module]:  # every entry point the backend launches
        assert kernel.encode() in cubin, f"{kernel} missing from {module}.cu's {arch} cubin"


def test_a_warning_fails_the_check() -> None:
    """The log check sees warnings: a source with an unused variable is caught."""
    source = 'extern "C" __global__ void k(int* x) { int unused; x[0] = 1; }'
    compiled, log, _ = _nvrtc_compile(source, "warn.cu", _options(ARCHS[0]))
    assert compiled and "warning" in _clean(log)
