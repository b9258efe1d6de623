"""How far post-training channel removal can go before unseen answers change: the guard off.

Issue 22 asks ``--channels`` for 1.5x the dense speed at batch 32 with at most 0.5 pt of unseen
accuracy lost, and the default guard (estimated unseen top-1 agreement >= 0.99) stops the wide
Fashion sample's channel stage at 25% fewer MACs. Is that the guard being cautious, or the refit's
limit? This runs the channel stage with a guard that accepts every candidate
(``min_agreement=0``: each step is still priced, cut and refit as in a guarded run) and scores
every candidate on the sample's unseen test split, so the table is the stage's whole trajectory:
MACs against unseen agreement and accuracy. No residual branch is emptied (that needs a guard's
verdict per branch). ``--step`` replaces the stage's step (``api/channels.py: CHANNEL_STEP``,
0.5: half of each chosen group) for a finer curve; that is a patch for the run, not an option.

Run: python benchmarks/channel_ceiling.py --sample fashion_wide_4000 [--step 0.25] [--steps 8]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

import egp_onnx
import egp_onnx.api.channels as channels_stage
from egp_onnx.report.render import format_table
from egp_onnx.verify.cost import count_macs

sys.path.insert(0, str(Path(__file__).resolve().parent))
from samples import SAMPLES, SETS  # noqa: E402


def predict(model: onnx.ModelProto | str, x: np.ndarray, name: str) -> np.ndarray:
    """Top-1 classes of ``model`` on ``x``, one thread, batches of 500."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    source = model if isinstance(model, str) else model.SerializeToString()
    sess = ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])
    return np.concatenate(
        [sess.run(None, {name: x[i : i + 500]})[0].argmax(1) for i in range(0, len(x), 500)]
    )


class Recorder:
    """A finetune callback that trains nothing: it scores each channel candidate and returns it."""

    def __init__(self, test: np.ndarray, labels: np.ndarray, dense: np.ndarray, name: str, shape) -> None:
        self.test, self.labels, self.dense, self.name, self.shape = test, labels, dense, name, shape
        self.rows: list[list] = []
        self.t0 = time.perf_counter()

    def __call__(self, candidate: onnx.ModelProto, masks: dict) -> onnx.ModelProto:
        found = count_macs(candidate, {self.name: self.shape})
        macs = found[0] if found else float("nan")
        top = predict(candidate, self.test, self.name)
        self.rows.append(
            [
                len(self.rows) + 1,
                macs / 1e6,
                float((top == self.dense).mean()),
                float((top == self.labels).mean()),
                time.perf_counter() - self.t0,
            ]
        )
        print(*(f"{v:.4f}" if isinstance(v, float) else v for v in self.rows[-1]), flush=True)
        return candidate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sample", default="fashion_wide_4000", choices=sorted(SETS))
    parser.add_argument("--step", type=float, default=channels_stage.CHANNEL_STEP)
    parser.add_argument("--steps", type=int, default=8, help="channel steps at most")
    args = parser.parse_args()
    model_file, calib, test_file, name = SETS[args.sample]
    with np.load(SAMPLES / test_file) as npz:
        test, labels = npz[name], npz["labels"]
    dense = predict(str(SAMPLES / model_file), test, name)
    shape = (1, *test.shape[1:])
    recorder = Recorder(test, labels, dense, name, shape)
    channels_stage.CHANNEL_STEP = args.step
    channels_stage.MAX_CHANNEL_STEPS = args.steps
    print("step  MACs(M)  unseen_agree  unseen_acc  seconds", flush=True)
    result = egp_onnx.compress(
        str(SAMPLES / model_file),
        str(SAMPLES / calib),
        channels=True,
        sparsity=0.0,
        min_agreement=0.0,
        finetune=recorder,
    )
    held = {s.step: s.top1_agreement for s in result.report.channels.steps}
    found = count_macs(onnx.load(str(SAMPLES / model_file)), {name: shape})
    base = found[0] / 1e6 if found else float("nan")
    rows = [
        [r[0], r[1], base / r[1], held.get(r[0]), r[2], r[3], r[3] - float((dense == labels).mean())]
        for r in recorder.rows
    ]
    print(
        f"\n{args.sample}: dense {base:.2f} M MACs, accuracy {(dense == labels).mean():.4f}; step {args.step}"
    )
    print(
        format_table(
            ["step", "MACs_M", "fewer", "held_agree", "unseen_agree", "unseen_acc", "acc_diff"], rows
        )
    )


if __name__ == "__main__":
    main()
