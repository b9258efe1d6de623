"""The command line's options in groups, each building its part of the API's config (Polygraphy's ArgGroups).

A command lists the groups it takes; every default comes from :class:`~egp_onnx.config.Settings`
or :class:`~egp_onnx.config.DataConfig`, so the CLI and the API cannot drift apart.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import click

from egp_onnx.cli.files import InputPath, input_path
from egp_onnx.cli.plugins import load_attribute, source_file
from egp_onnx.config import (
    DEFAULT_MIN_IOU,
    METHODS,
    QUANTIZE_MODES,
    SELECTIONS,
    DataConfig,
    Settings,
    check_positive,
    check_tolerances,
)
from egp_onnx.errors import ConfigError

F = TypeVar("F", bound=Callable[..., Any])
Params = Mapping[str, Any]

_SETTINGS, _DATA = Settings(), DataConfig()


@dataclass(frozen=True)
class OptionGroup:
    """Click options that belong together, and the Settings fields their values give."""

    options: tuple[Callable[[Any], Any], ...]
    settings: Callable[[Params], dict[str, Any]] = lambda params: {}

    def __call__(self, func: F) -> F:
        """Add the group's options to a command, in the order they are listed."""
        for option in reversed(self.options):
            func = option(func)
        return func


def in_order(names: Sequence[str]) -> Callable[[click.Command], click.Command]:
    """List a command's options in --help in the order of ``names`` (arguments first, unnamed last)."""
    rank = {name: i for i, name in enumerate(names)}

    def sort(command: click.Command) -> click.Command:
        command.params.sort(
            key=lambda p: (p.param_type_name != "argument", rank.get(p.name or "", len(rank)))
        )
        return command

    return sort


def _path(*decls: str, **kwargs: Any) -> Callable[[Any], Any]:
    return click.option(*decls, type=click.Path(path_type=Path), **kwargs)


def _flag(*decls: str, help: str) -> Callable[[Any], Any]:
    return click.option(*decls, is_flag=True, help=help)


def _default(*decls: str, default: Any, help: str, **kwargs: Any) -> Callable[[Any], Any]:
    """An option with a default, shown in --help."""
    kwargs.setdefault("type", type(default))
    return click.option(*decls, default=default, show_default=True, help=help, **kwargs)


def _text(values: Sequence[float]) -> str:
    return ",".join(f"{v:g}" for v in values)


BATCH_SIZE = _default("--batch-size", default=_SETTINGS.batch_size, help="Samples per onnxruntime call.")


def data_options(required: bool = True) -> OptionGroup:
    """--calib and how it is read: --batch-size, --workers, --mean, --std."""
    return OptionGroup(
        (
            _path(
                "--calib",
                required=required,
                help="Calibration data: .npz keyed by input name (optional 'labels'), .npy, "
                "or a folder of those or of images.",
            ),
            BATCH_SIZE,
            _default("--workers", default=_DATA.workers, help="Threads that load calibration files ahead."),
            click.option(
                "--scheduler",
                default=None,
                help="Run the statistics passes on a Dask cluster: a scheduler's address "
                "(tcp://host:8786) or local:N worker processes (needs egp-onnx[dask]).",
            ),
            _default(
                "--mean",
                default=_text(_DATA.mean),
                help="Per-channel mean for image folders, after scaling pixels to [0, 1] (comma list).",
            ),
            _default(
                "--std", default=_text(_DATA.std), help="Per-channel std for image folders (comma list)."
            ),
        ),
        lambda params: {"batch_size": params["batch_size"]},
    )


def _floats(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError as exc:
        raise ConfigError(f"--mean/--std take comma-separated numbers, got {text!r}") from exc
    if not all(math.isfinite(v) for v in values):
        raise ConfigError(f"--mean/--std take finite numbers, got {text!r}")
    return values


def data_config(params: Params) -> DataConfig:
    """The data options as a DataConfig, checked (--batch-size is checked with the Settings).

    Raises:
        ConfigError: naming the first bad option.

    """
    config = DataConfig(
        mean=_floats(params["mean"]),
        std=_floats(params["std"]),
        workers=params["workers"],
        scheduler=params["scheduler"],
    )
    config.check()
    return config


STATS = OptionGroup(
    (
        _path(
            "--stats",
            "stats_paths",
            multiple=True,
            help="Statistics file from `egp-onnx stats` (repeat to merge shards).",
        ),
    )
)

PRUNE = OptionGroup(
    (
        _default(
            "--sparsity",
            default=_SETTINGS.sparsity,
            help="Fraction of the prunable weights to zero, in [0, 1); with the guard (default) a ceiling: "
            "the run stops where the guard stops it. 0 changes no weight (exact rewrites only).",
        ),
        _default(
            "--step",
            default=_SETTINGS.step,
            help="Fraction of the remaining weights removed per EGP step, in (0, 1].",
        ),
        _default(
            "--method",
            default=_SETTINGS.method,
            type=click.Choice(METHODS),
            help="egp, or global magnitude pruning as a baseline.",
        ),
        _flag("--no-reconstruct", help="Do not refit the layers by least squares after each step."),
        _default(
            "--select",
            default=_SETTINGS.select,
            type=click.Choice(SELECTIONS),
            help="Which weights a layer loses: smallest |w|, or OBS saliency on the reconstruction's "
            "equations.",
        ),
        _default(
            "--layer-cap",
            default=_SETTINGS.layer_cap,
            help="Largest sparsity of a layer that every path to the outputs goes through.",
        ),
        click.option(
            "--sensitivity/--no-sensitivity",
            default=None,
            help="Cap each layer where pruning it alone moves the held-out outputs (measured before "
            "the loop, with a guard). Default: only with fewer than 1000 held-out samples.",
        ),
        _default(
            "--seed",
            default=_SETTINGS.seed,
            help="Order among weights of equal magnitude; the --holdout split.",
        ),
    ),
    lambda params: {
        "sparsity": params["sparsity"],
        "step": params["step"],
        "method": params["method"],
        "reconstruct": not params["no_reconstruct"],
        "select": params["select"],
        "layer_cap": params["layer_cap"],
        "sensitivity": params["sensitivity"],
        "seed": params["seed"],
    },
)

GUARD = OptionGroup(
    (
        _path("--eval", "eval_path", help="Held-out data (any --calib format; 'labels' give accuracy)."),
        _flag(
            "--eval-unseen",
            help="The --eval data are unseen by training (e.g. a test set): the guard takes their "
            "agreement as the estimate as is, instead of correcting it for confident training data.",
        ),
        click.option(
            "--holdout",
            type=float,
            help="Without --eval: split this fraction of --calib off as held-out data for the guard "
            "[default: min(max(500, N/4), N/2) samples; 0 measures on the calibration data itself].",
        ),
        click.option(
            "--min-agreement",
            type=float,
            help="Guard: lowest estimated unseen top-1 agreement with the original, per classifier or "
            "(N, T, classes) output [default: 0.99].",
        ),
        click.option(
            "--max-rel-error",
            type=float,
            help="Guard: largest relative output error [default: 0.05 for outputs no other rule judges; "
            "alone: every output].",
        ),
        click.option(
            "--min-iou",
            type=float,
            help="Guard: lowest mean IoU of the regions above --map-threshold in the original's and the "
            "compressed model's map, per probability map (rank >= 3, values in [0, 1], e.g. a text "
            f"detector's Sigmoid) [default: {DEFAULT_MIN_IOU}].",
        ),
        _default(
            "--map-threshold",
            default=_SETTINGS.map_threshold,
            help="Where probability maps are cut into regions for --min-iou (DBNet's binarization).",
        ),
        _flag("--no-guard", help="No fidelity guard: prune to --sparsity whatever it costs."),
    ),
    lambda params: {
        "holdout": params["holdout"],
        "eval_unseen": params["eval_unseen"],
        "min_agreement": params["min_agreement"],
        "max_rel_error": params["max_rel_error"],
        "min_iou": params["min_iou"],
        "map_threshold": params["map_threshold"],
        "guard": not params["no_guard"],
    },
)

SURGERY = OptionGroup(
    (
        _flag("--no-surgery", help="Only zero weights; keep the graph as it is."),
        _flag(
            "--channels",
            help="First remove whole channels (always-OFF ones exactly, others by entropy and refit cost "
            "under the guard), so that the graph itself gets narrower.",
        ),
        _default(
            "--merge-tolerance",
            default=_SETTINGS.merge_tolerance,
            help="Apply a merge that is not exact when its relative output error on the calibration data is "
            "at most this; 0 applies exact rewrites only.",
        ),
    ),
    lambda params: {
        "surgery": not params["no_surgery"],
        "merge_tolerance": params["merge_tolerance"],
        "channels": params["channels"],
    },
)

QUANTIZE = OptionGroup(
    (
        click.option(
            "--quantize",
            type=click.Choice(QUANTIZE_MODES),
            help="Quantize the result as the last stage: int8 = onnxruntime static quantization (QDQ, "
            "per-channel symmetric weights, so pruned weights stay 0), judged by the guard; the float "
            "model is kept if it fails [default: off].",
        ),
    ),
    lambda params: {"quantize": params["quantize"]},
)

FINETUNE = OptionGroup(
    (
        click.option(
            "--finetune",
            "finetune_spec",
            help="module:function (or file.py:function) called after every step with (model, masks); "
            "returns the retrained model or new tensor values.",
        ),
        click.option(
            "--torch-model",
            help="module:factory (or file.py:factory) returning the torch.nn.Module behind MODEL; finetunes "
            "it on --train between steps (needs the torch extra).",
        ),
        _path("--train", "train_path", help="Training data (.npz with labels) for --torch-model."),
        _default("--epochs", default=1, help="Epochs per step for --torch-model."),
        _default("--lr", default=1e-3, help="Adam learning rate for --torch-model."),
        _default(
            "--distill",
            default=0.0,
            help="Weight of distillation on the original's outputs against cross-entropy on the labels, "
            "in [0, 1], for --torch-model (1: no labels needed). The original's first output must be logits.",
        ),
        _default("--temperature", default=1.0, help="Softmax temperature of --distill."),
        _flag(
            "--freeze-bn",
            help="Keep --torch-model's BatchNorm layers in eval mode while finetuning (their running "
            "statistics, the ONNX model's, do not move).",
        ),
    )
)

OUTPUT = OptionGroup(
    (
        _path("-o", "--output", required=True, help="Where to write the model."),
        _path("--report", "report_path", help="Write the JSON report here."),
        _flag("--no-latency", help="Skip the onnxruntime latency measurement."),
        _path(
            "--plot",
            "plot_path",
            help="Draw entropy, kept weights and the loop into this PNG (needs matplotlib).",
        ),
        _flag(
            "--external-data",
            help="Write the weights to OUT.data beside OUT (automatic when the model would not fit one "
            "protobuf).",
        ),
        _flag("-q", "--quiet", help="Print nothing but errors."),
        _flag("--force", help="Overwrite existing output files."),
    ),
    lambda params: {"latency": not params["no_latency"]},
)

#: The order `compress --help` lists the options in (as before they were grouped).
COMPRESS_HELP_ORDER = (
    "calib", "batch_size", "workers", "scheduler", "mean", "std", "output", "sparsity", "step", "method",
    "eval_path", "eval_unseen", "holdout", "min_agreement", "max_rel_error", "min_iou",
    "map_threshold", "no_guard", "no_reconstruct",
    "select", "layer_cap", "sensitivity", "report_path", "seed", "stats_paths", "finetune_spec",
    "torch_model", "train_path", "epochs", "lr", "distill", "temperature", "freeze_bn",
    "no_surgery", "channels", "merge_tolerance", "quantize", "no_latency", "plot_path", "external_data",
    "quiet", "force",
)  # fmt: skip

COMPRESS_GROUPS = (data_options(), OUTPUT, PRUNE, GUARD, STATS, FINETUNE, SURGERY, QUANTIZE)


def compress_options(func: F) -> F:
    """Every option of `compress`, group by group."""
    for group in reversed(COMPRESS_GROUPS):
        func = group(func)
    return func


def compress_settings(params: Params) -> Settings:
    """The Settings the compress options give, checked.

    Raises:
        ConfigError: naming the first option outside its range.

    """
    fields: dict[str, Any] = {}
    for group in COMPRESS_GROUPS:
        fields.update(group.settings(params))
    settings = Settings(**fields)
    settings.check()
    return settings


@dataclass(frozen=True)
class FinetuneArgs:
    """--finetune, or --torch-model with --train, --epochs, --lr, --distill, --temperature, --freeze-bn."""

    spec: str | None
    torch_model: str | None
    train: Path | None
    epochs: int
    lr: float
    distill: float = 0.0
    temperature: float = 1.0
    freeze_bn: bool = False

    @classmethod
    def of(cls, params: Params) -> FinetuneArgs:
        """The finetune options, checked (not yet loaded: see :meth:`callback`)."""
        if params["epochs"] < 1:
            raise ConfigError(f"--epochs must be at least 1, got {params['epochs']}")
        check_positive("--lr", params["lr"])
        distill, temperature = params["distill"], params["temperature"]
        if not 0.0 <= distill <= 1.0:
            raise ConfigError(f"--distill must be in [0, 1], got {distill}")
        check_positive("--temperature", temperature)
        if params["torch_model"] is None and (distill != 0.0 or temperature != 1.0):
            raise ConfigError("--distill and --temperature are used with --torch-model")
        if params["torch_model"] is None and params["freeze_bn"]:
            raise ConfigError("--freeze-bn is used with --torch-model")
        if distill == 0.0 and temperature != 1.0:
            raise ConfigError("--temperature is used with --distill W (W > 0)")
        return cls(
            params["finetune_spec"],
            params["torch_model"],
            params["train_path"],
            params["epochs"],
            params["lr"],
            distill,
            temperature,
            params["freeze_bn"],
        )

    def reads(self) -> list[tuple[str, Path | None]]:
        """The files these options read."""
        return [
            ("--train", self.train),
            ("--finetune", source_file(self.spec)),
            ("--torch-model", source_file(self.torch_model)),
        ]

    def callback(self) -> Callable[..., Any] | None:
        """The finetune callback the options ask for, or None."""
        if self.spec and self.torch_model:
            raise ConfigError("give either --finetune or --torch-model, not both")
        if self.spec:
            function = load_attribute(self.spec, "--finetune")
            if not callable(function):
                raise ConfigError(f"--finetune: {self.spec} is not callable")
            return function
        if self.torch_model is None:
            if self.train is not None:
                raise ConfigError("--train is used with --torch-model")
            return None
        if self.train is None:
            raise ConfigError("--torch-model needs --train PATH (an .npz with inputs and labels)")
        return self._torch_callback(self.torch_model, self.train)

    def _torch_callback(self, torch_model: str, train: Path) -> Callable[..., Any]:
        try:
            from egp_onnx.integrations.torch import ClassificationFinetune
        except ImportError as exc:
            raise ConfigError(str(exc)) from exc
        factory = load_attribute(torch_model, "--torch-model")
        try:
            module = factory()
        except Exception as exc:  # the user's factory may fail in any way
            raise ConfigError(f"--torch-model: {torch_model}() failed: {type(exc).__name__}: {exc}") from exc
        try:
            return ClassificationFinetune(
                module,
                train,
                epochs=self.epochs,
                lr=self.lr,
                distill=self.distill,
                temperature=self.temperature,
                freeze_bn=self.freeze_bn,
            )
        except (OSError, KeyError, ValueError, StopIteration) as exc:
            labels = "" if self.distill == 1.0 else " and 'labels' (or --distill 1)"
            raise ConfigError(f"--train {train}: needs an .npz with an input array{labels} ({exc})") from exc


VERIFY = OptionGroup(
    (
        _path("--data", required=True, help="Inputs to run both models on (any --calib format)."),
        _default("--atol", default=1e-5, help="Absolute tolerance per element."),
        _default("--rtol", default=1e-5, help="Relative tolerance per element."),
        click.option(
            "--min-agreement",
            type=float,
            help="Pass on top-1 agreement at least this instead of element tolerances.",
        ),
        BATCH_SIZE,
    )
)


def check_verify(params: Params) -> None:
    """Refuse bad `verify` options before any work starts."""
    Settings(batch_size=params["batch_size"]).check()
    check_tolerances(params["atol"], params["rtol"], params["min_agreement"])


def reads(*named: tuple[str, Path | None]) -> list[InputPath]:
    """The inputs named by options (None: not given)."""
    return [input_path(option, path) for option, path in named if path is not None]
