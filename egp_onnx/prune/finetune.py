"""Finetuning between pruning steps: the callback protocol, and taking back what it returns."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import numpy as np
import onnx

from egp_onnx.errors import EgpError, FinetuneError, one_line
from egp_onnx.graph.weights import initializer_arrays, replace_tensors, tensor_values

if TYPE_CHECKING:
    from egp_onnx.prune.loop import LayerSet

#: Retrains a pruned model: gets the model and, per prunable initializer, the mask of kept weights;
#: returns the retrained model (same initializer names) or new values for some of its tensors.
#: A callback may also have a ``start(model)`` method: it is called once, with the model compress
#: starts from, before any channel or weight goes (see :func:`start_finetune`); and a true
#: ``follows_branches`` attribute: it can train a model in which ``--channels`` has emptied a
#: residual branch into ``x + c`` (see :func:`follows_branches`).
Finetune = Callable[[onnx.ModelProto, dict[str, np.ndarray]], "onnx.ModelProto | Mapping[str, np.ndarray]"]


def callback_name(finetune: Finetune) -> str:
    """The name a finetune callback goes by in messages and the report."""
    return getattr(finetune, "__qualname__", type(finetune).__name__)


def start_finetune(finetune: Finetune, model: onnx.ModelProto) -> None:
    """Call the callback's optional ``start(model)`` with the original model, before any stage.

    Under ``--channels`` the callback's first model is already narrower than its module: binding
    the module to the original's initializers here is what lets it follow (names stay, shapes
    change; integrations/torch.py's ``narrow_module``).

    Raises:
        FinetuneError: one line when ``start`` fails.

    """
    start = getattr(finetune, "start", None)
    if start is None:
        return
    name = callback_name(finetune)
    try:
        start(model)
    except EgpError:
        raise
    except Exception as exc:  # the user's code may fail in any way
        raise FinetuneError(
            f"the finetune callback {name}'s start() failed: {type(exc).__name__}: {one_line(exc)}"
        ) from exc


def follows_branches(finetune: Finetune) -> bool:
    """Whether ``finetune`` can train a model whose residual branches were emptied into ``x + c``.

    Only a callback that says so: the constant has no layer in a module made for the original, so
    one that loads the model's tensors into such a module by name would find the branch's gone.
    """
    return getattr(finetune, "follows_branches", False) is True


def apply_finetune(candidate: onnx.ModelProto, layers: LayerSet, finetune: Finetune) -> onnx.ModelProto:
    """Run the callback, take its tensor values, and hold the masks: pruned weights stay zero."""
    masks = {name: w != 0 for name, w in zip(layers.weight_names, layers.weights, strict=True)}
    name = callback_name(finetune)
    try:
        returned = finetune(candidate, {k: v.copy() for k, v in masks.items()})
    except EgpError:
        raise
    except SystemExit as exc:  # sys.exit() in training code must not end the run as if it were done
        raise FinetuneError(
            f"the finetune callback {name} called sys.exit({exc.code!r}); return the tensors instead"
        ) from exc
    except Exception as exc:  # the user's training code may fail in any way
        raise FinetuneError(
            f"the finetune callback {name} failed: {type(exc).__name__}: {one_line(exc)}"
        ) from exc
    values = finetune_values(returned, candidate, layers.weight_names, name)
    retrained = replace_tensors(candidate, values)
    arrays = initializer_arrays(retrained, layers.weight_names)
    layers.weights = [arrays[n] * masks[n] for n in layers.weight_names]
    return layers.apply(retrained)


def finetune_values(
    returned: object, candidate: onnx.ModelProto, required: list[str], name: str = "finetune"
) -> dict[str, np.ndarray]:
    """The tensor values a finetune callback returned, checked against ``candidate``.

    Every name must be a tensor of the model, with the same shape and dtype, and floating values
    must be finite: anything else would be broadcast, cast or written into the model.

    Raises:
        FinetuneError: one line naming the callback and the first bad tensor.

    """
    callback = f"the finetune callback {name}"
    if isinstance(returned, onnx.ModelProto):
        values = tensor_values(returned)
        missing = sorted(set(required) - values.keys())
        if missing:
            raise FinetuneError(
                f"{callback} returned a model without the tensors {', '.join(missing[:3])}; "
                "return a model with the same initializer names, or a dict of new tensor values"
            )
    elif isinstance(returned, Mapping):
        values = {}
        for key, value in returned.items():
            try:
                values[str(key)] = np.asarray(value)
            except Exception as exc:  # e.g. a torch tensor that still requires grad
                raise FinetuneError(
                    f"{callback} returned a value for '{key}' that is not an array ({type(value).__name__}: "
                    f"{one_line(exc)})"
                ) from exc
    else:
        raise FinetuneError(
            f"{callback} returned {type(returned).__name__}; expected an onnx.ModelProto or a dict"
        )
    current = tensor_values(candidate)
    for key, value in values.items():
        want = current.get(key)
        if want is None:
            raise FinetuneError(f"{callback} returned unusable values: {key} is not a tensor of the model")
        if value.shape != want.shape:
            raise FinetuneError(
                f"{callback} returned tensor '{key}' with shape {value.shape}; the model's is {want.shape}"
            )
        if value.dtype != want.dtype:
            raise FinetuneError(
                f"{callback} returned tensor '{key}' as {value.dtype}; the model's is {want.dtype} "
                f"(convert with .astype(np.{want.dtype.name}))"
            )
        if np.issubdtype(value.dtype, np.floating) and not np.isfinite(value).all():
            raise FinetuneError(f"{callback} returned tensor '{key}' with NaN or Inf values")
    return values
