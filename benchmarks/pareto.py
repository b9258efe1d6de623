"""What a deployment gets: dense, INT8 alone, egp-onnx, egp-onnx then INT8, and with --channels.

On the MNIST and digits samples (real images; accuracy and agreement with the dense model on
their unseen test splits) and on the generated ResNet-style and MobileNet-style nets (random
weights and inputs: speed and size only), each variant's MACs (of the graph, dense), its file
deflated by zlib at level 9 (what a download or an app bundle pays), and its onnxruntime CPU
latency at batch 1 and 32 with 1 and 2 intra-op threads, as a ratio to the dense model
(speed = dense median / variant median). The variants of one model are timed interleaved in one
run: round after round, each variant runs once, in an order that rotates, so a busy neighbour
slows them alike; the 10th percentile of each (:data:`PERCENTILE`).

Variants (egp-onnx with its defaults on the samples: ``--calib`` only, the default guard on an
automatic holdout of the calibration data; on the random-weight nets ``--sparsity 0.9 --no-guard``,
as they have no class to keep):

- dense: the model as given.
- INT8 alone: one ``quantize_static`` call on the dense model, what a user would do instead
  (after ``quant_pre_process``; the same scheme as ``--quantize int8``: QDQ, per-channel int8
  weights, uint8 activations, MinMax over the whole calibration file).
- egp-onnx: ``compress(model, calib)``.
- egp-onnx + INT8: ``compress(model, calib, quantize="int8")``.
- --channels, --channels --quantize int8: when ``Settings`` has a ``channels`` field (channel
  removal, another branch); else the rows say "n/a (--channels not available)".

With ``--torch-model file.py:factory --train PATH [--epochs N --lr X --distill W --temperature T]``
every compress run of the first sample in ``--models`` is finetuned (``ClassificationFinetune``,
a fresh module from the factory per run) after each channel step and each weight step. The
training images must not be the calibration file's (the guard's holdout is split from it):
benchmarks/finetune_split.py makes such a file for MNIST and Fashion-MNIST. ``--only-channels``
times dense, INT8 alone and the two ``--channels`` variants only.

Run: nice -n 10 python benchmarks/pareto.py [--budget 3]
     [--models mnist,digits,fashion,fashion_wide,fashion_wide_4000,resnet,mobilenet] (any sample of
      benchmarks/samples.py)
     [--torch-model sample_models/mnist_torch.py:factory --train mnist_finetune.npz --epochs 1
      --lr 3e-4 --only-channels]
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import quant_pre_process, quantize_static

import egp_onnx
from egp_onnx.config import Settings
from egp_onnx.errors import EgpError
from egp_onnx.report.render import format_table
from egp_onnx.runtime.quantize import INT8_ARGUMENTS, FeedReader
from egp_onnx.runtime.session import MEASURE, make_session
from egp_onnx.verify.cost import deflate_size, model_cost

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from samples import SAMPLES, SETS  # noqa: E402

HAS_CHANNELS = "channels" in {f.name for f in dataclasses.fields(Settings)}
VARIANTS = ("dense", "INT8 alone", "egp-onnx", "egp-onnx + INT8", "--channels", "--channels + INT8")
BATCHES = (1, 32)
THREADS = (1, 2)
#: The latency of a variant is this percentile of its runs. On a loaded machine a run of a few
#: milliseconds is often preempted: the median then measures the neighbours (the MNIST sample at
#: batch 32 read 2.2 ms at the 10th percentile and 6 ms at the median, with a 10.5 ms 90th, at
#: load 10 on 2 cores); a low percentile is the run that got the core.
PERCENTILE = 10


@dataclasses.dataclass
class Case:
    """One model with its data: calibration feeds, and the unseen test split when it has one."""

    name: str
    model: onnx.ModelProto
    calib: Path
    input_name: str
    shape: tuple[int, ...]  # one sample's
    test: tuple[np.ndarray, np.ndarray] | None  # (inputs, labels)
    options: dict[str, object] = dataclasses.field(default_factory=dict)  # egp-onnx's, beyond the defaults


def cases(folder: Path, names: list[str]) -> list[Case]:
    from models import mobilenet, resnet

    out = []
    for name in [n for n in names if n in SETS]:
        model_file, calib_file, test_file, key = SETS[name]
        test = np.load(SAMPLES / test_file)
        out.append(
            Case(
                name,
                onnx.load(str(SAMPLES / model_file)),
                SAMPLES / calib_file,
                key,
                tuple(test[key].shape[1:]),
                (test[key], test["labels"]),
            )
        )
    rng = np.random.default_rng(0)
    for name, build in (("resnet", resnet), ("mobilenet", mobilenet)):
        if name not in names:
            continue
        calib = folder / f"{name}_calib.npz"
        np.savez(calib, x=rng.normal(size=(256, 3, 32, 32)).astype(np.float32))
        # random weights answer random inputs with no class to keep: no guard, a fixed sparsity
        options = {"sparsity": 0.9, "guard": False}
        size = 64 if name == "mobilenet" else 32  # at 32x32 it is 0.37 M MACs: onnxruntime overhead alone
        np.savez(calib, x=rng.normal(size=(256, 3, size, size)).astype(np.float32))
        model = build(size=size)
        out.append(Case(f"{name} (random weights)", model, calib, "x", (3, size, size), None, options))
    return out


def int8_alone(case: Case, folder: Path) -> onnx.ModelProto:
    """One quantize_static call on the dense model (after onnxruntime's pre-processing)."""
    source, prepared, output = (folder / f"{case.name.split()[0]}_{n}.onnx" for n in ("in", "pre", "int8"))
    onnx.save(case.model, source)
    quant_pre_process(source, prepared, skip_symbolic_shape=True)
    data = np.load(case.calib)[case.input_name]
    feeds = ({case.input_name: data[i : i + 32]} for i in range(0, len(data), 32))
    quantize_static(prepared, output, FeedReader(feeds), **INT8_ARGUMENTS)
    return onnx.load(output)


@dataclasses.dataclass(frozen=True)
class Finetuning:
    """--torch-model and its training options: a fresh callback per compress run."""

    factory: str
    train: Path
    epochs: int
    lr: float
    distill: float = 0.0
    temperature: float = 1.0
    freeze_bn: bool = False

    def callback(self) -> object:
        from egp_onnx.cli.plugins import load_attribute
        from egp_onnx.integrations.torch import ClassificationFinetune

        module = load_attribute(self.factory, "--torch-model")()
        return ClassificationFinetune(
            module,
            self.train,
            epochs=self.epochs,
            lr=self.lr,
            distill=self.distill,
            temperature=self.temperature,
            freeze_bn=self.freeze_bn,
        )


def variants(
    case: Case, folder: Path, finetuning: Finetuning | None = None, only_channels: bool = False
) -> tuple[dict[str, onnx.ModelProto | str], dict[str, str]]:
    """The models of each variant (a string: why there is none), and notes from the reports."""
    models: dict[str, onnx.ModelProto | str] = {"dense": case.model}
    notes: dict[str, str] = {}
    began = time.perf_counter()
    models["INT8 alone"] = int8_alone(case, folder)
    notes["INT8 alone"] = f"{time.perf_counter() - began:.1f} s"
    runs: dict[str, dict[str, object]] = {"egp-onnx": {}, "egp-onnx + INT8": {"quantize": "int8"}}
    if only_channels:
        runs = {}
        models["egp-onnx"] = models["egp-onnx + INT8"] = "not run (--only-channels)"
    if HAS_CHANNELS:
        runs["--channels"] = {"channels": True}
        runs["--channels + INT8"] = {"channels": True, "quantize": "int8"}
    else:
        models["--channels"] = models["--channels + INT8"] = "n/a (--channels not available)"
    for variant, options in runs.items():
        began = time.perf_counter()
        if finetuning is not None:
            options = {**options, "finetune": finetuning.callback()}
        try:
            result = egp_onnx.compress(case.model, case.calib, latency=False, **case.options, **options)
        except EgpError as exc:  # e.g. the guard refuses even the first step: nothing to time
            models[variant] = f"none written: {exc}"[:160]
            notes[variant] = f"{time.perf_counter() - began:.1f} s; {type(exc).__name__}"
            continue
        r = result.report
        m = r.model
        note = f"{time.perf_counter() - began:.1f} s; sparsity {m.sparsity:.3f}, depth {m.depth_before}->"
        note += f"{m.depth_after}, stop {r.stop.reason}"
        if r.channels is not None:
            ch = r.channels
            accepted = sum(step.accepted for step in ch.steps)
            note += f"; channels {ch.removed} removed, {accepted}/{len(ch.steps)} steps kept, stop {ch.stop}"
        if r.quantization is not None and not r.quantization.applied:
            note += f"; INT8 NOT APPLIED: {r.quantization.reason}"
        notes[variant] = note
        models[variant] = result.model
    return models, notes


def unseen(case: Case, models: dict[str, onnx.ModelProto]) -> dict[str, tuple[float, float]]:
    """(accuracy, agreement with dense) on the test split."""
    assert case.test is not None
    x, labels = case.test
    predictions = {}
    for variant, model in models.items():
        session = make_session(model, MEASURE)
        outs = [session.run(None, {case.input_name: x[i : i + 500]})[0] for i in range(0, len(x), 500)]
        predictions[variant] = np.concatenate(outs).argmax(1)
    dense = predictions["dense"]
    return {v: (float((p == labels).mean()), float((p == dense).mean())) for v, p in predictions.items()}


def latency(
    case: Case, models: dict[str, onnx.ModelProto], threads: int, batch: int, budget: float
) -> dict[str, float]:
    """:data:`PERCENTILE` ms per variant, all timed interleaved (rotating order) after a warm-up."""
    rng = np.random.default_rng(batch)
    feed = {case.input_name: rng.normal(size=(batch, *case.shape)).astype(np.float32)}
    if case.test is not None:
        feed = {case.input_name: case.test[0][:batch]}
    names = list(models)
    sessions = [make_session(models[n], MEASURE, threads=threads) for n in names]
    for session in sessions:
        for _ in range(3):
            session.run(None, feed)
    times: list[list[float]] = [[] for _ in names]
    start, rounds = time.perf_counter(), 0
    while rounds < 5 or (time.perf_counter() - start < budget and rounds < 2000):
        order = range(len(names))
        shift = rounds % len(names)
        for k in [*order[shift:], *order[:shift]]:
            began = time.perf_counter()
            sessions[k].run(None, feed)
            times[k].append(time.perf_counter() - began)
        rounds += 1
    return {n: float(np.percentile(t, PERCENTILE)) * 1000 for n, t in zip(names, times, strict=True)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=3.0, help="seconds of interleaved runs per cell")
    parser.add_argument("--models", default="mnist,digits,resnet,mobilenet")
    parser.add_argument("--torch-model", help="file.py:factory: finetune the first model's runs")
    parser.add_argument(
        "--train", type=Path, help="training images for --torch-model (not the calibration's)"
    )
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--distill", type=float, default=0.0, help="distillation weight (--torch-model)")
    parser.add_argument("--temperature", type=float, default=1.0, help="distillation temperature")
    parser.add_argument("--freeze-bn", action="store_true", help="BatchNorm in eval mode while finetuning")
    parser.add_argument("--only-channels", action="store_true", help="skip the egp-onnx variants")
    args = parser.parse_args()
    if (args.torch_model is None) != (args.train is None):
        parser.error("give --torch-model and --train together")
    finetuning = (
        Finetuning(
            args.torch_model, args.train, args.epochs, args.lr, args.distill, args.temperature, args.freeze_bn
        )
        if args.torch_model is not None
        else None
    )
    ort.set_default_logger_severity(3)
    logging.getLogger("egp_onnx").setLevel(
        logging.ERROR
    )  # the guard's stop lines; notes say where it stopped
    logging.getLogger().setLevel(logging.ERROR)  # onnxruntime.quantization logs through the root logger
    began = time.perf_counter()
    summary = []
    with tempfile.TemporaryDirectory(prefix="egp-pareto-") as tmp:
        folder = Path(tmp)
        for number, case in enumerate(cases(folder, args.models.split(","))):
            tuned = finetuning if number == 0 else None  # the factory builds one network
            built, notes = variants(case, folder, tuned, args.only_channels)
            if tuned is not None:
                how = f"{tuned.epochs} epoch(s) a step, lr {tuned.lr}"
                if tuned.distill > 0:
                    how += f", distill {tuned.distill} at T {tuned.temperature}"
                if tuned.freeze_bn:
                    how += ", BatchNorm frozen"
                print(f"\n{case.name}: finetuned by {tuned.factory} on {tuned.train}, {how}")
            models = {v: m for v, m in built.items() if isinstance(m, onnx.ModelProto)}
            accuracy = unseen(case, models) if case.test is not None else {}
            shapes = {case.input_name: (1, *case.shape)}
            speed: dict[tuple[int, int], dict[str, float]] = {}
            for threads in THREADS:
                for batch in BATCHES:
                    speed[threads, batch] = latency(case, models, threads, batch, args.budget)
            rows = []
            for variant in VARIANTS:
                model = built[variant]
                if not isinstance(model, onnx.ModelProto):
                    rows.append([variant, model, *[""] * 7])
                    continue
                cost = model_cost(model, shapes)
                acc, agree = accuracy.get(variant, (None, None))
                ratios = [speed[t, b]["dense"] / speed[t, b][variant] for t in THREADS for b in BATCHES]
                rows.append([variant, acc, agree, (cost.macs or 0) / 1e6, deflate_size(model) / 1e6, *ratios])
            print(f"\n## {case.name}")
            headers = ["variant", "unseen acc", "agreement", "MACs (M)", "deflate MB"]
            headers += [f"speed t{t} b{b}" for t in THREADS for b in BATCHES]
            print(format_table(headers, rows))
            dense_ms = ", ".join(f"t{t} b{b} {speed[t, b]['dense']:.3f} ms" for t in THREADS for b in BATCHES)
            print(f"dense, {PERCENTILE}th percentile: {dense_ms}")
            for variant, note in notes.items():
                print(f"  {variant}: {note}")
            summary.append((case, built, accuracy, speed))
        print("\n## targets (--quantize int8 against INT8 alone; accuracy against dense, unseen)")
        target_rows = []
        for case, built, accuracy, speed in summary:
            if isinstance(built["--channels"], onnx.ModelProto):
                vs_dense = [
                    speed[t, b]["dense"] / speed[t, b]["--channels"] for t in THREADS for b in BATCHES
                ]
                lost = (accuracy["dense"][0] - accuracy["--channels"][0]) * 100 if accuracy else None
                b32 = [speed[t, 32]["dense"] / speed[t, 32]["--channels"] for t in THREADS]
                print(
                    f"{case.name} --channels vs dense: {min(vs_dense):.3f}-{max(vs_dense):.3f}x (batch 32: "
                    f"{', '.join(f'{r:.3f}' for r in b32)}; target >= 1.5), pt lost "
                    f"{'n/a' if lost is None else f'{lost:.2f}'} (target <= 0.5)"
                )
            for variant in ("egp-onnx + INT8", "--channels + INT8"):
                model = built[variant]
                if not isinstance(model, onnx.ModelProto):
                    target_rows.append([case.name, variant, model, "", "", ""])
                    continue
                alone = built["INT8 alone"]
                assert isinstance(alone, onnx.ModelProto)
                vs_int8 = [speed[t, b]["INT8 alone"] / speed[t, b][variant] for t in THREADS for b in BATCHES]
                smaller = deflate_size(alone) / deflate_size(model)
                lost = (accuracy["dense"][0] - accuracy[variant][0]) * 100 if variant in accuracy else None
                target_rows.append([case.name, variant, min(vs_int8), max(vs_int8), smaller, lost])
        print(
            format_table(
                [
                    "model",
                    "variant",
                    "speed vs INT8 alone, worst cell (>= 1.3)",
                    "best cell",
                    "deflate vs INT8 (>= 5)",
                    "pt lost (<= 0.5)",
                ],
                target_rows,
            )
        )
    print(
        f"\nmachine: {platform.machine()}, {os.cpu_count()} cores, onnxruntime {ort.__version__}, "
        f"sessions ORT_ENABLE_ALL, idle threads not spinning; {args.budget} s of interleaved rounds per "
        f"cell; load average at the end {os.getloadavg()[0]:.2f}; "
        f"whole run {time.perf_counter() - began:.0f} s"
    )


if __name__ == "__main__":
    main()
