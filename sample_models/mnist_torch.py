"""The MNIST sample's network in PyTorch, and factories that load the shipped ONNX weights into it.

`egp-onnx compress sample_models/mnist_resnet.onnx ... --torch-model
sample_models/mnist_torch.py:factory --train sample_models/mnist_train.npz` finetunes the sample
between pruning steps (`python sample_models/build_mnist_resnet.py --data-only --write-train`
writes mnist_train.npz, which is too large to ship). The Fashion-MNIST samples are the same
network (sample_models/build_fashion_resnet.py): `fashion_factory` for fashion_resnet.onnx,
`fashion_wide_factory` for fashion_wide_resnet.onnx (widths 32/64/128, hidden 128); their
finetune data: `benchmarks/finetune_split.py --dataset fashion`.

    image (N,1,28,28), normalised as (x/255 - 0.1307)/0.3081
      stem:   Conv3x3(1->16) BN Relu                                    28x28
      stage1: Block(16->16, stride 2, Conv1x1/2 shortcut) Block(16->16)  14x14
      stage2: Block(16->32, stride 2, Conv1x1/2 shortcut) Block(32->32)   7x7
      stage3: Block(32->64, stride 2, Conv1x1/2 shortcut) Block(64->64)   4x4
      GlobalAveragePool Flatten Gemm(64->64) Relu Gemm(64->10) -> logits

    Block: Conv3x3 BN Relu Conv3x3 BN (+ shortcut) Relu
"""

from __future__ import annotations

from pathlib import Path

import onnx
import torch
from digits_torch import Block  # the same basic block (the loader puts this folder on sys.path)
from torch import nn

HERE = Path(__file__).resolve().parent
WIDTHS = (16, 32, 64)
MEAN, STD = 0.1307, 0.3081


class MnistResNet(nn.Module):
    def __init__(self, widths: tuple[int, int, int] = WIDTHS, hidden: int = 64) -> None:
        super().__init__()
        w1, w2, w3 = widths
        self.stem = nn.Sequential(nn.Conv2d(1, w1, 3, 1, 1, bias=False), nn.BatchNorm2d(w1), nn.ReLU())
        self.stage1 = nn.Sequential(Block(w1, w1, 2), Block(w1, w1, 1))
        self.stage2 = nn.Sequential(Block(w1, w2, 2), Block(w2, w2, 1))
        self.stage3 = nn.Sequential(Block(w2, w3, 2), Block(w3, w3, 1))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Linear(w3, hidden)
        self.fc2 = nn.Linear(hidden, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage3(self.stage2(self.stage1(self.stem(x))))
        x = torch.flatten(self.pool(x), 1)
        return self.fc2(torch.relu(self.fc1(x)))


def loaded(module: MnistResNet, file: str) -> MnistResNet:
    """``module`` holding the weights of sample_models/``file``, in eval mode."""
    from egp_onnx.integrations.torch import load_onnx_weights, map_initializers

    model = onnx.load(str(HERE / file))
    load_onnx_weights(module, model, map_initializers(module, model))
    return module.eval()


def factory() -> MnistResNet:
    """MnistResNet holding the weights of sample_models/mnist_resnet.onnx."""
    torch.manual_seed(0)
    return loaded(MnistResNet(), "mnist_resnet.onnx")


def fashion_factory() -> MnistResNet:
    """MnistResNet holding the weights of sample_models/fashion_resnet.onnx."""
    torch.manual_seed(0)
    return loaded(MnistResNet(), "fashion_resnet.onnx")


def fashion_wide_factory() -> MnistResNet:
    """The wide MnistResNet (32/64/128, hidden 128) holding sample_models/fashion_wide_resnet.onnx."""
    torch.manual_seed(0)
    return loaded(MnistResNet((32, 64, 128), hidden=128), "fashion_wide_resnet.onnx")
