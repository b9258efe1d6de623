"""The first stages alone: load a model and its data, count its rectifiers' statistics, analyze them."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import replace
from typing import Any, Protocol

import onnx

from egp_onnx.api.summary import site_record
from egp_onnx.calibrate.collect import collect_statistics
from egp_onnx.calibrate.probes import probes
from egp_onnx.config import DataConfig, Settings, split_options
from egp_onnx.entropy import Statistics
from egp_onnx.errors import ConfigError
from egp_onnx.graph.rectifiers import RectifierSite, find_rectifiers
from egp_onnx.load.calibration import CalibrationData, CalibrationDataReader, open_calibration
from egp_onnx.load.model import load_model, prepare_model
from egp_onnx.load.stats_file import load_statistics, model_fingerprint, stats_paths
from egp_onnx.report.records import AnalysisReport
from egp_onnx.runtime.cluster import cluster_or_none

log = logging.getLogger(__name__)

ModelSource = str | os.PathLike[str] | onnx.ModelProto
DataSource = str | os.PathLike[str] | CalibrationDataReader | CalibrationData


class Progress(Protocol):
    """Receives progress events; the CLI draws them, the library only reports them."""

    def stage(self, text: str) -> None:
        """A new stage starts (e.g. a calibration pass of step 2)."""

    def advance(self, samples: int) -> None:
        """``samples`` more calibration samples went through the model."""


class Silent:
    """Progress that only logs the stages."""

    def stage(self, text: str) -> None:
        """Log the stage."""
        log.info(text)

    def advance(self, samples: int) -> None:
        """Nothing to show."""


def load_source(model: ModelSource) -> tuple[onnx.ModelProto, str]:
    """The prepared model and the name of its source."""
    if isinstance(model, onnx.ModelProto):
        return prepare_model(model), "<ModelProto>"
    return load_model(model), str(model)


def open_data(data: DataSource, model: onnx.ModelProto, options: DataConfig) -> CalibrationData:
    """``data`` opened for ``model`` (as it is when already open)."""
    if isinstance(data, CalibrationData):
        return data
    return open_calibration(data, model, mean=options.mean, std=options.std, workers=options.workers)


def stats_files(
    paths: Sequence[str | os.PathLike[str]], model: onnx.ModelProto, sites: list[RectifierSite]
) -> Statistics:
    """Merged statistics files, checked to belong to ``model``."""
    channels = {
        site.name: site.channels[1] - site.channels[0] if site.channels else probe.channels
        for site, probe in zip(sites, probes(model, sites), strict=True)
    }
    stats = load_statistics(stats_paths(paths), model_fingerprint(model), channels)
    return stats


def statistics(
    model: ModelSource,
    calib: DataSource | None = None,
    *,
    stats: Sequence[str | os.PathLike[str]] = (),
    batch_size: int = Settings.batch_size,
    data: DataConfig | None = None,
    progress: Progress | None = None,
    **data_options: Any,
) -> tuple[onnx.ModelProto, str, list[RectifierSite], Statistics]:
    """Counts of every rectifier of ``model``: from ``calib``, from saved ``stats`` files, or both merged.

    ``data`` says how ``calib`` is read; ``data_options`` (``mean``, ``std``, ``workers``,
    ``scheduler``) replace its fields. ``scheduler``: a Dask scheduler's address or ``local:N``;
    the statistics pass runs there, part by part, with the same counts (runtime/cluster.py).

    Returns:
        The loaded model, its source name, its rectifier sites and their statistics.

    Raises:
        EgpError: bad model, data, statistics files or options.

    """
    (replaced,) = split_options(data_options, DataConfig)
    options = replace(data or DataConfig(), **replaced)
    Settings(batch_size=batch_size).check()
    if calib is None and not stats:
        raise ConfigError("give calibration data (--calib) or statistics files (--stats)")
    options.check()
    # The cluster first: a scheduler that cannot be reached is an error before any work.
    with cluster_or_none(options.scheduler if calib is not None else None) as cluster:
        proto, source = load_source(model)
        sites = find_rectifiers(proto)
        merged = stats_files(stats, proto, sites) if stats else None
        if calib is not None:
            opened = open_data(calib, proto, options)
            progress = progress or Silent()
            progress.stage("calibrating")
            counted = collect_statistics(proto, sites, opened, batch_size, progress.advance, cluster=cluster)
            merged = counted if merged is None else merged.merged(counted)
    assert merged is not None  # one of the two sources was given
    return proto, source, sites, merged


def analyze(
    model: ModelSource,
    calib: DataSource | None = None,
    *,
    stats: Sequence[str | os.PathLike[str]] = (),
    progress: Progress | None = None,
    **options: Any,
) -> AnalysisReport:
    """Measure the entropy of every rectifier of ``model`` on the calibration data.

    ``stats`` are files written by :func:`statistics` / `egp-onnx stats` for the same model, e.g.
    shards of a calibration set counted on different machines; they are merged exactly.
    ``options``: as for :func:`statistics` (``batch_size``, ``data``, ``mean``, ``std``, ``workers``).

    Raises:
        EgpError: bad model, data or options (a one-line message).

    """
    proto, source, sites, counted = statistics(model, calib, stats=stats, progress=progress, **options)
    return AnalysisReport(
        source=source,
        samples=counted.samples,
        layers=tuple(site_record(s, counted) for s in sites),
    )
