"""What one finetune epoch does to a model with NOTHING pruned: cross-entropy vs distillation.

The guard measures top-1 agreement with the original; a finetune callback that moves the
original's answers before any weight goes makes every step start in debt (issue 22: on the wide
Fashion sample, one epoch of cross-entropy at lr 3e-4 already left agreement at 0.966). For each
distill weight and learning rate: one ``ClassificationFinetune`` call on the original itself
(all-True masks), then unseen agreement with the original and accuracy, on the test file.

Run: nice -n 10 python benchmarks/distill.py --train fashion_finetune.npz (benchmarks/finetune_split.py)
     [--model sample_models/fashion_wide_resnet.onnx
      --factory sample_models/mnist_torch.py:fashion_wide_factory --test sample_models/fashion_test.npz
      --distill 0,1 --lr 3e-4,1e-4 --temperature 1 --epochs 1]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np

from egp_onnx.cli.plugins import load_attribute
from egp_onnx.graph.weights import replace_tensors, tensor_values
from egp_onnx.load.model import load_model
from egp_onnx.report.render import format_table
from egp_onnx.runtime.handle import ModelHandle

SAMPLES = Path(__file__).resolve().parent.parent / "sample_models"


def answers(model, name: str, images: np.ndarray) -> np.ndarray:
    """The model's top-1 class per image (onnxruntime, batches of 500)."""
    handle = ModelHandle(model)
    out = [handle.run(None, {name: images[i : i + 500]})[0].argmax(1) for i in range(0, len(images), 500)]
    handle.release()
    return np.concatenate(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=SAMPLES / "fashion_wide_resnet.onnx")
    parser.add_argument("--factory", default=f"{SAMPLES / 'mnist_torch.py'}:fashion_wide_factory")
    parser.add_argument("--train", type=Path, required=True)
    parser.add_argument("--test", type=Path, default=SAMPLES / "fashion_test.npz")
    parser.add_argument("--distill", default="0,1", help="distill weights, comma-separated")
    parser.add_argument("--lr", default="3e-4,1e-4", help="learning rates, comma-separated")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--epochs", type=int, default=1)
    args = parser.parse_args()
    from egp_onnx.integrations.torch import ClassificationFinetune

    model = load_model(args.model)
    name = model.graph.input[0].name
    with np.load(args.test) as npz:
        labels = npz["labels"]
        images = npz[next(k for k in npz.files if k != "labels")]
    dense = answers(model, name, images)
    print(f"{args.model.name}: dense unseen accuracy {float((dense == labels).mean()):.4f} on {len(labels)}")
    masks = {k: np.ones(v.shape, bool) for k, v in tensor_values(model).items() if v.ndim > 1}
    rows = []
    for lr in (float(x) for x in args.lr.split(",")):
        for distill in (float(x) for x in args.distill.split(",")):
            began = time.perf_counter()
            finetune = ClassificationFinetune(
                load_attribute(args.factory, "--factory")(),
                args.train,
                epochs=args.epochs,
                lr=lr,
                distill=distill,
                temperature=args.temperature,
            )
            finetune.start(model)
            tuned = answers(replace_tensors(model, finetune(model, masks)), name, images)
            seconds = time.perf_counter() - began
            rows.append(
                [
                    f"{lr:g}",
                    f"{distill:g}",
                    f"{float((tuned == dense).mean()):.4f}",
                    f"{float((tuned == labels).mean()):.4f}",
                    f"{seconds:.0f} s",
                ]
            )
            print(" | ".join(rows[-1]), flush=True)
    print(
        f"\n{args.epochs} epoch(s) on {args.train.name}, T {args.temperature:g}, nothing pruned; "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    print(format_table(["lr", "distill", "unseen agreement", "unseen accuracy", "time"], rows))


if __name__ == "__main__":
    main()
