"""Static INT8 quantization by onnxruntime.quantization: QDQ, per-channel symmetric weights.

The scheme is onnxruntime's recommended one for CPUs (``quantize_static``'s own guidance):

- QDQ format (QuantizeLinear/DequantizeLinear around float ops; onnxruntime's CPU kernels fuse
  them into integer Conv/MatMul), per-channel weights as signed int8, activations as uint8 per
  tensor, ranges by MinMax over the calibration data, no reduced range (VNNI-era CPUs).
- Weights are quantized symmetrically (``WeightSymmetric``, onnxruntime's default, stated here
  because pruning depends on it): the zero point is 0, so a pruned weight, exactly 0.0, becomes
  the integer 0 and dequantizes to exactly 0.0 again. :func:`quantize_int8` checks that on the
  model it returns.
- ``quant_pre_process`` first (onnx shape inference and onnxruntime's basic graph optimisation,
  which folds a BatchNormalization left in the graph into its Conv), as onnxruntime recommends;
  symbolic shape inference is skipped (it needs sympy and serves transformer models).

Everything onnxruntime writes goes to a temporary folder that is removed whatever happens; the
caller's model is never modified (``quant_pre_process`` would move the weights of a ModelProto
it is given into external data, so it is given a file).
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quant_pre_process,
    quantize_static,
)

from egp_onnx.errors import ModelError, one_line
from egp_onnx.graph.weights import serialized_size
from egp_onnx.runtime.session import quiet

log = logging.getLogger(__name__)

_FLOATS = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE)

#: How the INT8 model is quantized, as the report states it.
INT8_SCHEME = (
    "QDQ; weights int8 per channel, symmetric (zero point 0); activations uint8 per tensor, "
    "MinMax over the calibration data"
)
#: Above this serialised size the models onnxruntime reads and writes keep their weights in a
#: side file (protobuf's limit is 2 GiB).
_EXTERNAL_BYTES = 2**31 - 2**26

#: The arguments of the one ``quantize_static`` call (see the module docstring).
INT8_ARGUMENTS = {
    "quant_format": QuantFormat.QDQ,
    "per_channel": True,
    "reduce_range": False,
    "activation_type": QuantType.QUInt8,
    "weight_type": QuantType.QInt8,
    "calibrate_method": CalibrationMethod.MinMax,
    # onnxruntime's defaults, stated: pruned weights must stay exactly zero
    "extra_options": {"WeightSymmetric": True, "ActivationSymmetric": False},
}


class FeedReader(CalibrationDataReader):
    """onnxruntime's CalibrationDataReader over feeds (input name -> array), read once, counted."""

    def __init__(self, feeds: Iterable[Mapping[str, np.ndarray]]) -> None:
        self._feeds: Iterator[Mapping[str, np.ndarray]] = iter(feeds)
        self.samples = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        """The next feed, or None when there are no more."""
        feed = next(self._feeds, None)
        if feed is None:
            return None
        self.samples += int(next(iter(feed.values())).shape[0]) if feed else 0
        return dict(feed)


@dataclass(frozen=True)
class Quantized:
    """The INT8 model, the calibration samples its ranges come from, and the zero weights checked."""

    model: onnx.ModelProto
    samples: int
    zeros_checked: int  # weights 0.0 in the float model found to dequantize to exactly 0.0


def quantize_int8(model: onnx.ModelProto, feeds: Iterable[Mapping[str, np.ndarray]]) -> Quantized:
    """``model`` statically quantized to INT8 (QDQ) with activation ranges from ``feeds``.

    Raises:
        ModelError: onnxruntime cannot quantize the model, or a weight that was 0.0 does not
            dequantize to 0.0 (a defect: the scheme is symmetric).

    """
    quiet()
    reader = FeedReader(feeds)
    large = serialized_size(model) > _EXTERNAL_BYTES
    with tempfile.TemporaryDirectory(prefix="egp-quantize-") as folder:
        source, prepared, output = (Path(folder) / name for name in ("in.onnx", "pre.onnx", "int8.onnx"))
        onnx.save_model(model, source, save_as_external_data=large, location="in.onnx.data")
        try:
            quant_pre_process(
                source,
                prepared,
                skip_symbolic_shape=True,
                save_as_external_data=large,
                all_tensors_to_one_file=True,
                external_data_location="pre.onnx.data",
            )
            quantize_static(prepared, output, reader, use_external_data_format=large, **INT8_ARGUMENTS)
        except Exception as exc:  # onnxruntime.quantization raises ValueError, RuntimeError, its own Fail
            raise ModelError(f"onnxruntime cannot quantize the model to INT8: {one_line(exc)}") from exc
        quantized = onnx.load_model(output)  # external data, if any, is read in before the folder goes
    checked = zeros_kept(model, quantized)
    log.info("quantized to INT8 on %d calibration samples; %d zero weights stay 0", reader.samples, checked)
    return Quantized(quantized, reader.samples, checked)


def dequantized_values(quantized: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Per DequantizeLinear of an initializer: the float values it gives, by its output's name."""
    values = {t.name: t for t in quantized.graph.initializer}
    out = {}
    for node in quantized.graph.node:
        if node.op_type != "DequantizeLinear" or node.input[0] not in values:
            continue
        q = numpy_helper.to_array(values[node.input[0]]).astype(np.float64)
        scale = numpy_helper.to_array(values[node.input[1]]).astype(np.float64)
        zero = (
            numpy_helper.to_array(values[node.input[2]]).astype(np.float64)
            if len(node.input) > 2 and node.input[2] in values
            else np.zeros_like(scale)
        )
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        if scale.ndim == 1 and q.ndim > 1:  # per channel along ``axis``
            shape = [1] * q.ndim
            shape[axis] = -1
            scale, zero = scale.reshape(shape), zero.reshape(shape)
        out[node.output[0]] = (q - zero) * scale
    return out


#: The layers whose weights pruning zeroes.
_LAYERS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def zeros_kept(model: onnx.ModelProto, quantized: onnx.ModelProto) -> int:
    """The zero weights of ``model``'s layers checked to dequantize to exactly 0.0 in ``quantized``.

    Layers are matched by node name: onnxruntime keeps it, or appends ``/MatMulAddFusion`` when it
    fuses a MatMul and its Add into a Gemm; it renames the weights it folds a BatchNormalization
    or a Mul into (which scales rows and keeps zeros). A layer whose weight onnxruntime left in
    float is compared as it is.

    Raises:
        ModelError: a weight that was 0.0 is something else in ``quantized``.

    """
    floats = {t.name: t for t in model.graph.initializer if t.data_type in _FLOATS}
    after = {t.name: t for t in quantized.graph.initializer}
    dequantized = dequantized_values(quantized)
    layers = {n.name: n for n in quantized.graph.node if n.op_type in _LAYERS and n.name}
    for name, node in list(layers.items()):  # a fused layer is named "<layer>/<Kind>Fusion"
        layer, _, fusion = name.rpartition("/")
        if layer and fusion.endswith("Fusion"):
            layers.setdefault(layer, node)
    checked = 0
    for node in model.graph.node:
        match = layers.get(node.name)
        if node.op_type not in _LAYERS or len(node.input) < 2 or node.input[1] not in floats or match is None:
            continue
        zeros = numpy_helper.to_array(floats[node.input[1]]) == 0
        name = match.input[1] if len(match.input) > 1 else ""
        if name in dequantized:
            found = dequantized[name]
        elif name in after:
            found = numpy_helper.to_array(after[name])
        else:
            continue
        if found.shape != zeros.shape or not zeros.any():
            continue
        moved = int(np.count_nonzero(found[zeros]))
        if moved:
            raise ModelError(
                f"INT8 quantization moved {moved} pruned weights of {node.name} ({node.input[1]}) away "
                "from 0; the weights must be quantized symmetrically"
            )
        checked += int(zeros.sum())
    return checked
