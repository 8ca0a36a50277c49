"""Lower bounds on inject/float for targets whose proxy splits the weights by sign.

    python benchmarks/split_floor.py [--model tinyconv] [--batch-size 128] [--iters 9]

SC's and analog's proxies (SPEC 3.2/3.3, paper section 3.1) need the positive- and the
negative-weight accumulations separately. This times a training step of the float model
against two twins with the same parameters, round-robin in one run like `approxctl profile`,
each doing the split's convolutions and nothing else (no quantization, activation or injected
error):

* "split": every conv and linear layer runs two convolutions, forward and backward: the
  cheapest step of a sign-split proxy with dense float kernels both ways.
* "second backward": the layers with at least ``MIN_REDUCTION`` products per output (those
  whose inject forward is one integer convolution over both signs, costing no more than the
  float one: ``approxctl.integer_conv``) run their float forward and then two dense backward
  passes, input and weight gradients each. Every other layer stays float: the first layer's
  fused kernel (``approxctl.fused_conv``) computes both its weight gradients faster than oneDNN
  computes one, and the few other small layers (ResNet's 1x1 shortcuts) are left out, so this
  is a lower bound. It is sc's floor as shipped: SC_act's gradients ``g e^-z+`` and
  ``-g e^-z-`` differ at every output, so each such layer needs two backward passes (analog's
  sign pair, ``approxctl.sign_pair``, needs one where its clamps do not bind). The backward
  passes are given the same output gradient: their cost does not depend on its values.

The results of record are in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from approxctl.integer_conv import MIN_REDUCTION
from approxctl.models import BUILTIN_MODELS
from approxctl.profile import paired_ratio_quartiles
from approxctl.runtime import keep_freed_memory


class SplitConv2d(nn.Conv2d):
    """conv(x, w+) - conv(x, w-): two convolutions where the float layer has one."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pos = self._conv_forward(x, self.weight.clamp(min=0), self.bias)
        return pos - self._conv_forward(x, (-self.weight).clamp(min=0), None)


class SplitLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pos = F.linear(x, self.weight.clamp(min=0), self.bias)
        return pos - F.linear(x, (-self.weight).clamp(min=0))


class _TwiceBackward(torch.autograd.Function):
    """conv2d forward; backward: two ``convolution_backward`` passes, summed."""

    @staticmethod
    def forward(ctx, x, weight, bias, args):  # type: ignore[no-untyped-def]
        ctx.save_for_backward(x, weight)
        ctx.args = args
        return F.conv2d(x, weight, bias, *args)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[no-untyped-def]
        x, weight = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.args
        mask = list(ctx.needs_input_grad[:3])
        grad = grad.contiguous()

        def one_pass() -> tuple[torch.Tensor | None, ...]:
            return torch.ops.aten.convolution_backward(
                grad, x, weight, [weight.shape[0]], stride, padding, dilation, False, [0, 0],
                groups, mask,
            )  # fmt: skip

        first, second = one_pass(), one_pass()
        summed = [None if a is None else a + b for a, b in zip(first, second, strict=True)]
        return summed[0], summed[1], summed[2] if mask[2] else None, None


class SecondBackwardConv2d(nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        args = (self.stride, self.padding, self.dilation, self.groups)
        return _TwiceBackward.apply(x, self.weight, self.bias, args)


def split(model: nn.Module) -> nn.Module:
    """The model with every Conv2d/Linear replaced by its split twin (same parameters)."""
    for module in model.modules():
        twin = {nn.Conv2d: SplitConv2d, nn.Linear: SplitLinear}.get(type(module))
        if twin is not None:
            module.__class__ = twin  # same parameters and buffers, another forward
    return model


def second_backward(model: nn.Module) -> nn.Module:
    """The model whose convolutions with at least MIN_REDUCTION products per output run a
    second backward pass (same parameters)."""
    for module in model.modules():
        if (
            type(module) is nn.Conv2d and module.padding_mode == "zeros"
            and module.weight[0].numel() >= MIN_REDUCTION
        ):  # fmt: skip
            module.__class__ = SecondBackwardConv2d
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tinyconv")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--iters", type=int, default=9)
    args = parser.parse_args()
    keep_freed_memory()  # as the command line does
    torch.manual_seed(0)
    x = torch.randn(args.batch_size, 1, 32, 32)
    y = torch.randint(0, 10, (args.batch_size,))
    models = {
        "float": BUILTIN_MODELS[args.model](in_channels=1, num_classes=10, image_size=32),
        "split": split(BUILTIN_MODELS[args.model](in_channels=1, num_classes=10, image_size=32)),
        "second backward": second_backward(
            BUILTIN_MODELS[args.model](in_channels=1, num_classes=10, image_size=32)
        ),
    }
    optimizers = {k: torch.optim.SGD(m.parameters(), lr=1e-4) for k, m in models.items()}

    def step(kind: str) -> float:
        start = time.perf_counter()
        optimizers[kind].zero_grad(set_to_none=True)
        F.cross_entropy(models[kind](x), y).backward()
        optimizers[kind].step()
        return time.perf_counter() - start

    times: dict[str, list[float]] = {k: [] for k in models}
    for round_ in range(args.iters + 2):
        for kind in models:
            seconds = step(kind)
            if round_ >= 2:
                times[kind].append(seconds)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{args.model}, batch {args.batch_size}, 1x32x32, {torch.get_num_threads()} threads")
    for kind in ("split", "second backward"):
        q1, q3 = paired_ratio_quartiles(times[kind], times["float"])
        ratio = med[kind] / med["float"]
        print(f"{kind}: step {med[kind]:.4f} s against float's {med['float']:.4f} s, "
              f"{kind}/float {ratio:.2f} (per-round ratios {q1:.2f}-{q3:.2f})")  # fmt: skip


if __name__ == "__main__":
    main()
