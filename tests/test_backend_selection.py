"""Backend choice: "auto" per device, the APPROXCTL_BACKEND override, explicit names."""

from __future__ import annotations

import pytest
import torch

from approxctl.backends import cpu, registry, torch_ref
from approxctl.errors import ApproxError

CPU = torch.device("cpu")


def test_auto_on_cpu_is_the_fast_cpu_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(registry.ENV_VAR, raising=False)
    assert registry.get("auto", CPU) is cpu
    assert "cupy" in registry.names()


def test_environment_forces_a_backend_where_it_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(registry.ENV_VAR, "torch")
    assert registry.get("auto", CPU) is torch_ref
    assert registry.get("cpu", CPU) is cpu  # an explicit name beats the environment
    monkeypatch.setenv(registry.ENV_VAR, "cupy")  # CUDA only: CPU tensors keep "auto"
    assert registry.get("auto", CPU) is cpu
    monkeypatch.setenv(registry.ENV_VAR, "fastest")
    with pytest.raises(ApproxError, match="APPROXCTL_BACKEND"):
        registry.get("auto", CPU)


def test_cupy_does_not_run_on_cpu() -> None:
    with pytest.raises(ApproxError, match="does not run on"):
        registry.get("cupy", CPU)
