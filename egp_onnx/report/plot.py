"""A picture of a compression run (matplotlib, an optional extra: pip install 'egp-onnx[plot]')."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import numpy as np

from egp_onnx.errors import ConfigError, one_line
from egp_onnx.report.records import CompressionReport

#: The file types --plot writes, taken from the suffix (matplotlib's raster ones go through Pillow).
PLOT_FORMATS = ("png", "pdf", "svg", "jpg", "jpeg", "tif", "tiff", "webp", "eps", "ps")

#: Metadata that keeps the file byte-identical between runs (no dates, no version strings).
_STABLE_METADATA: dict[str, dict[str, None]] = {
    "png": {"Software": None},
    "pdf": {"Creator": None, "Producer": None, "CreationDate": None},
    "svg": {"Creator": None, "Date": None},
}


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot as plt
    except ImportError as exc:
        raise ConfigError("--plot needs matplotlib: pip install 'egp-onnx[plot]'") from exc
    return plt


def plot_format(path: str | os.PathLike[str]) -> str:
    """The file type ``path``'s suffix asks for, once matplotlib is known to be there.

    Raises:
        ConfigError: matplotlib is missing, or it cannot write that suffix.

    """
    _pyplot()
    suffix = Path(path).suffix.lower().lstrip(".")
    if suffix not in PLOT_FORMATS:
        raise ConfigError(
            f"--plot {path}: cannot draw a {'.' + suffix if suffix else 'suffix-less'} file; "
            f"end the name in one of .{', .'.join(PLOT_FORMATS)}"
        )
    return suffix


def render_plot(report: CompressionReport, file_format: str = "png") -> bytes:
    """Per-layer entropy and kept weights before/after, and the loop's sparsity-vs-agreement curve."""
    plt = _pyplot()
    layers = report.layers
    names = [layer.name for layer in layers]
    x = np.arange(len(layers))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5), constrained_layout=True)
    ax = axes[0]
    ax.bar(x - 0.2, [layer.entropy_before for layer in layers], 0.4, label="before")
    ax.bar(x + 0.2, [layer.entropy for layer in layers], 0.4, label="after")
    ax.set(title="ReLU entropy per layer", ylabel="entropy (bits)", ylim=(0, 1.05))
    ax = axes[1]
    ax.bar(x - 0.2, [layer.nonzero_before / layer.weights for layer in layers], 0.4, label="before")
    ax.bar(x + 0.2, [layer.nonzero / layer.weights for layer in layers], 0.4, label="after")
    ax.set(title="kept weights per layer", ylabel="non-zero fraction", ylim=(0, 1.05))
    for ax in axes[:2]:
        ax.set_xticks(x, names, rotation=60, ha="right", fontsize=8)
        ax.legend()
    ax = axes[2]
    steps = [s for s in report.steps if s.top1_agreement is not None or s.rel_error is not None]
    use_agreement = all(s.top1_agreement is not None for s in steps)
    values = [(s.top1_agreement if use_agreement else s.rel_error) for s in steps]
    accepted = [s.accepted for s in steps]
    sparsity = [s.sparsity for s in steps]
    ax.plot([0.0, *sparsity], [1.0 if use_agreement else 0.0, *values], "-", color="grey")
    ax.scatter(
        [p for p, ok in zip(sparsity, accepted, strict=True) if ok],
        [v for v, ok in zip(values, accepted, strict=True) if ok],
        label="accepted",
        zorder=3,
    )
    ax.scatter(
        [p for p, ok in zip(sparsity, accepted, strict=True) if not ok],
        [v for v, ok in zip(values, accepted, strict=True) if not ok],
        marker="x",
        color="red",
        label="rejected by the guard",
        zorder=3,
    )
    ax.set(
        title=f"the loop ({report.fidelity.data} data)",
        xlabel="sparsity of prunable weights",
        ylabel="top-1 agreement" if use_agreement else "relative output error",
    )
    ax.legend()
    fig.suptitle(f"{report.source}: depth {report.model.depth_before} -> {report.model.depth_after}")
    buffer = io.BytesIO()
    metadata = _STABLE_METADATA.get(file_format)
    try:
        fig.savefig(buffer, format=file_format, dpi=100, metadata=metadata)
    except (ValueError, OSError, RuntimeError) as exc:
        raise ConfigError(f"--plot: matplotlib cannot write {file_format}: {one_line(exc)}") from exc
    finally:
        plt.close(fig)
    return buffer.getvalue()
