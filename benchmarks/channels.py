"""Channel removal (`--channels`) on the samples: unseen accuracy, MACs and latency against dense.

For each sample (MNIST, digits) and variant, `egp_onnx.compress` runs with the calibration file,
then the result is measured on the sample's unseen test split: accuracy, top-1 agreement with the
dense model, dense MACs, and onnxruntime CPU latency (ORT_ENABLE_ALL, one intra-op thread, spinning
off) at batch 1 and 32, the dense and the compressed model run in turn (ABAB..., one run each)
so that both share whatever the machine is doing. Speeds are ratios dense / variant from one run,
of the 10th percentile of each one's runs (on a loaded machine the median of a run of a few
milliseconds measures the neighbours; see README "INT8 as the last stage").

Run: python benchmarks/channels.py [--budget 3] [--min-agreement A] [--samples mnist digits]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

import egp_onnx
from egp_onnx.report.render import format_table
from egp_onnx.verify.cost import count_macs

SAMPLES = Path(__file__).resolve().parent.parent / "sample_models"
FILES = {
    "mnist": ("mnist_resnet.onnx", "mnist_calib.npz", "mnist_test.npz"),
    "digits": ("digits_resnet.onnx", "digits_train.npz", "digits_test.npz"),
}


def session(model: onnx.ModelProto) -> ort.InferenceSession:
    """One-thread, fully optimised CPU session."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def speed(dense: ort.InferenceSession, other: ort.InferenceSession, feed: dict, budget: float) -> float:
    """Dense latency over ``other`` latency (10th percentiles), runs interleaved for ``budget`` seconds."""
    for s in (dense, other):
        for _ in range(3):
            s.run(None, feed)
    times: tuple[list[float], list[float]] = ([], [])
    start = time.perf_counter()
    while time.perf_counter() - start < budget or len(times[0]) < 5:
        order = (0, 1) if len(times[0]) % 2 == 0 else (1, 0)
        for k in order:
            began = time.perf_counter()
            (dense, other)[k].run(None, feed)
            times[k].append(time.perf_counter() - began)
    return float(np.percentile(times[0], 10) / np.percentile(times[1], 10))


def predictions(s: ort.InferenceSession, x: np.ndarray, name: str) -> np.ndarray:
    """Top-1 classes over ``x`` in batches of 256."""
    return np.concatenate([s.run(None, {name: x[i : i + 256]})[0].argmax(1) for i in range(0, len(x), 256)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--budget", type=float, default=3.0, help="seconds of interleaved runs per batch size"
    )
    parser.add_argument(
        "--min-agreement",
        type=float,
        default=None,
        help="the guard of the variants that set none (default: egp-onnx's)",
    )
    parser.add_argument("--samples", nargs="+", default=list(FILES))
    parser.add_argument("--only", default="", help="run the variants whose label contains this")
    args = parser.parse_args()
    variants = {
        "--channels --sparsity 0": {"channels": True, "sparsity": 0.0},
        "--channels --sparsity 0 --min-agreement 0.995": {
            "channels": True,
            "sparsity": 0.0,
            "min_agreement": 0.995,
        },
        "--channels (then weights)": {"channels": True},
    }
    rows = []
    for sample in args.samples:
        model_file, calib, test = FILES[sample]
        dense = onnx.load(str(SAMPLES / model_file))
        data = np.load(SAMPLES / test)
        name = dense.graph.input[0].name
        x, labels = data[name], data["labels"]
        shapes = {name: (1, *x.shape[1:])}
        dense_session = session(dense)
        dense_pred = predictions(dense_session, x, name)
        macs_dense = count_macs(dense, shapes)
        dense_macs = macs_dense[0] if macs_dense else 0
        rows.append(
            [sample, "dense", f"{(dense_pred == labels).mean():.4f}", "1.0000", dense_macs, 1.0, 1.0, "-"]
        )
        for label, options in variants.items():
            if args.only not in label:
                continue
            if args.min_agreement is not None and "min_agreement" not in options:
                options = {**options, "min_agreement": args.min_agreement}
            began = time.perf_counter()
            result = egp_onnx.compress(dense, SAMPLES / calib, latency=False, **options)
            seconds = time.perf_counter() - began
            compressed = session(result.model)
            pred = predictions(compressed, x, name)
            found = count_macs(result.model, shapes)
            ratios = [speed(dense_session, compressed, {name: x[:b]}, args.budget) for b in (1, 32)]
            rows.append(
                [
                    sample,
                    label,
                    f"{(pred == labels).mean():.4f}",
                    f"{(pred == dense_pred).mean():.4f}",
                    found[0] if found else None,
                    round(ratios[0], 2),
                    round(ratios[1], 2),
                    f"{seconds:.0f}",
                ]
            )
            print(
                format_table(["sample", "variant", "acc", "agree", "MACs", "x b1", "x b32", "s"], rows[-1:])
            )
    headers = ["sample", "variant", "unseen acc", "agreement", "dense MACs", "speed b1", "speed b32", "run s"]
    print(f"\nonnxruntime {ort.__version__}, 1 thread, ORT_ENABLE_ALL; speeds dense / variant, interleaved")
    print(format_table(headers, rows))


if __name__ == "__main__":
    main()
