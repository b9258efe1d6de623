"""Which guard statistic predicts unseen agreement: candidates on the held-out split vs the test set.

For each sample (digits, MNIST, Fashion-MNIST at two widths: each has calibration data cut from its training
set and an unseen test split never used for fitting or the guard), the model is compressed with the
default command's options and the guard off at a sweep of sparsities. The compressed model is
then measured against the dense one on the automatic held-out split of the calibration data
(what the guard sees) with each candidate statistic, and on the unseen test split (agreement and accuracy).

Candidates (held-out split): ``agree`` plain top-1 agreement; ``lcb`` its 95% Wilson lower bound;
``low25`` agreement on the quarter of samples where the dense model's margin is smallest;
``mK`` agreement counting a sample as flipped where the compressed model closes more than K of
the dense model's logit margin to another class (m0.9 is what the guard counts);
``noiseS`` agreement with Gaussian noise of S times the input's standard deviation added to both
models' inputs; ``shift`` agreement on inputs shifted by one pixel (the four directions);
``noiseSm``, ``shiftm`` the guard's count (m0.9) on those perturbed inputs;
``est`` the report's estimate (m0.9's count, Jeffreys' posterior mean); ``softL`` the same with
a partial count: a sample whose candidate closes a fraction f of the margin counts as
(f - L) / (1 - L) of a flip, clipped to [0, 1] (soft0.8 is m0.9 smoothed: 0 up to 80%, 1 from
100%); ``kl`` mean KL(dense || compressed) of
the softmax in nats; ``logit`` relative L2 error of the logits; ``accdrop`` dense minus
compressed accuracy (labels of the held-out split).

``--default``: the default command itself (guard on), scored on the unseen test set beside the
estimate its report states. ``--strict``: MNIST and Fashion-MNIST (``--sample``) with the first
1000 test images as --eval --eval-unseen and --min-agreement 0.995, scored on the other test
images (the step search's convergence). ``--trajectory "k=v;k=v/..."``: every candidate that guarded runs
with those options judge, measured as above.
Run: python benchmarks/guard.py [--sample digits|mnist|fashion|fashion_wide|all] [--sparsities 0.5,0.6,...]
     [--default | --trajectory OPTIONS] [--options "k=v;k=v" (compress options of --default and the sweep)]
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
from egp_onnx.load.calibration import open_calibration, split_holdout
from egp_onnx.load.model import load_model
from egp_onnx.report.render import format_table
from egp_onnx.verify.fidelity import MARGIN_SCALE, scaled_flips

sys.path.insert(0, str(Path(__file__).resolve().parent))

from samples import SAMPLES, SETS  # noqa: E402

STRICT = ("mnist", "fashion")  # the samples with more than 1000 test images
NOISE = (0.1, 0.25, 0.5)
MARGINS = (0.9, 0.7, 0.5)
SOFT = (0.8, 0.7)


def session(model: onnx.ModelProto | Path) -> ort.InferenceSession:
    data = model.read_bytes() if isinstance(model, Path) else model.SerializeToString()
    return ort.InferenceSession(data, providers=["CPUExecutionProvider"])


def logits(sess: ort.InferenceSession, x: np.ndarray, name: str) -> np.ndarray:
    return np.concatenate([sess.run(None, {name: x[i : i + 500]})[0] for i in range(0, len(x), 500)])


def wilson_lower(k: int, n: int, z: float = 1.645) -> float:
    p = k / n
    centre = p + z * z / (2 * n)
    spread = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return float((centre - spread) / (1 + z * z / n))


def margin(z: np.ndarray) -> np.ndarray:
    top = np.sort(z, axis=1)
    return top[:, -1] - top[:, -2]


def kl(z_ref: np.ndarray, z_cand: np.ndarray) -> float:
    def log_softmax(z: np.ndarray) -> np.ndarray:
        z = z - z.max(1, keepdims=True)
        return z - np.log(np.exp(z).sum(1, keepdims=True))

    lp, lq = log_softmax(z_ref.astype(np.float64)), log_softmax(z_cand.astype(np.float64))
    return float((np.exp(lp) * (lp - lq)).sum(1).mean())


def soft_estimate(ref: np.ndarray, cand: np.ndarray, low: float) -> float:
    """Jeffreys' posterior mean of agreement, each sample counting (f - low) / (1 - low) of a flip
    (clipped to [0, 1]) where f is the largest fraction of a margin the candidate closes."""
    rows = np.arange(ref.shape[0])
    top = ref.argmax(1)
    margin = ref[rows, top][:, None] - ref
    gain = (cand - cand[rows, top][:, None]) + margin
    with np.errstate(divide="ignore", invalid="ignore"):
        part = (gain - low * margin) / ((1 - low) * margin)
    part = np.where(margin > 0, part, (gain > 0).astype(np.float64))
    part[rows, top] = 0.0
    flips = float(np.clip(np.nan_to_num(part, nan=0.0), 0.0, 1.0).max(1).sum())
    return (len(ref) - flips + 0.5) / (len(ref) + 1)


def shifted(x: np.ndarray) -> np.ndarray:
    return np.concatenate([np.roll(x, s, axis=a) for a in (2, 3) for s in (-1, 1)])


def candidates(dense, small, x: np.ndarray, y: np.ndarray, name: str, rng) -> dict[str, float]:
    zd, zs = logits(dense, x, name), logits(small, x, name)
    same = zd.argmax(1) == zs.argmax(1)
    low = margin(zd) <= np.quantile(margin(zd), 0.25)
    row = {
        "agree": float(same.mean()),
        "lcb": wilson_lower(int(same.sum()), len(same)),
        "low25": float(same[low].mean()),
        **{f"m{k}": 1 - float(scaled_flips(zd, zs, k).mean()) for k in MARGINS},
    }
    std = float(x.std())
    perturbed = {}
    for s in NOISE:
        noisy = (x + rng.standard_normal(x.shape).astype(np.float32) * (s * std)).astype(np.float32)
        perturbed[f"noise{s}"] = logits(dense, noisy, name), logits(small, noisy, name)
    xs = shifted(x)
    perturbed["shift"] = logits(dense, xs, name), logits(small, xs, name)
    for key, (pd, ps) in perturbed.items():
        row[key] = float((pd.argmax(1) == ps.argmax(1)).mean())
    for key, (pd, ps) in perturbed.items():  # the guard's count on the perturbed inputs
        row[f"{key}m"] = 1 - float(scaled_flips(pd, ps, MARGIN_SCALE).mean())
    for low in SOFT:
        row[f"soft{low}"] = soft_estimate(zd.astype(np.float64), zs.astype(np.float64), low)
    row["kl"] = kl(zd, zs)
    row["logit"] = float(np.linalg.norm(zs - zd) / np.linalg.norm(zd))
    row["accdrop"] = float((zd.argmax(1) == y).mean() - (zs.argmax(1) == y).mean())
    return row


class _Recorder:
    """Wraps the run's guard: every candidate it judges is also measured with every candidate statistic."""

    def __init__(self, measure) -> None:
        self.measure, self.rows = measure, []

    def wrap(self, guard_class):
        recorder = self

        class Recording(guard_class):
            def __call__(self, candidate):
                fidelity, problems = super().__call__(candidate)
                recorder.rows.append(recorder.measure(candidate, fidelity, problems))
                return fidelity, problems

        return Recording


def trajectory(sample: str, options: dict, dump: str = "") -> list[list]:
    """Every candidate a guarded run judges, measured on the held-out split and the unseen test set."""
    import egp_onnx.api.compress as api

    model_file, calib_file, test_file, name = SETS[sample]
    model, calib = SAMPLES / model_file, SAMPLES / calib_file
    with np.load(SAMPLES / test_file) as test:
        x_test, y_test = test[name], test["labels"]
    _, held = split_holdout(open_calibration(calib, load_model(model)), None, 0)
    arrays, y_held = held.arrays()
    x_held = arrays[name]
    dense = session(model)
    zd_test = logits(dense, x_test, name)
    acc_dense = float((zd_test.argmax(1) == y_test).mean())

    def measure(candidate, fidelity, problems):
        small = session(candidate)
        if dump:
            zs_held, zs_t = logits(small, x_held, name), logits(small, x_test, name)
            np.savez(
                f"{dump}/{sample}_{len(recorder.rows):03d}_{abs(hash(str(options)))}.npz",
                held=zs_held,
                test=zs_t,
                dense_held=logits(dense, x_held, name),
                dense_test=zd_test,
                y_held=y_held,
                y_test=y_test,
            )
        cand = candidates(dense, small, x_held, y_held, name, np.random.default_rng(0))
        zs_test = logits(small, x_test, name)
        unseen = float((zs_test.argmax(1) == zd_test.argmax(1)).mean())
        acc = float((zs_test.argmax(1) == y_test).mean())
        est = getattr(fidelity, "estimate", None)
        row = [sample, str(options), "no" if problems else "yes", *cand.values(),
               est if est is not None else "-", unseen, acc_dense, acc, acc - acc_dense]  # fmt: skip
        print(format_table(["sample", "options", "kept", *HEADER[2:]], [row]), flush=True)
        return row

    recorder = _Recorder(measure)
    original = api.Guard
    api.Guard = recorder.wrap(original)
    try:
        egp_onnx.compress(model, calib, latency=False, **options)
    except egp_onnx.EgpError as exc:
        print(f"{sample} {options}: {exc}")
    finally:
        api.Guard = original
    return recorder.rows


def errors(sample: str, rows: list[list]) -> list[list]:
    """Each agreement-like candidate minus the unseen agreement: mean (bias) and root mean square,
    over all candidates judged and over those whose unseen agreement is >= 0.975 (near the guard's
    threshold, where its verdicts matter)."""
    header = ["sample", "options", "kept", *HEADER[2:]]
    unseen = np.array([r[header.index("unseen_agree")] for r in rows], dtype=float)
    near = unseen >= 0.975
    table = []
    names = [
        "agree",
        "lcb",
        "low25",
        *(f"m{k}" for k in MARGINS),
        *(f"noise{s}" for s in NOISE),
        "shift",
        *(f"noise{s}m" for s in NOISE),
        "shiftm",
        "est",
        *(f"soft{low}" for low in SOFT),
    ]
    for name in names:
        values = np.array([r[header.index(name)] for r in rows], dtype=float)
        diff = values - unseen
        close = (
            (float(diff[near].mean()), float(np.sqrt((diff[near] ** 2).mean()))) if near.any() else ("-", "-")
        )
        table.append(
            [
                sample,
                name,
                len(diff),
                float(diff.mean()),
                float(np.sqrt((diff**2).mean())),
                int(near.sum()),
                *close,
            ]
        )
    return table


def sweep(sample: str, sparsities: list[float], options: dict) -> list[list]:
    model_file, calib_file, test_file, name = SETS[sample]
    model, calib = SAMPLES / model_file, SAMPLES / calib_file
    with np.load(SAMPLES / test_file) as test:
        x_test, y_test = test[name], test["labels"]
    _, held = split_holdout(open_calibration(calib, load_model(model)), None, 0)
    arrays, y_held = held.arrays()
    x_held = arrays[name]
    dense = session(model)
    zd_test = logits(dense, x_test, name)
    acc_dense = float((zd_test.argmax(1) == y_test).mean())
    rows = []
    for target in sparsities:
        result = egp_onnx.compress(
            model, calib, **{"sparsity": target, "guard": False, "latency": False, **options}
        )
        small = session(result.model)
        rng = np.random.default_rng(0)
        cand = candidates(dense, small, x_held, y_held, name, rng)
        est = result.report.fidelity
        zs_test = logits(small, x_test, name)
        unseen = float((zs_test.argmax(1) == zd_test.argmax(1)).mean())
        acc = float((zs_test.argmax(1) == y_test).mean())
        rows.append(
            [sample, result.report.model.sparsity, *cand.values(),
             est.estimate if est.estimate is not None else "-", unseen, acc_dense, acc, acc - acc_dense]
        )  # fmt: skip
        print(format_table(HEADER, [rows[-1]]), flush=True)
    return rows


def strict_run(folder: Path, sample: str) -> list:
    """A strict guard on unseen eval data: the first 1000 test images, --eval-unseen,
    --min-agreement 0.995; scored on the other test images."""
    model_file, calib_file, test_file, name = SETS[sample]
    model = SAMPLES / model_file
    with np.load(SAMPLES / test_file) as test:
        x, y = test[name], test["labels"]
    np.savez(folder / "eval.npz", **{name: x[:1000], "labels": y[:1000]})
    start = time.perf_counter()
    result = egp_onnx.compress(
        model, SAMPLES / calib_file, eval_data=folder / "eval.npz", eval_unseen=True, min_agreement=0.995,
        latency=False,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    zd, zs = logits(session(model), x[1000:], name), logits(session(result.model), x[1000:], name)
    fid, report = result.report.fidelity, result.report
    return [
        sample, report.model.sparsity, len(report.steps), report.stop.reason, seconds, fid.estimate,
        f"{fid.estimate_low:.3f}-{fid.estimate_high:.3f}", float((zd.argmax(1) == zs.argmax(1)).mean()),
        float((zd.argmax(1) == y[1000:]).mean()), float((zs.argmax(1) == y[1000:]).mean()),
    ]  # fmt: skip


DEFAULT_HEADER = [
    "sample", "sparsity", "steps", "stop", "seconds", "held_agree", "estimate", "95%", "unseen_agree",
    "est-unseen", "acc_dense", "acc", "acc_diff",
]  # fmt: skip


def default_run(sample: str, options: dict) -> list:
    """The default command (``--calib`` only, plus ``options``), scored on the unseen test set."""
    model_file, calib_file, test_file, name = SETS[sample]
    model, calib = SAMPLES / model_file, SAMPLES / calib_file
    with np.load(SAMPLES / test_file) as test:
        x_test, y_test = test[name], test["labels"]
    dense = session(model)
    zd = logits(dense, x_test, name)
    start = time.perf_counter()
    report = egp_onnx.compress(model, calib, latency=False, **options)
    seconds = time.perf_counter() - start
    zs = logits(session(report.model), x_test, name)
    fid = report.report.fidelity
    unseen = float((zs.argmax(1) == zd.argmax(1)).mean())
    acc_dense, acc = float((zd.argmax(1) == y_test).mean()), float((zs.argmax(1) == y_test).mean())
    interval = f"{fid.estimate_low:.3f}-{fid.estimate_high:.3f}" if fid.estimate_low is not None else "-"
    return [
        sample, report.report.model.sparsity, len(report.report.steps), report.report.stop.reason, seconds,
        fid.top1_agreement, fid.estimate, interval, unseen, (fid.estimate or 0.0) - unseen, acc_dense, acc,
        acc - acc_dense,
    ]  # fmt: skip


HEADER = [
    "sample", "sparsity", "agree", "lcb", "low25", *(f"m{k}" for k in MARGINS), *(f"noise{s}" for s in NOISE),
    "shift", *(f"noise{s}m" for s in NOISE), "shiftm", *(f"soft{low}" for low in SOFT), "kl", "logit",
    "accdrop", "est", "unseen_agree", "acc_dense", "acc", "acc_diff",
]  # fmt: skip


def parse_options(text: str) -> dict:
    """``k=v;k=v`` as compress options: numbers, true/false, or strings (``select=obs``)."""

    def value(v: str):
        for kind in (int, float):
            try:
                return kind(v)
            except ValueError:
                pass
        return {"true": True, "false": False}.get(v.lower(), v)

    return {k: value(v) for k, v in (kv.split("=") for kv in text.split(";") if kv)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sample", choices=[*SETS, "all"], default="all")
    parser.add_argument("--sparsities", default="0.5,0.6,0.7,0.75,0.8,0.85,0.9")
    parser.add_argument("--dump", default="")
    parser.add_argument("--options", default="", help="compress options for --default and the sweep: k=v;k=v")
    parser.add_argument("--default", action="store_true", help="the default command, scored on unseen data")
    parser.add_argument("--strict", action="store_true", help="1000 unseen eval images, 0.995")
    parser.add_argument(
        "--trajectory", default="", help="guarded runs: options as k=v;k=v, runs separated by /"
    )
    args = parser.parse_args()
    if args.strict:
        import tempfile

        with tempfile.TemporaryDirectory() as folder:
            rows = [strict_run(Path(folder), s) for s in (STRICT if args.sample == "all" else [args.sample])]
        columns = ["sample", "sparsity", "steps", "stop", "seconds", "estimate", "95%", "agree_rest"]
        print(format_table([*columns, "acc_dense", "acc"], rows), flush=True)
        return
    if args.default:
        rows = [
            default_run(s, parse_options(args.options))
            for s in (SETS if args.sample == "all" else [args.sample])
        ]
        print(format_table(DEFAULT_HEADER, rows), flush=True)
        return
    if args.trajectory:
        for sample in SETS if args.sample == "all" else [args.sample]:
            rows = []
            for run in args.trajectory.split("/"):
                options = parse_options(run)
                rows += trajectory(sample, options, args.dump)
            print(format_table(["sample", "options", "kept", *HEADER[2:]], rows), flush=True)
            columns = ["sample", "candidate", "n", "bias", "rms", "n>=.975", "bias>=.975", "rms>=.975"]
            print(format_table(columns, errors(sample, rows)), flush=True)
        return
    targets = [float(s) for s in args.sparsities.split(",")]
    for sample in SETS if args.sample == "all" else [args.sample]:
        rows = sweep(sample, targets, parse_options(args.options))
        print(format_table(HEADER, rows), flush=True)


if __name__ == "__main__":
    main()
