"""Train the Fashion-MNIST sample and write sample_models/fashion_resnet.onnx and its data files.

Data: Fashion-MNIST (Zalando's product photos of clothing, 60,000 training and 10,000 test images,
28x28 grey, 10 classes) as shipped in Debian's package dataset-fashion-mnist
(0.0~git20200523.55506a9-1, 30.9 MB: usr/share/datasets/fashion-mnist/*-idx?-ubyte.gz). The
script fetches the .deb with `apt-get download` (or takes it from --deb) and reads the IDX files
out of it with the standard library (a .deb is an ar archive holding data.tar.xz); it never
installs the package. No registry reachable from here ships CIFAR-10, SVHN or STL-10 data (the
README's "The Fashion-MNIST sample" lists what was tried), so this is the sample of natural images.

Normalisation: every file and the model input hold float32 images (N,1,28,28) normalised as
(pixels / 255 - 0.2860) / 0.3530, Fashion-MNIST's training mean and standard deviation.

Network: the MNIST sample's (sample_models/mnist_torch.py:MnistResNet; 3 stages of 2 basic
blocks, 16/32/64 channels, 1x1 stride-2 projection shortcuts, a Gemm -> Relu -> Gemm head), a
residual CNN of 6 basic blocks and 10 classes. `--widths 32 64 128 --hidden 128 --name
fashion_wide_resnet` builds the wide sample (the same network at twice the width, ~4x the MACs)
from the same data files.

Trained with torch==2.13.0 on the CPU (seeded, one thread unless --threads), 4 epochs of AdamW
with a one-cycle schedule, batch 128, random horizontal flips, then exported with the TorchScript
exporter (dynamo=False) with constant folding off, so that the BatchNormalization nodes stay in the
graph, and a dynamic batch axis.

Writes:
- fashion_resnet.onnx (or NAME.onnx with --name): input "image" (N,1,28,28) float32, output
  "logits" (N,10);
- fashion_calib.npz: 1000 training images ("image") and their "labels";
- fashion_calib_4000.npz: 4000 training images, a superset of those 1000 (the guard's
  measurements with 1000 held out);
- fashion_test.npz: 5000 of the 10,000 test images with labels (--test-count; float32 images of
  clothing compress to ~0.64 MB a thousand, so not all are shipped).

Needs: pip install torch==2.13.0, and apt-get to reach Debian's archive (unless --deb).
Run: python sample_models/build_fashion_resnet.py            (trains; the README says how long)
     python sample_models/build_fashion_resnet.py --widths 32 64 128 --hidden 128 \
         --name fashion_wide_resnet --epochs 5    (the wide sample: 1111 s of training here)
     python sample_models/build_fashion_resnet.py --data-only (data files only)
"""

from __future__ import annotations

import argparse
import gzip
import io
import subprocess
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from mnist_torch import WIDTHS, MnistResNet
from torch import nn

HERE = Path(__file__).resolve().parent
DEB_PACKAGE = "dataset-fashion-mnist=0.0~git20200523.55506a9-1"
IDX = "./usr/share/datasets/fashion-mnist/{split}-{kind}-idx{dims}-ubyte.gz"
SPLITS = {"train": "train", "test": "t10k"}
MEAN, STD = 0.2860, 0.3530
OPSET = 17
CALIB_SAMPLES = 1000
# A larger calibration file for the guard's measurements (README "The guard"): 4000 images hold
# 1000 out, where the sensitivity caps are no longer needed. A superset of the 1000 (same order).
LARGE_CALIB_SAMPLES = 4000
INPUT, OUTPUT = "image", "logits"


def fetch_deb(dest: Path) -> Path:
    """Download the dataset-fashion-mnist .deb (not installed) into ``dest``."""
    subprocess.run(["apt-get", "download", DEB_PACKAGE], check=True, cwd=dest)
    return next(dest.glob("dataset-fashion-mnist_*_all.deb"))


def deb_data(deb: Path) -> tarfile.TarFile:
    """The data.tar.xz member of a .deb (an ar archive: 8-byte magic, then 60-byte headers)."""
    blob = deb.read_bytes()
    if blob[:8] != b"!<arch>\n":
        raise SystemExit(f"{deb}: not a .deb (no ar magic)")
    pos = 8
    while pos + 60 <= len(blob):
        name, size = blob[pos : pos + 16].decode().strip().rstrip("/"), int(blob[pos + 48 : pos + 58])
        if name.startswith("data.tar"):
            return tarfile.open(fileobj=io.BytesIO(blob[pos + 60 : pos + 60 + size]))
        pos += 60 + size + (size & 1)
    raise SystemExit(f"{deb}: no data.tar member")


def read_idx(data: tarfile.TarFile, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 pixels (N,1,28,28), int64 labels) of one split, read from the IDX files."""

    def member(kind: str, dims: int) -> bytes:
        handle = data.extractfile(IDX.format(split=SPLITS[split], kind=kind, dims=dims))
        if handle is None:
            raise SystemExit(f"{split} {kind}: missing from the package")
        return gzip.decompress(handle.read())

    images, labels = member("images", 3), member("labels", 1)
    if images[:4] != b"\x00\x00\x08\x03" or labels[:4] != b"\x00\x00\x08\x01":
        raise SystemExit(f"{split}: not IDX uint8 images/labels")
    pixels = np.frombuffer(images, np.uint8, offset=16).reshape(-1, 1, 28, 28)
    y = np.frombuffer(labels, np.uint8, offset=8).astype(np.int64)
    if len(pixels) != len(y):
        raise SystemExit(f"{split}: {len(pixels)} images but {len(y)} labels")
    return pixels, y


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
            xb = xt[idx]
            flip = torch.rand(len(idx), generator=gen) < 0.5  # clothes read the same mirrored
            xb = torch.where(flip[:, None, None, None], xb.flip(3), xb)
            opt.zero_grad()
            logits = model(xb)
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
    parser.add_argument("--deb", type=Path, help="the dataset-fashion-mnist .deb (default: download it)")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1, reproducible)")
    parser.add_argument("--test-count", type=int, default=5000, help="test images to ship (default 5000)")
    parser.add_argument("--data-only", action="store_true", help="write the data files, keep the model")
    parser.add_argument(
        "--widths",
        type=int,
        nargs=3,
        default=WIDTHS,
        metavar="W",
        help="the stages' channels (default 16 32 64)",
    )
    parser.add_argument("--hidden", type=int, default=64, help="the head's hidden Gemm width (default 64)")
    parser.add_argument("--name", default="fashion_resnet", help="the model's file name without .onnx")
    args = parser.parse_args()
    # One thread, as for the MNIST sample: a fixed kernel order reruns to the same weights, and on
    # 2 shared cores 2 threads spin on each other.
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        data = deb_data(args.deb or fetch_deb(Path(tmp)))
        px_train, y_train = read_idx(data, "train")
        px_test, y_test = read_idx(data, "test")
    x_train, x_test = normalise(px_train), normalise(px_test)
    print(f"Fashion-MNIST from {DEB_PACKAGE}: {len(x_train)} training, {len(x_test)} test images", flush=True)

    order = np.random.default_rng(1).permutation(len(x_train))
    calib = np.sort(order[:CALIB_SAMPLES])
    large = np.sort(order[:LARGE_CALIB_SAMPLES])
    shipped = np.sort(np.random.default_rng(2).permutation(len(x_test))[: args.test_count])
    np.savez_compressed(HERE / "fashion_calib.npz", **{INPUT: x_train[calib]}, labels=y_train[calib])
    np.savez_compressed(
        HERE / f"fashion_calib_{LARGE_CALIB_SAMPLES}.npz", **{INPUT: x_train[large]}, labels=y_train[large]
    )
    np.savez_compressed(HERE / "fashion_test.npz", **{INPUT: x_test[shipped]}, labels=y_test[shipped])

    path = HERE / f"{args.name}.onnx"
    if not args.data_only:
        model = MnistResNet(tuple(args.widths), args.hidden)
        params = sum(p.numel() for p in model.parameters())
        print(
            f"MnistResNet{tuple(args.widths)}, hidden {args.hidden}, on Fashion-MNIST: {params} parameters; "
            f"training {args.epochs} epochs",
            flush=True,
        )
        start = time.perf_counter()
        train(model, x_train, y_train, args.epochs)
        print(f"training took {time.perf_counter() - start:.0f} s", flush=True)
        export(model, path)
        with torch.no_grad():
            torch_logits = torch.cat([model(b) for b in torch.from_numpy(x_test).split(1000)]).numpy()
        gap = float(np.abs(ort_logits(path, x_test) - torch_logits).max())
        if gap > 1e-4:
            raise SystemExit(f"ONNX and torch disagree by {gap}")
        print(f"torch/onnx gap {gap:.2e}")
    if path.exists():
        hits = ort_logits(path, x_test).argmax(1) == y_test
        print(
            f"dense test accuracy {hits.mean():.4f} on all {len(y_test)} test images, "
            f"{hits[shipped].mean():.4f} on the {len(shipped)} of fashion_test.npz"
        )


if __name__ == "__main__":
    main()
