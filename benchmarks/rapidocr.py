"""RapidOCR's three PP-OCR models (det, cls, rec) compressed with nothing but ``--calib``, end to end.

A real third-party client, run as a new user would (issue 25). Nothing downloads: the models
ship in the ``rapidocr-onnxruntime==1.4.4`` wheel, the documents are rendered here.

1. ``render``: ``--docs`` pages of English-like text lines (Pillow, the DejaVu fonts of this
   machine, several sizes and page shapes; about one line in five upside down so that the
   direction classifier has work), each line's text and box kept as the ground truth.
2. ``record``: the original pipeline reads every page while a wrapper around each of its three
   onnxruntime sessions records the exact tensors RapidOCR feeds it. The first documents are the
   calibration set, the last ``--held-out`` are held out. The recorded calibration tensors are
   written one .npy per call (``calib/<model>/``). With ``--one-shape`` (the default until
   egp-onnx reads calibration files of several shapes), det pages are cropped to the smallest
   page and rec batches padded with zeros to the widest line (RapidOCR pads a batch that way).
3. ``compress``: ``egp-onnx compress MODEL --calib calib/<model> -o ... --report ...`` for each
   model, in a child process whose peak resident memory (``wait4``) and wall time are printed.
4. ``score``: the held-out documents are read by the original pipeline, by the pipeline with each
   compressed model swapped in alone, and with all three at once, the configurations interleaved
   page by page. Per ground-truth line: does the pipeline read exactly what the original reads
   (the target: >= 99%), and its character error rate against the truth. The time per page of
   each configuration is the median over pages of its ratio to the original's time on that page.

5. ``sweep`` (det only, with ``--sweep 0.1,0.3,...``): det compressed to each fixed sparsity with
   ``--no-guard``; beside each, the guard's figures as its report gives them on the calibration
   holdout (mean region IoU at ``--map-threshold``, relative L2), the same figures on the held-out
   pages' tensors (unseen: IoU at 0.3, DBNet's binarization, and 0.5), and the pipeline with that
   det swapped in: the share of held-out lines read as the original reads them. Shows whether the
   region rule's verdicts hold on unseen pages, and where its threshold belongs.

6. ``clsdiag``: where the compressed cls model's answers differ from the original's, on the
   calibration and the held-out lines: its argmax (what the guard counts), and RapidOCR's decision
   (rotate a line when the top class is "180" with probability > ``cls_thresh`` = 0.9).

7. ``ceiling``: what post-training compression can reach at all on this client: each model
   compressed to ``--ceiling-sparsity`` (0.3) with ``--no-guard`` (so no sensitivity caps either)
   under each selection of ``--ceiling`` (EGP or magnitude budget, ``--select magnitude`` or
   ``obs``, always with the refit), read into the pipeline one at a time and all three at once,
   one selection at a time beside the original; a markdown table at the end.
   ``ceiling-compress`` only compresses (run one process per model, then ``ceiling`` reads).

8. ``recdiag`` (with ``--rec-models a.onnx,b.onnx``): each rec model against the original on the
   held-out lines' tensors, by per-position argmax agreement and by the line's greedy CTC reading.

Run: python benchmarks/rapidocr.py WORKDIR [--docs 50] [--held-out 15] [--stages render,record,compress,score]
     [--models det,cls,rec] [--egp-args "cls=--sparsity 0.3"] [--all-shapes]
     python benchmarks/rapidocr.py WORKDIR --stages sweep --sweep 0.1,0.3,0.5,0.7 (after render,record)
     python benchmarks/rapidocr.py WORKDIR --stages ceiling [--ceiling egp,magnitude+obs] (after record)
Needs: pip install 'rapidocr-onnxruntime==1.4.4' (in its own venv: it brings opencv, pyclipper and
onnxruntime 1.32, which egp-onnx accepts), then pip install -e . there: session 8 did
``python3 -m venv /work/venv-ocr && /work/venv-ocr/bin/pip install rapidocr-onnxruntime==1.4.4 &&
/work/venv-ocr/bin/pip install -e .`` (numpy 2.4, onnx 1.23, onnxruntime stays 1.32).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

MODELS = ("det", "cls", "rec")
FONTS = Path("/usr/share/fonts/truetype/dejavu")
FONT_FILES = ("DejaVuSans.ttf", "DejaVuSerif.ttf", "DejaVuSansMono.ttf", "DejaVuSans-Bold.ttf")
PAGE_SIZES = ((1000, 760), (1100, 800), (900, 760), (1000, 900))  # (width, height) in pixels
WORDS = (
    "the of and to in is was for on that with as by at from his an were are which this be or had "
    "not first one their its new after but who they has have her she two been other when there all "
    "during into school time may years more most only over city some world would where later up "
    "such used many can state about national out known university united then made 2024 1987 "
    "invoice total amount date page report number model pruning entropy layer network Paris London "
    "Berlin Tokyo March April June 42 17.5 3,200 No. 7 item price EUR USD order ref A-113 B2"
).split()


def _rapidocr_models() -> dict[str, Path]:
    import rapidocr_onnxruntime

    folder = Path(rapidocr_onnxruntime.__file__).parent / "models"
    return {
        "det": folder / "ch_PP-OCRv4_det_infer.onnx",
        "cls": folder / "ch_ppocr_mobile_v2.0_cls_infer.onnx",
        "rec": folder / "ch_PP-OCRv4_rec_infer.onnx",
    }


# ---------------------------------------------------------------------------------------- render
def render(work: Path, docs: int, seed: int) -> None:
    """Render ``docs`` pages and their ground truth (``docs/NN.png``, ``docs/truth.json``)."""
    from PIL import Image, ImageDraw, ImageFont

    rng = random.Random(seed)
    out = work / "docs"
    out.mkdir(parents=True, exist_ok=True)
    truth: list[dict[str, Any]] = []
    for number in range(docs):
        width, height = PAGE_SIZES[number % len(PAGE_SIZES)]
        page = Image.new("RGB", (width, height), "white")
        lines = []
        y = rng.randint(30, 60)
        while True:
            size = rng.choice((22, 26, 30, 34))
            font = ImageFont.truetype(str(FONTS / rng.choice(FONT_FILES)), size)
            text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 6)))
            left, top, right, bottom = font.getbbox(text)
            w, h = right - left + 8, bottom - top + 8
            x = rng.randint(30, max(31, width // 3))
            if y + h > height - 30 or x + w > width - 20:
                if y + h > height - 30:
                    break
                continue
            strip = Image.new("RGB", (w, h), "white")
            ImageDraw.Draw(strip).text((4 - left, 4 - top), text, fill=(0, 0, 0), font=font)
            flipped = rng.random() < 0.2
            if flipped:
                strip = strip.rotate(180)
            page.paste(strip, (x, y))
            lines.append({"text": text, "box": [x, y, x + w, y + h], "flipped": flipped})
            y += h + rng.randint(14, 40)
        page.save(out / f"{number:02d}.png")
        truth.append({"page": f"{number:02d}.png", "lines": lines})
    (out / "truth.json").write_text(json.dumps(truth, indent=1))
    print(f"rendered {docs} pages, {sum(len(t['lines']) for t in truth)} lines")


def _pages(work: Path) -> list[dict[str, Any]]:
    return json.loads((work / "docs" / "truth.json").read_text())


def _image(work: Path, page: str) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(work / "docs" / page).convert("RGB"))[:, :, ::-1].copy()  # BGR, as cv2


# ---------------------------------------------------------------------------------------- record
def _sessions(engine: Any) -> dict[str, Any]:
    """The three OrtInferSession objects of a RapidOCR engine, by model."""
    return {"det": engine.text_det.infer, "cls": engine.text_cls.infer, "rec": engine.text_rec.session}


def record(work: Path, held_out: int, one_shape: bool) -> None:
    """Record the tensors the original pipeline feeds each model, and its reading of every page."""
    from rapidocr_onnxruntime import RapidOCR

    engine = RapidOCR()
    recorded: dict[str, list[np.ndarray]] = {m: [] for m in MODELS}
    _record_calls()
    for name, session in _sessions(engine).items():
        session.benchmark_record = recorded[name]
    pages = _pages(work)
    calibration = len(pages) - held_out
    per_page: dict[str, list[int]] = {m: [] for m in MODELS}
    for entry in pages:
        before = {m: len(recorded[m]) for m in MODELS}
        engine(_image(work, entry["page"]))
        for m in MODELS:
            per_page[m].append(len(recorded[m]) - before[m])
    for m in MODELS:
        arrays = recorded[m]
        calib_count = sum(per_page[m][:calibration])
        calib, held = arrays[:calib_count], arrays[calib_count:]
        shapes = {a.shape[2:] for a in arrays}
        if one_shape:
            calib, held = _one_shape(m, calib), _one_shape(m, held)
        for part, tensors in (("calib", calib), ("held", held)):
            folder = work / part / m
            folder.mkdir(parents=True, exist_ok=True)
            for old in folder.glob("*.npy"):
                old.unlink()
            for i, tensor in enumerate(tensors):
                np.save(folder / f"{i:04d}.npy", tensor)
        samples = sum(a.shape[0] for a in calib)
        megabytes = sum(a.nbytes for a in calib) / 2**20
        print(
            f"{m}: {len(arrays)} calls ({len(shapes)} shapes), calibration {len(calib)} calls / {samples} "
            f"samples / {megabytes:.0f} MB" + (" (one shape)" if one_shape else "")
        )


def _record_calls() -> None:
    """Make every OrtInferSession call append its input to the session's ``benchmark_record`` list."""
    from rapidocr_onnxruntime.utils.infer_engine import OrtInferSession

    if getattr(OrtInferSession, "benchmark_hooked", False):
        return
    original = OrtInferSession.__call__

    def recording(self: Any, x: np.ndarray) -> Any:
        kept = self.__dict__.get("benchmark_record")
        if kept is not None:
            kept.append(np.array(x, dtype=np.float32, copy=True))
        return original(self, x)

    # The call syntax looks __call__ up on the class, so the hook goes there, reading a list
    # set on the instance (the three sessions are instances of the one class).
    OrtInferSession.__call__ = recording  # type: ignore[method-assign]
    OrtInferSession.benchmark_hooked = True  # type: ignore[attr-defined]


def _one_shape(model: str, tensors: list[np.ndarray]) -> list[np.ndarray]:
    """Crop det pages to the smallest page; pad rec (and cls) batches with zeros to the widest."""
    if not tensors:
        return tensors
    if model == "det":
        h = min(t.shape[2] for t in tensors)
        w = min(t.shape[3] for t in tensors)
        return [np.ascontiguousarray(t[:, :, :h, :w]) for t in tensors]
    width = max(t.shape[3] for t in tensors)
    return [np.pad(t, ((0, 0), (0, 0), (0, 0), (0, width - t.shape[3]))) for t in tensors]


# -------------------------------------------------------------------------------------- compress
def compress(work: Path, models: list[str], egp_args: dict[str, list[str]]) -> None:
    """Compress each model with ``egp-onnx compress --calib``; print exit code, peak memory, time."""
    sources = _rapidocr_models()
    out = work / "compressed"
    out.mkdir(exist_ok=True)
    for m in models:
        target = out / f"{m}.onnx"
        report = out / f"{m}.json"
        command = [
            sys.executable, "-m", "egp_onnx", "compress", str(sources[m]), "--calib", str(work / "calib" / m),
            "-o", str(target), "--report", str(report), "--force", *egp_args.get(m, []),
        ]  # fmt: skip
        code, seconds, peak = _compress_child(command, out / f"{m}.log")
        summary = ""
        if report.exists() and code == 0:
            data = json.loads(report.read_text())
            cost = data["cost"]
            summary = (
                f"sparsity {data['model']['sparsity']:.3f}, params {cost['before']['params']} -> "
                f"{cost['after']['params']}, held-out agreement {data['fidelity']['top1_agreement']}, "
                f"rel error {data['fidelity']['rel_error']:.4f}, stop: {data['stop']['reason']}"
            )
        tail = (out / f"{m}.log").read_text().strip().splitlines()[-1:] if code else []
        print(f"{m}: exit {code}, {seconds:.0f} s, peak {peak:.2f} GB {summary} {' '.join(tail)}")


# ----------------------------------------------------------------------------------------- sweep
def sweep(
    work: Path, held_out: int, sparsities: list[float], egp_args: list[str], guarded: bool = False
) -> None:
    """det at fixed sparsities, unguarded: the guard's figures on the holdout beside the pipeline's.

    ``guarded``: keep the guard (and its per-layer sensitivity caps), with the thresholds in ``egp_args``.
    """
    import onnxruntime as ort
    from rapidocr_onnxruntime import RapidOCR

    from egp_onnx.verify.fidelity import region_iou

    source = _rapidocr_models()["det"]
    out = work / "compressed" / "sweep"
    out.mkdir(parents=True, exist_ok=True)
    pages = _pages(work)[-held_out:]
    images = [_image(work, entry["page"]) for entry in pages]
    lines = [entry["lines"] for entry in pages]
    original = [_read_lines(RapidOCR()(image)[0], page) for image, page in zip(images, lines, strict=True)]
    held = [np.load(f) for f in sorted((work / "held" / "det").glob("*.npy"))]
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    reference = ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])
    name = reference.get_inputs()[0].name
    maps = [reference.run(None, {name: x})[0] for x in held]
    del reference
    header = (
        "sparsity  seconds  peak_GB  hold_iou  hold_se  hold_worst  hold_rel  unseen_iou.3  unseen_worst.3  "
        "unseen_iou.5  unseen_rel  same_lines  cer"
    )
    print(f"{len(pages)} held-out pages, {sum(len(p) for p in lines)} lines; {len(held)} det tensors")
    print(header)
    print("-" * len(header))
    truth = [line["text"] for page in lines for line in page]
    for sparsity in sparsities:
        stem = "-".join(
            ["det", *(a.lstrip("-") for a in egp_args), *([] if guarded else ["noguard"]), f"{sparsity:g}"]
        )
        target, report = out / f"{stem}.onnx", out / f"{stem}.json"
        command = [
            sys.executable, "-m", "egp_onnx", "compress", str(source), "--calib", str(work / "calib" / "det"),
            "-o", str(target), "--report", str(report), "--force", *([] if guarded else ["--no-guard"]),
            "--sparsity", str(sparsity), "--no-latency", *egp_args,
        ]  # fmt: skip
        code, seconds, peak = _compress_child(command, out / f"{stem}.log")
        if code != 0:
            print(f"{sparsity:8.3f}  exit {code}, see {out / f'{stem}.log'}")
            continue
        data = json.loads(report.read_text())
        fid = data["fidelity"]["outputs"][0]
        session = ort.InferenceSession(str(target), options, providers=["CPUExecutionProvider"])
        got = [session.run(None, {name: x})[0] for x in held]
        del session
        iou3 = np.concatenate([region_iou(r, c, 0.3) for r, c in zip(maps, got, strict=True)])
        iou5 = np.concatenate([region_iou(r, c, 0.5) for r, c in zip(maps, got, strict=True)])
        diff = sum(float(((r.astype(np.float64) - c) ** 2).sum()) for r, c in zip(maps, got, strict=True))
        rel = (diff / sum(float((r.astype(np.float64) ** 2).sum()) for r in maps)) ** 0.5
        engine = RapidOCR(det_model_path=str(target))
        reads = [_read_lines(engine(image)[0], page) for image, page in zip(images, lines, strict=True)]
        flat, base = [t for r in reads for t in r], [t for r in original for t in r]
        same = float(np.mean([a == b for a, b in zip(flat, base, strict=True)]))
        print(
            f"{data['model']['sparsity']:8.3f}  {seconds:7.0f}  {peak:7.2f}  {fid['iou']:8.4f}  "
            f"{fid['iou_se']:7.4f}  {fid['iou_worst']:10.4f}  {fid['rel_error']:8.4f}  {iou3.mean():12.4f}  "
            f"{iou3.min():14.4f}  {iou5.mean():12.4f}  {rel:10.4f}  {same:10.3f}  {_cer(flat, truth):.4f}",
            flush=True,
        )
    print(f"original: CER {_cer([t for r in original for t in r], truth):.4f} against the truth")


def _cer(got: list[str], truth: list[str]) -> float:
    return sum(_edit_distance(g, t) for g, t in zip(got, truth, strict=True)) / sum(len(t) for t in truth)


# -------------------------------------------------------------------------------------- clsdiag
CLS_THRESH = 0.9  # RapidOCR 1.4.4's config.yaml: a line is turned when "180" scores above this


def cls_diagnosis(work: Path) -> None:
    """The compressed cls model against the original: argmax and RapidOCR's rotate decision, per line."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    sessions = [
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        for path in (_rapidocr_models()["cls"], work / "compressed" / "cls.onnx")
    ]
    name = sessions[0].get_inputs()[0].name
    print("data   lines  argmax_agree  decision_agree  turned_orig  turned_comp  near_thresh_orig")
    for part in ("calib", "held"):
        tensors = [np.load(f) for f in sorted((work / part / "cls").glob("*.npy"))]
        probs = [np.concatenate([s.run(None, {name: x})[0] for x in tensors]) for s in sessions]
        # labels ["0", "180"]: the decision is to turn where class 1 wins with p > CLS_THRESH
        top = [p.argmax(1) for p in probs]
        turn = [(t == 1) & (p.max(1) > CLS_THRESH) for t, p in zip(top, probs, strict=True)]
        near = float(np.mean(np.abs(probs[0][:, 1] - CLS_THRESH) < 0.05))
        agree, decided = np.mean(top[0] == top[1]), np.mean(turn[0] == turn[1])
        print(
            f"{part:5}  {len(top[0]):5d}  {agree:12.4f}  {decided:14.4f}  "
            f"{turn[0].sum():11d}  {turn[1].sum():11d}  {near:16.4f}"
        )


# -------------------------------------------------------------------------------------- recdiag
def rec_diagnosis(work: Path, models: list[Path]) -> None:
    """Each rec model against the original on the held-out lines' tensors: per position and per reading.

    Per position: argmax agreement over every position of every line (the guard's rule before
    session 9). Per reading: the line's greedy CTC reading is the same (the guard's rule since),
    plainly and counting near-flips; what the pipeline with that rec swapped in should read.
    """
    import onnxruntime as ort

    from egp_onnx.verify.fidelity import MARGIN_SCALE, sequence_agreement

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    tensors = [np.load(f) for f in sorted((work / "held" / "rec").glob("*.npy"))]

    def outputs(path: Path) -> list[np.ndarray]:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return [session.run(None, {name: x})[0].astype(np.float64) for x in tensors]

    reference = outputs(_rapidocr_models()["rec"])
    print("model  lines  per_position  readings  readings_near_flips")
    for path in models:
        got = outputs(path)
        same = sum(int((r.argmax(-1) == c.argmax(-1)).sum()) for r, c in zip(reference, got, strict=True))
        positions = sum(r.shape[0] * r.shape[1] for r in reference)
        counts = [sequence_agreement(r, c, MARGIN_SCALE) for r, c in zip(reference, got, strict=True)]
        lines = sum(len(a) for a, _ in counts)
        agree, kept = sum(int(a.sum()) for a, _ in counts), sum(int(k.sum()) for _, k in counts)
        print(f"{path.stem}  {lines}  {same / positions:.4f}  {agree / lines:.4f}  {kept / lines:.4f}")


# ----------------------------------------------------------------------------------------- score
def _edit_distance(a: str, b: str) -> int:
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


def _read_lines(result: Any, lines: list[dict[str, Any]]) -> list[str]:
    """What the pipeline read on each ground-truth line: its boxes whose centre lies in the line's box."""
    found: list[list[tuple[float, str]]] = [[] for _ in lines]
    for box, text, _score in result or []:
        points = np.asarray(box, dtype=np.float64)
        cx, cy = points[:, 0].mean(), points[:, 1].mean()
        for i, line in enumerate(lines):
            x0, y0, x1, y1 = line["box"]
            if x0 - 4 <= cx <= x1 + 4 and y0 - 4 <= cy <= y1 + 4:
                found[i].append((cx, text))
                break
    return [" ".join(t for _, t in sorted(parts)) for parts in found]


def _swaps(paths: dict[str, Path]) -> dict[str, dict[str, str]]:
    """The original, each model of ``paths`` swapped in alone, and all of them at once."""
    configs: dict[str, dict[str, str]] = {"original": {}}
    for m, path in paths.items():
        configs[f"{m} swapped"] = {f"{m}_model_path": str(path)}
    if len(paths) > 1:
        configs["all swapped"] = {f"{m}_model_path": str(path) for m, path in paths.items()}
    return configs


def score(work: Path, held_out: int, models: list[str]) -> dict[str, Any]:
    """Read the held-out pages with each compressed model swapped in; print line agreement, CER, time."""
    compressed = work / "compressed"
    paths = {m: compressed / f"{m}.onnx" for m in models if (compressed / f"{m}.onnx").exists()}
    figures = read_held_out(work, held_out, _swaps(paths))
    (work / "score.json").write_text(json.dumps(figures, indent=1))
    return figures


def read_held_out(work: Path, held_out: int, configs: dict[str, dict[str, str]]) -> dict[str, Any]:
    """Read the held-out pages with each configuration (RapidOCR keyword arguments), interleaved."""
    from rapidocr_onnxruntime import RapidOCR

    engines = {}
    for name, paths in configs.items():
        try:
            engines[name] = RapidOCR(**paths)
        except Exception as exc:  # a model the client cannot load is a result, not a crash
            print(f"{name}: RapidOCR cannot load it: {type(exc).__name__}: {exc}")
    pages = _pages(work)[-held_out:]
    reads: dict[str, list[str]] = {n: [] for n in engines}
    times: dict[str, list[float]] = {n: [] for n in engines}
    truth: list[str] = []
    for entry in pages:
        image = _image(work, entry["page"])
        for engine in engines.values():  # warm-up on the page, so that no configuration runs it first cold
            engine(image)
        for name, engine in engines.items():
            start = time.perf_counter()
            result, _ = engine(image)
            times[name].append(time.perf_counter() - start)
            reads[name].extend(_read_lines(result, entry["lines"]))
        truth.extend(line["text"] for line in entry["lines"])
    base = reads.get("original")
    figures: dict[str, Any] = {}
    print(f"{len(pages)} held-out pages, {len(truth)} lines")
    for name in engines:
        got = reads[name]
        cer = sum(_edit_distance(g, t) for g, t in zip(got, truth, strict=True)) / sum(len(t) for t in truth)
        exact_truth = float(np.mean([g == t for g, t in zip(got, truth, strict=True)]))
        same = float(np.mean([g == o for g, o in zip(got, base, strict=True)])) if base else float("nan")
        ratio = float(np.median(np.array(times[name]) / np.array(times["original"]))) if base else np.nan
        figures[name] = {"same_as_original": same, "exact_vs_truth": exact_truth, "cer": cer, "time": ratio}
        print(
            f"{name:>12}: same as original {same:.3f}, exact vs truth {exact_truth:.3f}, CER {cer:.4f}, "
            f"time x{ratio:.2f} (median per page {np.median(times[name]) * 1000:.0f} ms)"
        )
    return figures


# --------------------------------------------------------------------------------------- ceiling
CEILING_CONFIGS = {
    "egp": ["--method", "egp", "--select", "magnitude"],
    "egp+obs": ["--method", "egp", "--select", "obs"],
    "magnitude": ["--method", "magnitude", "--select", "magnitude"],
    "magnitude+obs": ["--method", "magnitude", "--select", "obs"],
}


def _compress_child(command: list[str], log_path: Path) -> tuple[int, float, float]:
    """Run one compress command; its exit code, wall seconds and peak resident GB (``wait4``: KiB)."""
    start = time.perf_counter()
    with open(log_path, "w") as log:
        child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(child.pid, 0)
    return os.waitstatus_to_exitcode(status), time.perf_counter() - start, usage.ru_maxrss / 2**20


def ceiling(
    work: Path,
    held_out: int,
    models: list[str],
    sparsity: float,
    configs: list[str],
    extra: list[str],
    read: bool = True,
) -> None:
    """What post-training compression can reach at all: the guard off, every selection, swapped in.

    Each model compressed to ``sparsity`` with ``--no-guard`` (with the refit) under each of
    ``CEILING_CONFIGS``, then read into the pipeline one model at a time and all three at once,
    one configuration group at a time (the original read beside each, for the time ratios).
    A model already written is not compressed again; ``read`` False only compresses (so that
    the models can be compressed in parallel processes, then read in one).
    """
    source = _rapidocr_models()
    out = work / "compressed" / "ceiling"
    out.mkdir(parents=True, exist_ok=True)
    rows: dict[str, Any] = {}
    for config in configs:
        paths: dict[str, Path] = {}
        for m in models:
            stem = f"{m}-{config}-{sparsity:g}"
            target, report = out / f"{stem}.onnx", out / f"{stem}.json"
            if not target.exists():
                command = [
                    sys.executable, "-m", "egp_onnx", "compress", str(source[m]), "--calib",
                    str(work / "calib" / m), "-o", str(target), "--report", str(report), "--force",
                    "--no-guard", "--sparsity", str(sparsity), "--no-latency", *CEILING_CONFIGS[config],
                    *extra,
                ]  # fmt: skip
                code, seconds, peak = _compress_child(command, out / f"{stem}.log")
                print(f"{stem}: exit {code}, {seconds:.0f} s, peak {peak:.2f} GB", flush=True)
                if code != 0:
                    continue
            data = json.loads(report.read_text())
            rows[stem] = {"sparsity": data["model"]["sparsity"], "guard": _guard_figure(data)}
            print(f"{stem}: sparsity {rows[stem]['sparsity']:.3f}, {rows[stem]['guard']}", flush=True)
            paths[m] = target
        if not read:
            continue
        print(f"== {config}", flush=True)
        for name, figure in read_held_out(work, held_out, _swaps(paths)).items():
            rows[f"{config}: {name}"] = figure
        (work / "ceiling.json").write_text(json.dumps(rows, indent=1))
    if read:
        _ceiling_table(rows, configs, models, sparsity)


def _guard_figure(report: dict[str, Any]) -> str:
    """The report's holdout figure for the model's output, by its kind (what the guard would judge)."""
    out = report["fidelity"]["outputs"][0]
    if out["kind"] == "probability":
        return f"IoU {out['iou']:.4f}"
    if out.get("positions"):
        return f"agreement {out['agreement']:.4f}, kept {1 - out['flips'] / out['positions']:.4f}"
    return f"rel error {out['rel_error']:.4f}"


def _ceiling_table(rows: dict[str, Any], configs: list[str], models: list[str], sparsity: float) -> None:
    """The ceiling as a markdown table: per configuration and swap, lines as the original, CER, time."""
    print(f"\n| selection (--no-guard --sparsity {sparsity:g}) | swapped | sparsity | holdout (report) "
          "| same lines | CER | time |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for config in configs:
        for name in ["original", *(f"{m} swapped" for m in models), "all swapped"]:
            figure = rows.get(f"{config}: {name}")
            if figure is None:
                continue
            model = name.split()[0]
            stem = rows.get(f"{model}-{config}-{sparsity:g}", {})
            spars = f"{stem['sparsity']:.3f}" if stem else ""
            print(
                f"| {config} | {name} | {spars} | {stem.get('guard', '')} | {figure['same_as_original']:.3f} "
                f"| {figure['cer']:.4f} | x{figure['time']:.2f} |"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("work", type=Path, help="folder for the documents, tensors, models and figures")
    parser.add_argument("--docs", type=int, default=50)
    parser.add_argument("--held-out", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stages", default="render,record,compress,score")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--all-shapes", action="store_true", help="record tensors as they come (no crop/pad)")
    parser.add_argument(
        "--egp-args", action="append", default=[], help='compress options for one model: "cls=--sparsity 0.3"'
    )
    parser.add_argument("--sweep", default="0.1,0.3,0.5,0.7", help="det sparsities of the sweep stage")
    parser.add_argument("--ceiling", default=",".join(CEILING_CONFIGS), help="ceiling stage: selections")
    parser.add_argument("--ceiling-sparsity", type=float, default=0.3)
    parser.add_argument("--rec-models", default="", help="recdiag stage: rec models to compare (comma list)")
    parser.add_argument("--sweep-guarded", action="store_true", help="sweep with the guard (and its caps) on")
    args = parser.parse_args()
    stages = args.stages.split(",")
    models = [m for m in args.models.split(",") if m]
    extra = {}
    for item in args.egp_args:
        model, _, options = item.partition("=")
        extra[model] = shlex.split(options)
    args.work.mkdir(parents=True, exist_ok=True)
    if "render" in stages:
        render(args.work, args.docs, args.seed)
    if "record" in stages:
        record(args.work, args.held_out, one_shape=not args.all_shapes)
    if "compress" in stages:
        compress(args.work, models, extra)
    if "score" in stages:
        score(args.work, args.held_out, models)
    if "clsdiag" in stages:
        cls_diagnosis(args.work)
    if "recdiag" in stages:
        rec_diagnosis(args.work, [Path(m) for m in args.rec_models.split(",") if m])
    if "ceiling" in stages or "ceiling-compress" in stages:
        configs = [c for c in args.ceiling.split(",") if c]
        read = "ceiling" in stages
        ceiling(args.work, args.held_out, models, args.ceiling_sparsity, configs, extra.get("all", []), read)
    if "sweep" in stages:
        sparsities = [float(v) for v in args.sweep.split(",")]
        sweep(args.work, args.held_out, sparsities, extra.get("det", []), args.sweep_guarded)


if __name__ == "__main__":
    main()
