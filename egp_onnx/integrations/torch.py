"""PyTorch bridge for finetuning: map ONNX initializers onto a torch.nn.Module and back.

Needs the optional extra: ``pip install 'egp-onnx[torch]'`` (torch==2.13.0, a CPU build).

The mapping pairs the ONNX graph's parametric nodes (Conv, Gemm, MatMul with a constant weight,
BatchNormalization), in graph order, with the module's Conv/Linear/BatchNorm submodules, in
registration order, preferring exact export names. A torch BatchNorm that the exporter folded
into the preceding convolution is recognised and unfolded on the way in, folded on the way out.

A residual branch that ``--channels`` emptied (the block ``x + c``, surgery/narrow.py) is put out
of the module while the model lacks it: its layers pass their input through and the layer that
ended it returns c, so the module computes ``x + c`` and finetuning trains c (:class:`BranchSwap`).
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from egp_onnx.errors import ConfigError, FinetuneError, MappingError
from egp_onnx.graph.channels import emptied_branches
from egp_onnx.graph.index import attr
from egp_onnx.graph.weights import tensor_values
from egp_onnx.load.model import write_bytes_atomic

try:
    import torch
    from torch import nn
    from torch.nn.utils import prune as torch_prune
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "egp_onnx.integrations.torch needs PyTorch: pip install 'egp-onnx[torch]' "
        "(torch==2.13.0, a CPU build)"
    ) from exc

from egp_onnx.integrations.distill import finetune_loss, teacher_logits  # noqa: E402 (needs torch)

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
#: ONNX BatchNormalization input role -> torch BatchNorm attribute
_BN_ROLES = (("scale", "weight"), ("shift", "bias"), ("mean", "running_mean"), ("var", "running_var"))


@dataclass(frozen=True)
class Binding:
    """One ONNX parametric node and the torch module(s) holding its values."""

    node: str
    kind: str  # conv | linear | bn
    module: str
    tensors: dict[str, str]  # role (weight, bias, scale, shift, mean, var) -> ONNX tensor name
    transpose: bool = False  # ONNX weight is (in, out): MatMul, or Gemm without transB
    folded_bn: str | None = None  # a torch BatchNorm folded into this layer by the exporter


def _tensor_source(model: onnx.ModelProto) -> Callable[[str], str | None]:
    """Resolve a tensor through Identity nodes to an initializer or Constant output name."""
    inits = {t.name for t in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}

    def resolve(name: str) -> str | None:
        for _ in range(8):
            if name in inits:
                return name
            node = producers.get(name)
            if node is None:
                return None
            if node.op_type == "Constant":
                return name
            if node.op_type != "Identity":
                return None
            name = node.input[0]
        return None

    return resolve


def _onnx_nodes(model: onnx.ModelProto) -> list[tuple[onnx.NodeProto, str, dict[str, str], bool]]:
    """(node, kind, role -> tensor, transpose) of every parametric node, in graph order."""
    resolve = _tensor_source(model)
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    found = []
    for node in model.graph.node:
        inputs = [resolve(i) if i else None for i in node.input]
        if node.op_type == "Conv" and len(inputs) > 1 and inputs[1]:
            roles = {"weight": inputs[1]} | ({"bias": inputs[2]} if len(inputs) > 2 and inputs[2] else {})
            found.append((node, "conv", roles, False))
        elif node.op_type == "Gemm" and len(inputs) > 1 and inputs[1]:
            trans_b = attr(node, "transB", 0)
            roles = {"weight": inputs[1]} | ({"bias": inputs[2]} if len(inputs) > 2 and inputs[2] else {})
            found.append((node, "linear", roles, not trans_b))
        elif node.op_type == "MatMul" and len(inputs) > 1 and inputs[1]:
            roles = {"weight": inputs[1]}
            after = consumers.get(node.output[0], [])
            if len(after) == 1 and after[0].op_type == "Add":
                other = [resolve(i) for i in after[0].input if i != node.output[0]]
                if other and other[0]:
                    roles["bias"] = other[0]
            found.append((node, "linear", roles, True))
        elif node.op_type == "BatchNormalization" and all(inputs[1:5]):
            roles = dict(zip(("scale", "shift", "mean", "var"), inputs[1:5], strict=True))
            found.append((node, "bn", roles, False))
    return found


def _kind(module: nn.Module) -> str | None:
    if isinstance(module, _CONV):
        return "conv"
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, _BN):
        return "bn"
    return None


def map_initializers(module: nn.Module, model: onnx.ModelProto) -> list[Binding]:
    """Bind every parametric ONNX node of ``model`` to the submodule of ``module`` that holds it.

    Raises:
        MappingError: a node has no module of its kind and shape, or modules are left over.

    """
    values = tensor_values(model)
    modules = [(name, m) for name, m in module.named_modules() if _kind(m)]
    by_name = dict(modules)
    nodes = _onnx_nodes(model)
    used: set[str] = set()
    bindings: list[Binding] = []
    cursor = 0
    # BatchNorm modules a BatchNormalization node names (by export name) are kept as their own
    # node: never folded into a conv, even when the conv's next parametric node in graph order is
    # another layer (a shortcut's conv sorted between a block's conv1 and bn1)
    named_bns = {roles["scale"].rsplit(".", 1)[0] for _, kind, roles, _ in nodes if kind == "bn"}
    into_bn = _feeds_batchnorm(model)
    for node, kind, roles, transpose in nodes:
        weight_name = roles.get("weight") or roles.get("scale", "")
        named = weight_name.rsplit(".", 1)[0] if "." in weight_name else ""
        name: str
        if named in by_name and _kind(by_name[named]) == kind and named not in used:
            name = named
        else:
            while cursor < len(modules) and modules[cursor][0] in used:
                cursor += 1
            if cursor >= len(modules):
                raise MappingError(
                    f"ONNX node {node.name or node.op_type} ({kind}) has no module left to map to"
                )
            name = modules[cursor][0]
        mod = by_name[name]
        if _kind(mod) != kind:
            raise MappingError(
                f"ONNX node {node.name or node.op_type} is a {kind} but the next module, {name}, is a "
                f"{type(mod).__name__}: the mapping is ambiguous (export with the module's parameter names)"
            )
        _check_shape(node, kind, roles, transpose, mod, name, values)
        used.add(name)
        folded = None
        if kind in ("conv", "linear") and node.output[0] not in into_bn:
            index = [n for n, _ in modules].index(name)
            after = modules[index + 1] if index + 1 < len(modules) else None
            if (
                after
                and _kind(after[1]) == "bn"
                and after[0] not in used
                and after[0] not in named_bns
                and after[1].num_features == _out_features(mod)
            ):
                folded = after[0]
                used.add(folded)
        bindings.append(Binding(node.name, kind, name, roles, transpose, folded))
    left = [n for n, _ in modules if n not in used]
    if left:
        raise MappingError(f"modules {', '.join(left)} match no ONNX node: the mapping is ambiguous")
    return bindings


def _feeds_batchnorm(model: onnx.ModelProto) -> set[str]:
    """The tensors a BatchNormalization node reads as its data input (its layer is not folded)."""
    return {n.input[0] for n in model.graph.node if n.op_type == "BatchNormalization" and n.input}


def _out_features(module: nn.Module) -> int:
    return int(module.out_channels if isinstance(module, _CONV) else module.out_features)


def _check_shape(
    node: onnx.NodeProto,
    kind: str,
    roles: dict[str, str],
    transpose: bool,
    module: nn.Module,
    name: str,
    values: Mapping[str, np.ndarray],
) -> None:
    if kind == "bn":
        got, want = values[roles["scale"]].shape, tuple(module.weight.shape)
    else:
        shape = values[roles["weight"]].shape
        got, want = (shape[::-1] if transpose else shape), tuple(module.weight.shape)
    if tuple(got) != want:
        raise MappingError(
            f"ONNX node {node.name or node.op_type} has shape {tuple(got)}, module {name} {want}"
        )


def _bn_scale(bn: nn.Module) -> torch.Tensor:
    return bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)


def present_bindings(values: Mapping[str, np.ndarray], bindings: Sequence[Binding]) -> list[Binding]:
    """The bindings whose tensors a model still has (``values``: its tensor values, by name).

    An emptied branch's layers are not in it.

    Raises:
        FinetuneError: a layer has some of its tensors and not others.

    """
    present = []
    for b in bindings:
        have = [t in values for t in b.tensors.values()]
        if all(have):
            present.append(b)
        elif any(have):
            missing = [t for t in b.tensors.values() if t not in values]
            raise FinetuneError(
                f"the model lacks {', '.join(missing)} of layer {b.node}, but has its other tensors"
            )
    return present


@dataclass(frozen=True)
class BranchEnd:
    """The torch layer that ends an emptied branch, by module name, and where its c is in the model."""

    constant: str  # the ONNX initializer holding c
    module: str  # the torch module whose output is the branch's


def branch_ends(
    original: onnx.ModelProto, model: onnx.ModelProto, bindings: Sequence[Binding]
) -> list[BranchEnd]:
    """For each branch ``model`` has emptied, the module of ``bindings`` (the original's) that ends it.

    The branch's output in the original is made by a BatchNormalization node, or a conv or
    linear layer (with a torch BatchNorm folded into it, which is then the end).

    Raises:
        FinetuneError: the branch ends in a node no module of ``bindings`` holds.

    """
    producers = {o: n for n in original.graph.node for o in n.output}
    by_node = {b.node: b for b in bindings}
    ends = []
    for branch in emptied_branches(original, model):
        node = producers.get(branch.operand)
        b = by_node.get(node.name) if node is not None else None
        if b is None:
            what = f"a {node.op_type} node" if node is not None else "no node"
            raise FinetuneError(
                f"the branch emptied into {branch.add} ends in {what}, which no torch module holds"
            )
        ends.append(BranchEnd(branch.bias, b.folded_bn or b.module))
    return ends


class BranchConstant(nn.Module):
    """An emptied branch in the module: c per channel, whatever its input (the block adds it to x)."""

    def __init__(self, constant: np.ndarray) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.tensor(np.asarray(constant, np.float32).reshape(-1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The constant as (1, C, 1, ...): the block's Add broadcasts it over the batch and the positions."""
        return self.bias.reshape(1, -1, *[1] * (x.dim() - 2))


class BranchSwap:
    """Puts an emptied branch's modules out of a module and back: the layers gone from the model.

    Each layer of the bindings the model no longer has becomes ``nn.Identity`` (its input passes
    through; nothing reads it but the branch), and each branch's end a :class:`BranchConstant`
    holding the model's c, so the module computes ``x + c`` where the model does. The modules
    are kept: when a later model has the branch again (a candidate the guard rejected), they go
    back in as they were, and loading the model's weights sets them.
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.out: dict[str, nn.Module] = {}  # module name -> the module put out

    def apply(
        self, values: Mapping[str, np.ndarray], ends: Sequence[BranchEnd], gone: Sequence[Binding]
    ) -> None:
        """The module as the model of ``values`` has it: ``gone`` layers pass through, ``ends`` are c."""
        for name, original in self.out.items():
            self._put(name, original)
        self.out = {}
        stand_ins: dict[str, nn.Module] = {}
        for b in gone:
            for name in [b.module] + ([b.folded_bn] if b.folded_bn else []):
                stand_ins[name] = nn.Identity()
        for end in ends:
            stand_ins[end.module] = BranchConstant(values[end.constant])
        mods = dict(self.module.named_modules())
        for name, stand_in in stand_ins.items():
            self.out[name] = mods[name]
            self._put(name, stand_in)

    def constants(self, ends: Sequence[BranchEnd]) -> dict[str, np.ndarray]:
        """Each emptied branch's c as the module holds it now."""
        mods = dict(self.module.named_modules())
        return {end.constant: mods[end.module].bias.detach().numpy().copy() for end in ends}

    def _put(self, name: str, module: nn.Module) -> None:
        parent, _, child = name.rpartition(".")
        setattr(self.module.get_submodule(parent) if parent else self.module, child, module)


def load_onnx_weights(module: nn.Module, model: onnx.ModelProto, bindings: Sequence[Binding]) -> None:
    """Copy the ONNX model's parameter values into ``module`` (in place, no gradient)."""
    values = tensor_values(model)
    mods = dict(module.named_modules())
    with torch.no_grad():
        for b in bindings:
            mod = mods[b.module]
            if b.kind == "bn":
                for role, field in _BN_ROLES:
                    getattr(mod, field).copy_(torch.from_numpy(values[b.tensors[role]].astype(np.float32)))
                continue
            weight = values[b.tensors["weight"]].astype(np.float32)
            weight = weight.T if b.transpose else weight
            bias = values[b.tensors["bias"]].astype(np.float32).reshape(-1) if "bias" in b.tensors else None
            if b.folded_bn is not None:
                bn = mods[b.folded_bn]
                scale = _bn_scale(bn).numpy()
                safe = np.where(scale == 0, 1.0, scale)
                mod.weight.copy_(torch.from_numpy(weight / safe.reshape(-1, *[1] * (weight.ndim - 1))))
                own = mod.bias.detach().numpy() if mod.bias is not None else np.zeros_like(safe)
                # b' = (b - mean) * scale + shift; keep b and mean, solve for shift
                shift = (bias if bias is not None else 0.0) - (own - bn.running_mean.numpy()) * scale
                bn.bias.copy_(torch.from_numpy(np.asarray(shift, dtype=np.float32)))
                continue
            mod.weight.copy_(torch.from_numpy(np.ascontiguousarray(weight)))
            if bias is not None:
                if mod.bias is None:
                    if np.any(bias):
                        raise MappingError(f"ONNX node {b.node} has a bias, module {b.module} has none")
                else:
                    mod.bias.copy_(torch.from_numpy(bias))


def onnx_weights(module: nn.Module, bindings: Sequence[Binding]) -> dict[str, np.ndarray]:
    """The module's current parameters as ONNX tensor values (BatchNorm folded where it was)."""
    mods = dict(module.named_modules())
    out: dict[str, np.ndarray] = {}
    with torch.no_grad():
        for b in bindings:
            mod = mods[b.module]
            if b.kind == "bn":
                for role, field in _BN_ROLES:
                    out[b.tensors[role]] = getattr(mod, field).detach().numpy().copy()
                continue
            weight = mod.weight.detach().numpy().copy()
            bias = (
                mod.bias.detach().numpy().copy()
                if mod.bias is not None
                else np.zeros(_out_features(mod), np.float32)
            )
            if b.folded_bn is not None:
                bn = mods[b.folded_bn]
                scale = _bn_scale(bn).numpy()
                weight = weight * scale.reshape(-1, *[1] * (weight.ndim - 1))
                bias = (bias - bn.running_mean.numpy()) * scale + bn.bias.detach().numpy()
            out[b.tensors["weight"]] = weight.T.copy() if b.transpose else weight
            if "bias" in b.tensors:
                out[b.tensors["bias"]] = bias.astype(np.float32)
    return out


def narrow_module(module: nn.Module, model: onnx.ModelProto, bindings: Sequence[Binding]) -> None:
    """Resize ``module``'s bound layers (in place) to the shapes ``model``'s initializers have.

    ``bindings`` are :func:`map_initializers`' on the model before channel removal: the narrowed
    model keeps its tensor names, and only channel counts change. Each Conv/Linear/BatchNorm
    whose tensors have other channel counts gets new parameters (and ``in_channels``/
    ``out_channels``/``groups``, ``in_features``/``out_features``, ``num_features``) holding the
    model's values, so the module computes what the narrowed model computes. A BatchNorm folded
    into its conv gets unit statistics at the new width: the kept channels' own are not in the
    model (folded), and at unit scale the conv's weight carries them exactly.

    Raises:
        FinetuneError: a tensor differs in more than its channel counts (kernel size, rank).

    """
    values = tensor_values(model)
    mods = dict(module.named_modules())
    with torch.no_grad():
        for b in bindings:
            mod = mods[b.module]
            if b.kind == "bn":
                _resize_bn(mod, values[b.tensors["scale"]], b)
                continue
            weight = values[b.tensors["weight"]].astype(np.float32)
            weight = weight.T if b.transpose else weight
            have = tuple(mod.weight.shape)
            if weight.ndim != len(have) or weight.shape[2:] != have[2:]:
                raise FinetuneError(
                    f"the narrowed model's {b.tensors['weight']} has shape {weight.shape}, module "
                    f"{b.module}'s weight {have}: only channel counts may change under --channels"
                )
            if weight.shape == have:
                continue
            out, cin = weight.shape[:2]
            if isinstance(mod, _CONV):
                depthwise = mod.groups > 1 and mod.groups == mod.in_channels == mod.out_channels
                mod.out_channels = out
                mod.in_channels = out if depthwise else cin * mod.groups
                mod.groups = out if depthwise else mod.groups
            else:
                mod.out_features, mod.in_features = out, cin
            # torch.tensor copies: the model's arrays are read-only
            mod.weight = nn.Parameter(torch.tensor(weight, dtype=torch.float32))
            if mod.bias is not None:
                bias = values.get(b.tensors.get("bias", ""))
                fresh = bias.reshape(-1) if bias is not None else np.zeros(out)
                mod.bias = nn.Parameter(torch.tensor(fresh, dtype=torch.float32))
            if b.folded_bn is not None:
                _resize_bn(mods[b.folded_bn], np.ones(out, np.float32), b, unit=True)


def _resize_bn(bn: Any, scale: np.ndarray, b: Binding, unit: bool = False) -> None:
    """A BatchNorm at ``scale``'s width: the model's values (a node's), or unit ones (folded)."""
    width = int(scale.shape[0]) if scale.ndim == 1 else -1
    if width < 0:
        raise FinetuneError(f"the narrowed BatchNormalization {b.node} has a scale shaped {scale.shape}")
    if width == bn.num_features:
        return
    bn.num_features = width
    ones, zeros = torch.ones(width), torch.zeros(width)
    # unit: weight sqrt(var + eps) over var 1 makes the folded scale exactly 1 (see load_onnx_weights)
    bn.weight = nn.Parameter(torch.full((width,), float(np.sqrt(1.0 + bn.eps))) if unit else ones)
    bn.bias = nn.Parameter(zeros.clone())
    bn.running_mean = zeros.clone()
    bn.running_var = ones.clone()


def apply_masks(
    module: nn.Module, bindings: Sequence[Binding], masks: Mapping[str, np.ndarray]
) -> list[nn.Module]:
    """Pruning hooks on every masked weight: ``weight = weight_orig * mask`` in every forward.

    Returns the modules that carry a hook, for :func:`remove_masks`.
    """
    mods = dict(module.named_modules())
    hooked = []
    for b in bindings:
        name = b.tensors.get("weight", "")
        if b.kind == "bn" or name not in masks:
            continue
        mask = masks[name].T if b.transpose else masks[name]
        torch_prune.custom_from_mask(mods[b.module], "weight", torch.from_numpy(np.ascontiguousarray(mask)))
        hooked.append(mods[b.module])
    return hooked


def remove_masks(hooked: Sequence[nn.Module]) -> None:
    """Make the masked weights permanent (zeros stay zeros) and drop the hooks."""
    for mod in hooked:
        torch_prune.remove(mod, "weight")


def export_onnx(
    module: nn.Module,
    example: torch.Tensor | tuple[torch.Tensor, ...],
    path: str | Path,
    input_names: Sequence[str],
    output_names: Sequence[str],
    opset: int = 17,
    fold_batchnorm: bool = True,
) -> onnx.ModelProto:
    """Export ``module`` (eval mode, dynamic batch) to ``path`` (atomically) and return the model."""
    module.eval()
    args = example if isinstance(example, tuple) else (example,)
    axes = {n: {0: "N"} for n in [*input_names, *output_names]}
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # The TorchScript exporter is chosen on purpose (it needs no onnxscript and keeps parameter
        # names); its own deprecation notices are not the user's concern.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            module,
            args,
            buffer,
            input_names=list(input_names),
            output_names=list(output_names),
            opset_version=opset,
            dynamic_axes=axes,
            do_constant_folding=fold_batchnorm,
            dynamo=False,
        )
    write_bytes_atomic(path, buffer.getvalue())
    return onnx.load_model_from_string(buffer.getvalue())


class ClassificationFinetune:
    """A ready finetune callback: training of ``module`` on (inputs, labels) and/or the original's outputs.

    Call it as ``compress(..., finetune=ClassificationFinetune(module, "train.npz"))``: at every
    step it loads the pruned ONNX weights into ``module``, trains ``epochs`` with the masks
    hooked (pruned weights stay zero after every optimizer step), and returns the new values.
    ``start`` binds the module to the original model; under ``--channels`` each step first
    resizes the module to the narrowed model (:func:`narrow_module`), and a residual branch the
    model has emptied is put out of the module (:class:`BranchSwap`): the callback
    ``follows_branches``, so the channel stage may empty branches under it.

    ``distill`` weighs knowledge distillation against the labels: the loss is ``(1 - distill) *
    cross_entropy(labels) + distill * T^2 * KL(softmax(teacher / T) || softmax(student / T))``
    with T ``temperature`` (integrations/distill.py). The teacher is the original model (the one
    ``start`` gets): its first output, which must be the class logits, on the training inputs,
    computed once by onnxruntime. The guard measures agreement with the original, which
    cross-entropy on labels moves away from; distill=1.0 needs no labels (the train file may lack
    them).

    ``freeze_bn``: BatchNormalization layers stay in eval mode while the rest trains: they
    normalise by the running statistics (the ones the ONNX model holds, which the module then
    computes exactly) and those do not move. Training mode normalises each batch by its own
    statistics and moves the running ones toward the training file's, away from the original
    the guard compares with. Which keeps the original's answers better depends on the model, the
    loss and the learning rate (measured both ways: README, "Finetuning"): off by default.

    ``threads``: torch's intra-op threads while it trains (None: torch's setting). One by default:
    its kernels then run in a fixed order (a rerun gives the same weights), and the small models
    this is for train faster on one thread than on cores shared with onnxruntime's sessions and
    other jobs, where torch's threads spin on each other (the digits sample's epoch: 0.7 s on one
    thread, 17 s on two at load 9 on 2 cores).
    """

    follows_branches = True

    def __init__(
        self,
        module: nn.Module,
        train: str | Path | tuple[np.ndarray, np.ndarray],
        *,
        epochs: int = 1,
        lr: float = 1e-3,
        batch_size: int = 64,
        seed: int = 0,
        threads: int | None = 1,
        distill: float = 0.0,
        temperature: float = 1.0,
        freeze_bn: bool = False,
    ) -> None:
        if not 0.0 <= distill <= 1.0:
            raise ConfigError(f"distill must be in [0, 1], got {distill}")
        if not (math.isfinite(temperature) and temperature > 0):
            raise ConfigError(f"the distillation temperature must be a finite number > 0, got {temperature}")
        labels: np.ndarray | None
        if isinstance(train, (str, Path)):
            with np.load(train, allow_pickle=False) as npz:
                labels = npz["labels"] if "labels" in npz.files or distill < 1.0 else None
                inputs = npz[next(k for k in npz.files if k != "labels")]
        else:
            inputs, labels = train
        if labels is None and distill < 1.0:
            raise ConfigError("training on labels (distill < 1) needs labels beside the inputs")
        self.module, self.epochs, self.lr, self.batch_size, self.seed = module, epochs, lr, batch_size, seed
        self.threads, self.distill, self.temperature = threads, distill, temperature
        self.freeze_bn = freeze_bn
        self.inputs = torch.from_numpy(np.ascontiguousarray(inputs, dtype=np.float32))
        self.labels = None if labels is None else torch.from_numpy(np.asarray(labels, dtype=np.int64))
        self.teacher: torch.Tensor | None = None
        self.bindings: list[Binding] | None = None
        self.original: onnx.ModelProto | None = None
        self.swap = BranchSwap(module)

    def start(self, model: onnx.ModelProto) -> None:
        """Bind the module to ``model``, the one compress starts from, before any channel goes.

        With ``distill`` > 0 the teacher's logits are ``model``'s on the training inputs.
        """
        self.bindings = map_initializers(self.module, model)
        self.original = model
        if self.distill > 0.0:
            self.teacher = torch.from_numpy(teacher_logits(model, self.inputs.numpy()))

    def __call__(self, model: onnx.ModelProto, masks: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Train on the pruned (or narrowed) ``model`` with ``masks`` held; return the new tensor values."""
        if self.bindings is None or self.original is None:
            self.start(model)
        assert self.bindings is not None and self.original is not None
        ends = branch_ends(self.original, model, self.bindings)
        values = tensor_values(model)
        present = present_bindings(values, self.bindings)
        self.swap.apply(values, ends, [b for b in self.bindings if b not in present])
        narrow_module(self.module, model, present)
        load_onnx_weights(self.module, model, present)
        previous = torch.get_num_threads()
        if self.threads is not None:
            torch.set_num_threads(self.threads)
        try:
            return self._train(present, ends, masks)
        finally:
            torch.set_num_threads(previous)

    def _train(
        self, present: Sequence[Binding], ends: Sequence[BranchEnd], masks: Mapping[str, np.ndarray]
    ) -> dict[str, np.ndarray]:
        hooked = apply_masks(self.module, present, masks)
        generator = torch.Generator().manual_seed(self.seed)
        optimizer = torch.optim.Adam(self.module.parameters(), lr=self.lr)
        self.module.train()
        if self.freeze_bn:  # normalised by the running statistics the ONNX model holds, kept as they are
            for bn in self.module.modules():
                if isinstance(bn, _BN):
                    bn.eval()
        for _ in range(self.epochs):
            for idx in torch.randperm(len(self.inputs), generator=generator).split(self.batch_size):
                optimizer.zero_grad()
                labels = None if self.labels is None else self.labels[idx]
                teacher = None if self.teacher is None else self.teacher[idx]
                logits = self.module(self.inputs[idx])
                loss = finetune_loss(logits, labels, teacher, self.distill, self.temperature)
                loss.backward()
                optimizer.step()
        self.module.eval()
        remove_masks(hooked)
        return onnx_weights(self.module, present) | self.swap.constants(ends)
