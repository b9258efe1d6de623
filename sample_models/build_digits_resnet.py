"""Train the sample model and write sample_models/digits_resnet.onnx and its data files.

A small residual CNN on scikit-learn's digits (8x8 grey images, shipped with scikit-learn, no
download), trained with PyTorch and written to ONNX with onnx.helper so that the graph keeps its
Conv -> BatchNormalization -> Relu structure and its residual Adds:

    input (N,1,8,8)
      stem: Conv3x3(1->16) BN Relu
      block1: Conv3x3 BN Relu Conv3x3 BN (+ identity) Relu
      block2: Conv3x3/2(16->32) BN Relu Conv3x3 BN (+ Conv1x1/2 BN) Relu
      block3: Conv3x3 BN Relu Conv3x3 BN (+ identity) Relu
      GlobalAveragePool Flatten Gemm(32->32) Relu Gemm(32->10) -> logits

Needs: pip install torch==2.13.0 scikit-learn.  Run: python sample_models/build_digits_resnet.py
(it writes digits_resnet.onnx, digits_calib.npz, digits_test.npz and digits_train.npz, the
training split that the finetuning benchmark and tests retrain on).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from digits_torch import Block, DigitsResNet
from onnx import TensorProto, helper, numpy_helper
from sklearn.datasets import load_digits
from torch import nn

HERE = Path(__file__).resolve().parent
OPSET = 17
CALIB_SAMPLES = 512
TEST_SAMPLES = 497


def load_data() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None]
    y = digits.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(x))
    test, train = order[:TEST_SAMPLES], order[TEST_SAMPLES:]
    return x[train], y[train], x[test], y[test]


def train(model: nn.Module, x: np.ndarray, y: np.ndarray, epochs: int = 40) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    gen = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(xt), generator=gen).split(64):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(xt[idx]), yt[idx])
            loss.backward()
            opt.step()
        sched.step()
    model.eval()


class OnnxWriter:
    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []

    def init(self, name: str, value: torch.Tensor | np.ndarray) -> str:
        array = value.detach().numpy() if isinstance(value, torch.Tensor) else value
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(array, dtype=np.float32), name))
        return name

    def conv_bn(self, x: str, conv: nn.Conv2d, bn: nn.BatchNorm2d, name: str) -> str:
        w = self.init(f"{name}.weight", conv.weight)
        k = conv.kernel_size[0]
        pad = conv.padding[0]
        self.nodes.append(
            helper.make_node(
                "Conv",
                [x, w],
                [f"{name}.out"],
                name=name,
                kernel_shape=[k, k],
                strides=list(conv.stride),
                pads=[pad] * 4,
            )
        )
        bn_name = name.replace("conv", "bn").replace("down.0", "down.1")
        params = [
            self.init(f"{bn_name}.{p}", getattr(bn, attr))
            for p, attr in (
                ("weight", "weight"),
                ("bias", "bias"),
                ("mean", "running_mean"),
                ("var", "running_var"),
            )
        ]
        self.nodes.append(
            helper.make_node(
                "BatchNormalization",
                [f"{name}.out", *params],
                [f"{bn_name}.out"],
                name=bn_name,
                epsilon=bn.eps,
            )
        )
        return f"{bn_name}.out"

    def relu(self, x: str, name: str) -> str:
        self.nodes.append(helper.make_node("Relu", [x], [f"{name}.out"], name=name))
        return f"{name}.out"

    def gemm(self, x: str, fc: nn.Linear, name: str) -> str:
        w, b = self.init(f"{name}.weight", fc.weight), self.init(f"{name}.bias", fc.bias)
        self.nodes.append(helper.make_node("Gemm", [x, w, b], [f"{name}.out"], name=name, transB=1))
        return f"{name}.out"


def to_onnx(model: DigitsResNet) -> onnx.ModelProto:
    g = OnnxWriter()
    x = g.relu(g.conv_bn("input", model.stem[0], model.stem[1], "stem.conv"), "stem.relu")
    for bname in ("block1", "block2", "block3"):
        block: Block = getattr(model, bname)
        y = g.relu(g.conv_bn(x, block.conv1, block.bn1, f"{bname}.conv1"), f"{bname}.relu1")
        y = g.conv_bn(y, block.conv2, block.bn2, f"{bname}.conv2")
        shortcut = x if block.down is None else g.conv_bn(x, block.down[0], block.down[1], f"{bname}.down.0")
        g.nodes.append(helper.make_node("Add", [y, shortcut], [f"{bname}.add.out"], name=f"{bname}.add"))
        x = g.relu(f"{bname}.add.out", f"{bname}.relu2")
    g.nodes.append(helper.make_node("GlobalAveragePool", [x], ["pool.out"], name="pool"))
    g.nodes.append(helper.make_node("Flatten", ["pool.out"], ["flatten.out"], name="flatten", axis=1))
    h = g.relu(g.gemm("flatten.out", model.fc1, "fc1"), "fc1.relu")
    logits = g.gemm(h, model.fc2, "fc2")
    g.nodes.append(helper.make_node("Identity", [logits], ["logits"], name="output"))
    graph = helper.make_graph(
        g.nodes,
        "digits_resnet",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        g.inits,
    )
    onnx_model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="egp-onnx sample"
    )
    onnx_model.ir_version = 8
    onnx.checker.check_model(onnx_model, full_check=True)
    return onnx_model


def main() -> None:
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)
    x_train, y_train, x_test, y_test = load_data()
    model = DigitsResNet()
    train(model, x_train, y_train)
    onnx_model = to_onnx(model)
    session = ort.InferenceSession(onnx_model.SerializeToString(), providers=["CPUExecutionProvider"])
    ort_logits = session.run(None, {"input": x_test})[0]
    with torch.no_grad():
        torch_logits = model(torch.from_numpy(x_test)).numpy()
    gap = float(np.abs(ort_logits - torch_logits).max())
    if gap > 1e-4:
        raise SystemExit(f"ONNX and torch disagree by {gap}")
    accuracy = float((ort_logits.argmax(1) == y_test).mean())
    onnx.save(onnx_model, HERE / "digits_resnet.onnx")
    calib = np.random.default_rng(1).permutation(len(x_train))[:CALIB_SAMPLES]
    np.savez_compressed(HERE / "digits_calib.npz", input=x_train[calib], labels=y_train[calib])
    np.savez_compressed(HERE / "digits_test.npz", input=x_test, labels=y_test)
    np.savez_compressed(HERE / "digits_train.npz", input=x_train, labels=y_train)
    print(f"dense test accuracy {accuracy:.4f} on {len(y_test)} held-out digits; torch/onnx gap {gap:.2e}")


if __name__ == "__main__":
    main()
