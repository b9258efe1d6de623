"""EGP vs global magnitude pruning on the sample, each with and without finetuning.

At 50/80/90/95% sparsity: test accuracy, top-1 agreement with the dense model, rectifiers removed
by graph surgery, and depth after. The finetuned runs retrain the sample's PyTorch module
(sample_models/digits_torch.py) on digits_train.npz between steps, masks held (the paper's
prune -> retrain loop, shortened: a few epochs instead of 160). Needs the torch extra.

Run: python benchmarks/finetune.py [--epochs 3]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import egp_onnx
from egp_onnx.report.render import format_table

SAMPLES = Path(__file__).resolve().parent.parent / "sample_models"
sys.path.insert(0, str(SAMPLES))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=2e-3)
    args = parser.parse_args()
    from digits_torch import factory

    from egp_onnx.integrations.torch import ClassificationFinetune

    rows = []
    for method in ("egp", "magnitude"):
        for finetuned in (False, True):
            for sparsity in (0.5, 0.8, 0.9, 0.95):
                callback = None
                if finetuned:
                    callback = ClassificationFinetune(
                        factory(), SAMPLES / "digits_train.npz", epochs=args.epochs, lr=args.lr
                    )
                start = time.perf_counter()
                report = egp_onnx.compress(
                    SAMPLES / "digits_resnet.onnx",
                    SAMPLES / "digits_calib.npz",
                    sparsity=sparsity,
                    method=method,
                    eval_data=SAMPLES / "digits_test.npz",
                    finetune=callback,
                    latency=False,
                ).report
                m, f = report.model, report.fidelity
                relus = m.op_counts_before.get("Relu", 0) - m.op_counts_after.get("Relu", 0)
                rows.append(
                    [
                        method,
                        "yes" if finetuned else "no",
                        sparsity,
                        f.accuracy_after,
                        f.top1_agreement,
                        relus,
                        m.depth_after,
                        len(report.steps),
                        time.perf_counter() - start,
                    ]
                )
    headers = [
        "method",
        "finetune",
        "sparsity",
        "accuracy",
        "agreement",
        "relus_removed",
        "depth",
        "steps",
        "seconds",
    ]
    print(format_table(headers, rows))
    print(
        f"\ndense: accuracy {report.fidelity.accuracy_before:.4f}, depth {report.model.depth_before}, "
        f"{report.model.op_counts_before.get('Relu', 0)} ReLUs; finetuning: {args.epochs} epochs of Adam "
        f"(lr {args.lr}) per step on 1300 training digits; accuracy on the 497 held-out digits"
    )


if __name__ == "__main__":
    main()
