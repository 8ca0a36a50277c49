"""Built-in models of SPEC section 6; both take channel count and image size from the data."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn


class TinyConv(nn.Module):
    """The CMSIS-NN CIFAR-10 CNN (Lai et al. 2018), the paper's TinyConv.

    conv 5x5x32, pool, conv 5x5x32, pool, conv 5x5x64, pool, linear -> classes. Each conv is
    followed by BatchNorm and ReLU; pools are 2x2 max pools, so a 32x32 input ends at 4x4x64.
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 10, image_size: int = 32) -> None:
        super().__init__()
        if image_size % 8:
            raise ValueError(f"TinyConv needs an image size divisible by 8, got {image_size}")

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 5, padding=2, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            )

        self.features = nn.Sequential(block(in_channels, 32), block(32, 32), block(32, 64))
        self.classifier = nn.Linear(64 * (image_size // 8) ** 2, num_classes)

    def forward(self, x):  # type: ignore[no-untyped-def]
        return self.classifier(self.features(x).flatten(1))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x):  # type: ignore[no-untyped-def]
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNetTiny(nn.Module):
    """The MLPerf Tiny image-classification ResNet (ResNet-8: 16/32/64 channels)."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10, image_size: int = 32) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, 16, 3, padding=1, bias=False),
            nn.BatchNorm2d(16),
            nn.ReLU(inplace=True),
        )
        self.layer1 = BasicBlock(16, 16, 1)
        self.layer2 = BasicBlock(16, 32, 2)
        self.layer3 = BasicBlock(32, 64, 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x):  # type: ignore[no-untyped-def]
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(self.pool(x).flatten(1))


BUILTIN_MODELS: dict[str, Callable[..., nn.Module]] = {
    "tinyconv": TinyConv,
    "resnet_tiny": ResNetTiny,
}
