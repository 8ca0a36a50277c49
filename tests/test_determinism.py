"""Determinism (docs/guarantees.md): exact-mode emulation does not depend on how inputs are
batched or how a backend chunks its work, and a seed fixes a training run.

Across processes and after kills, see tests/test_crash_safety.py (fault injection) and
tests/test_train.py (resume after Ctrl-C).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

import approxctl
from approxctl import functional as F
from approxctl.backends import lowrank, torch_ref
from approxctl.luts import load_lut
from approxctl.luts.factor import factors_for
from approxctl.models import ResNetTiny, TinyConv
from approxctl.pipeline import DataOptions
from approxctl.train import TrainConfig, Trainer

ARCHS: dict[str, Callable[[], nn.Module]] = {
    "tinyconv": lambda: TinyConv(1, 10, 8),
    "resnet_tiny": lambda: ResNetTiny(1, 10),
}


def _converted(arch: str, target: str, backend: str) -> tuple[nn.Module, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(8, 1, 8, 8, generator=generator)
    options = {"adc_calib": "max"} if target == "analog" else {}  # the quick calibration
    model = approxctl.convert(ARCHS[arch]().eval(), target, backend=backend, **options)
    approxctl.calibrate(model, [x])
    approxctl.set_mode(model, "exact")
    return model.eval(), x


@pytest.mark.parametrize(
    ("arch", "backend"), [("tinyconv", "auto"), ("tinyconv", "torch"), ("resnet_tiny", "auto")]
)
@pytest.mark.parametrize("target", ["sc", "am", "analog"])
def test_exact_outputs_do_not_depend_on_the_batch(target: str, arch: str, backend: str) -> None:
    """A batch of 8 gives, bit for bit, the outputs of batches of 3 + 5 and of a single image
    (every conv/linear converted: layers kept in float follow PyTorch's float determinism)."""
    model, x = _converted(arch, target, backend)
    with torch.no_grad():
        whole = model(x)
        assert torch.equal(whole, torch.cat([model(x[:3]), model(x[3:])]))
        assert torch.equal(whole[6:7], model(x[6:7]))


def _ops_inputs() -> dict[str, tuple]:
    g = torch.Generator().manual_seed(11)
    a = torch.randint(-127, 128, (9, 50), generator=g)
    b = torch.randint(-127, 128, (7, 50), generator=g)
    u = torch.randint(0, 33, (9, 50), generator=g)
    return {
        "lut": (a, b, load_lut("mul7u_09Y")),
        "lut_signed": (a.clamp(-128, 127), b, load_lut("mul8s_1KV8"), True),
        "sc": (u, torch.randint(0, 33, (7, 50), generator=g),
               torch.randint(0, 33, (7, 50), generator=g), 32),
        "analog": (a.abs().clamp(max=255) * 2, b, 9, 4, 3000),
    }  # fmt: skip


def _run_ops(backend: str) -> dict[str, torch.Tensor]:
    inputs = _ops_inputs()
    return {
        "lut": F.lut_matmul(*inputs["lut"], backend=backend),
        "lut_signed": F.lut_matmul(*inputs["lut_signed"], backend=backend),
        "sc": F.sc_matmul(*inputs["sc"], backend=backend),
        "analog": F.analog_matmul(*inputs["analog"], backend=backend),
    }


@pytest.mark.parametrize("chunk_elements", [1, 97, 5_000, 1 << 30])
def test_reference_backend_does_not_depend_on_its_chunk_size(
    monkeypatch: pytest.MonkeyPatch, chunk_elements: int
) -> None:
    expected = _run_ops("torch")
    monkeypatch.setattr(torch_ref, "CHUNK_ELEMENTS", chunk_elements)
    got = _run_ops("torch")
    for name in expected:
        assert torch.equal(got[name], expected[name]), name


@pytest.mark.parametrize(
    ("row_block", "products"),
    [(2, 7), (5, 2 * 25)],  # 7 products per K chunk (conv via im2col); 2 input channels per chunk
)
def test_low_rank_lut_path_does_not_depend_on_its_blocks(
    monkeypatch: pytest.MonkeyPatch, row_block: int, products: int
) -> None:
    """The CPU backend's exact low-rank LUT GEMM/conv: rows in blocks, K in chunks whose float32
    sums stay exact; smaller blocks and chunks must not change a bit."""
    reference = _run_ops("torch")
    model, x = _converted("tinyconv", "am", "auto")
    with torch.no_grad():
        conv_reference = model(x)
    bound = factors_for(load_lut("mul7u_09Y")).bound
    monkeypatch.setattr(lowrank, "ROW_BLOCK", row_block)
    monkeypatch.setattr(lowrank, "FLOAT32_EXACT", bound * products)
    got = _run_ops("cpu")
    for name in reference:
        assert torch.equal(got[name], reference[name]), name
    with torch.no_grad():
        assert torch.equal(model(x), conv_reference)


def _train(seed: int) -> tuple[dict[str, torch.Tensor], list[dict]]:
    torch.manual_seed(seed)
    bundle = DataOptions(spec="digits", batch_size=64, limit_train=128, limit_val=64,
                         seed=seed).load()  # fmt: skip
    model = approxctl.convert(TinyConv(1, 10, 8), "am")
    approxctl.calibrate(model, [next(iter(bundle.train))[0]])
    config = TrainConfig(pretrain=0, epochs=1, finetune=0, seed=seed)
    trainer = Trainer(model, bundle, config, device=torch.device("cpu"), out=None)
    trainer.run()
    history = [{k: v for k, v in r.items() if "seconds" not in k} for r in trainer.state.history]
    for record in history:
        record["val"] = {k: v for k, v in record["val"].items() if k != "seconds"}
    return trainer.model.state_dict(), history


def test_a_seed_fixes_the_weights_and_the_report() -> None:
    first, history = _train(0)
    again, history_again = _train(0)
    assert history == history_again
    assert first.keys() == again.keys()
    assert all(torch.equal(first[k], again[k]) for k in first)
    other, _ = _train(1)
    assert not all(torch.equal(first[k], other[k]) for k in first)
