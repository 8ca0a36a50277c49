"""The lower bound on inject/float for targets whose proxy splits the weights by sign.

    python benchmarks/split_floor.py [--model tinyconv] [--batch-size 128] [--iters 9]

SC's and analog's proxies (SPEC 3.2/3.3, paper section 3.1) need the positive- and the
negative-weight accumulations separately, so every converted conv runs as two convolutions,
forward and backward. This times a training step of the float model against the same model
whose convs and linear layers do exactly that and nothing else (no quantization, activation or
injected error): the cheapest step any sign-split proxy can have with dense conv kernels and
two backward passes per layer (analog's sign pair, ``approxctl.sign_pair``, needs one where its
clamps do not bind; sc's gradients always need two).
Both are timed round-robin in one run, like `approxctl profile`; the result of record is in
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from approxctl.models import BUILTIN_MODELS
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


def split(model: nn.Module) -> nn.Module:
    """The model with every Conv2d/Linear replaced by its split twin (same parameters)."""
    for module in model.modules():
        twin = {nn.Conv2d: SplitConv2d, nn.Linear: SplitLinear}.get(type(module))
        if twin is not None:
            module.__class__ = twin  # same parameters and buffers, another forward
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
    print(f"float step {med['float']:.4f} s, split step {med['split']:.4f} s, "
          f"split/float {med['split'] / med['float']:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
