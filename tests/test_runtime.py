"""Process settings the command line applies (approxctl/runtime.py)."""

from __future__ import annotations

import sys

import pytest

from approxctl import runtime


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_keep_freed_memory_takes_effect_on_glibc() -> None:
    assert runtime.keep_freed_memory() is True


def test_keep_freed_memory_can_be_turned_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(runtime.ENV_OPT_OUT, "0")
    assert runtime.keep_freed_memory() is False
