"""The sample's network in PyTorch, and a factory that loads the shipped ONNX weights into it.

`egp-onnx compress ... --torch-model sample_models/digits_torch.py:factory --train
sample_models/digits_train.npz` finetunes the sample between pruning steps.
"""

from __future__ import annotations

from pathlib import Path

import onnx
import torch
from torch import nn

HERE = Path(__file__).resolve().parent


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return torch.relu(y + (x if self.down is None else self.down(x)))


class DigitsResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.block1 = Block(16, 16, 1)
        self.block2 = Block(16, 32, 2)
        self.block3 = Block(32, 32, 1)
        self.fc1 = nn.Linear(32, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block3(self.block2(self.block1(self.stem(x))))
        x = x.mean(dim=(2, 3))
        return self.fc2(torch.relu(self.fc1(x)))


def factory() -> DigitsResNet:
    """DigitsResNet holding the weights of sample_models/digits_resnet.onnx."""
    from egp_onnx.integrations.torch import load_onnx_weights, map_initializers

    torch.manual_seed(0)
    module = DigitsResNet()
    model = onnx.load(str(HERE / "digits_resnet.onnx"))
    load_onnx_weights(module, model, map_initializers(module, model))
    return module.eval()
