"""Post-training compression of the two samples: method x refit x sparsity, and the guarded default.

Targets 0.5 ... 0.9 (guard off, fixed sparsity): EGP and global magnitude pruning, each without
refit, with layer-wise reconstruction (least squares, magnitude selection) and with
reconstruction + OBS selection. "guard": the default command (guard on: top-1 agreement >= 0.99
on the automatic held-out split, up to the 0.95 ceiling); "guard@0.8": the same with --sparsity 0.8.

Columns: depth after surgery (Conv/Gemm/MatMul on the longest path), ReLUs removed, agreement with
the dense model on the held-out split of the calibration data (what the guard saw) and on the test
set (never used for fitting or the guard), test accuracy, batch-1 latency of the written model
over the dense one (median of interleaved onnxruntime runs), and wall time of the compress call.
Run: python benchmarks/sparsity_sweep.py [--sample digits|mnist|all] [--quick]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

import egp_onnx
from egp_onnx.load.calibration import open_calibration, split_holdout
from egp_onnx.load.model import load_model
from egp_onnx.report.render import format_table

SAMPLES = Path(__file__).resolve().parent.parent / "sample_models"
# calibration file: digits uses the 1300 training digits (512 + 788 more than digits_calib.npz)
SETS = {
    "digits": ("digits_resnet.onnx", "digits_train.npz", "digits_test.npz", "input"),
    "mnist": ("mnist_resnet.onnx", "mnist_calib.npz", "mnist_test.npz", "image"),
}
VARIANTS = {  # name: (method, reconstruct, select)
    "egp": ("egp", False, "magnitude"),
    "egp+lsq": ("egp", True, "magnitude"),
    "egp+lsq+obs": ("egp", True, "obs"),
    "magnitude": ("magnitude", False, "magnitude"),
    "magnitude+lsq": ("magnitude", True, "magnitude"),
    "magnitude+lsq+obs": ("magnitude", True, "obs"),
}


def session(model: onnx.ModelProto | Path) -> ort.InferenceSession:
    data = model.read_bytes() if isinstance(model, Path) else model.SerializeToString()
    return ort.InferenceSession(data, providers=["CPUExecutionProvider"])


def predict(sess: ort.InferenceSession, x: np.ndarray, name: str) -> np.ndarray:
    return np.concatenate([sess.run(None, {name: x[i : i + 500]})[0] for i in range(0, len(x), 500)]).argmax(
        1
    )


def latency_ratio(
    dense: ort.InferenceSession, small: ort.InferenceSession, x: np.ndarray, name: str
) -> float:
    """Median batch-1 time of ``small`` over ``dense``, runs interleaved so machine noise cancels."""
    feed = {name: x[:1]}
    for s in (dense, small):
        for _ in range(20):
            s.run(None, feed)
    times: dict[int, list[float]] = {0: [], 1: []}
    for _ in range(300):
        for i, s in enumerate((dense, small)):
            start = time.perf_counter()
            s.run(None, feed)
            times[i].append(time.perf_counter() - start)
    return float(np.median(times[1]) / np.median(times[0]))


def row(sample: str, variant: str, target: str, result, dense_sess, tests, held, name, seconds) -> list:
    x, y, dense_pred = tests
    small = session(result.model)
    pred = predict(small, x, name)
    held_x, held_pred = held
    relus = result.report.model.op_counts_before.get("Relu", 0) - result.report.model.op_counts_after.get(
        "Relu", 0
    )
    return [
        sample,
        variant,
        target,
        result.report.model.sparsity,
        result.report.model.depth_after,
        relus,
        float((predict(small, held_x, name) == held_pred).mean()),
        float((pred == dense_pred).mean()),
        float((pred == y).mean()),
        latency_ratio(dense_sess, small, x, name),
        seconds,
    ]


def sweep(sample: str, quick: bool) -> list[list]:
    model_file, calib_file, test_file, name = SETS[sample]
    model, calib = SAMPLES / model_file, SAMPLES / calib_file
    with np.load(SAMPLES / test_file) as test:
        x, y = test[name], test["labels"]
    dense_sess = session(model)
    dense_pred = predict(dense_sess, x, name)
    _, held = split_holdout(open_calibration(calib, load_model(model)), None, 0)
    held_x = held.arrays()[0][name]
    held_info = (held_x, predict(dense_sess, held_x, name))
    rows = [
        [
            sample,
            "dense",
            "-",
            0.0,
            egp_onnx.compress(model, calib, sparsity=0.0, latency=False).report.model.depth_before,
            0,
            1.0,
            1.0,
            float((dense_pred == y).mean()),
            1.0,
            0.0,
        ]
    ]
    sparsities = (0.5, 0.8) if quick else (0.5, 0.7, 0.8, 0.9)
    variants = ["egp", "egp+lsq", "magnitude+lsq"] if quick else list(VARIANTS)
    for variant in variants:
        method, reconstruct, select = VARIANTS[variant]
        for target in [*sparsities, "guard@0.8", "guard"]:
            guarded = target.startswith("guard") if isinstance(target, str) else False
            ceiling = {"guard@0.8": {"sparsity": 0.8}, "guard": {}}.get(str(target), {"sparsity": target})
            start = time.perf_counter()
            try:
                result = egp_onnx.compress(
                    model,
                    calib,
                    method=method,
                    reconstruct=reconstruct,
                    select=select,
                    latency=False,
                    guard=guarded,
                    **ceiling,
                )
            except egp_onnx.EgpError as exc:  # the guard refused even the first step
                rows.append([sample, variant, target, "-", "-", "-", "-", "-", "-", "-", str(exc)[:30]])
                continue
            seconds = time.perf_counter() - start
            rows.append(
                row(
                    sample,
                    variant,
                    str(target),
                    result,
                    dense_sess,
                    (x, y, dense_pred),
                    held_info,
                    name,
                    seconds,
                )
            )
            print(" ".join(str(v) if not isinstance(v, float) else f"{v:.3f}" for v in rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sample", choices=[*SETS, "all"], default="all")
    parser.add_argument("--quick", action="store_true", help="fewer variants and sparsities")
    args = parser.parse_args()
    rows: list[list] = []
    for sample in SETS if args.sample == "all" else [args.sample]:
        rows += sweep(sample, args.quick)
    headers = [
        "sample",
        "variant",
        "target",
        "sparsity",
        "depth",
        "relus_rm",
        "agree_held",
        "agree_test",
        "acc_test",
        "latency",
        "seconds",
    ]
    print()
    print(format_table(headers, rows))
    print("\ntarget 'guard': the default guard (agreement >= 0.99, automatic held-out split), ceiling 0.95;")
    print("latency: batch-1 median of the written model over the dense one (interleaved onnxruntime runs)")


if __name__ == "__main__":
    main()
