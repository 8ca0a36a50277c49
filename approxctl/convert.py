"""Conversion of a float model into approximate layers (SPEC section 2), as small fx passes.

1. ``trace``: torch.fx symbolic trace, to find every conv/linear call site (modules and
   ``F.conv2d`` / ``F.linear`` calls). Models fx cannot trace fall back to a module walk.
2. ``functional_to_modules``: functional calls whose weights are parameters become modules.
3. ``replace_layers``: each ``nn.Conv2d`` / ``nn.Linear`` not excluded becomes an approximate
   layer with its per-layer options (global < module type < name glob, like torch.ao's
   ``QConfigMapping``).
4. ``not_called``: conv/linear modules that no module call reaches (a function reads their weight,
   or the traced forward skips them) stay float and are listed in ``plan.unsupported`` with why.

Models without functional call sites keep their class: layers are swapped inside a deep copy.
"""

from __future__ import annotations

import copy
import fnmatch
import operator
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from approxctl import targets
from approxctl.errors import ApproxError
from approxctl.layers import ApproxConv2d, ApproxLayer, ApproxLinear, approx_layers
from approxctl.targets.base import TargetConfig

FUNCTIONAL_CONV = (F.conv2d, torch.conv2d)
FUNCTIONAL_LINEAR = (F.linear, torch._C._nn.linear)
MAPPING: dict[type[nn.Module], type[ApproxLayer]] = {
    nn.Conv2d: ApproxConv2d,
    nn.Linear: ApproxLinear,
}


@dataclass
class ConversionPlan:
    """What ``convert`` found and decided; kept on the model as ``model.approx_plan``."""

    target: str
    config: TargetConfig
    exclude: tuple[str, ...] = ()
    type_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    layer_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    converted: list[str] = field(default_factory=list)
    excluded: list[str] = field(default_factory=list)
    unsupported: dict[str, str] = field(default_factory=dict)
    traced: bool = True


def _layer_config(name: str, module: nn.Module, plan: ConversionPlan) -> TargetConfig:
    """Per-layer options: global, then module type, then every matching name glob in order."""
    options: dict[str, Any] = {}
    for type_name, values in plan.type_overrides.items():
        if type(module).__name__ == type_name or (
            type_name in ("Conv2d", "Linear") and isinstance(module, getattr(nn, type_name))
        ):
            options.update(values)
    for pattern, values in plan.layer_overrides.items():
        if fnmatch.fnmatchcase(name, pattern):
            options.update(values)
    if not options:
        return plan.config
    return targets.make_config(plan.target, plan.config, **options)


def _convertible(module: nn.Module) -> type[ApproxLayer] | None:
    """The approximate type for a conv/linear (or a subclass that keeps the parent's forward)."""
    if isinstance(module, ApproxLayer):
        return None
    for float_type, approx_type in MAPPING.items():
        if isinstance(module, float_type) and type(module).forward is float_type.forward:
            return approx_type
    return None


def _unsupported_reason(module: nn.Module) -> str | None:
    """Why a conv/linear-like module cannot be converted, or None."""
    if (
        isinstance(module, tuple(MAPPING))
        and not isinstance(module, ApproxLayer)
        and _convertible(module) is None
    ):
        return f"{type(module).__name__} overrides forward(); only plain Conv2d/Linear convert"
    if isinstance(
        module, (nn.Conv1d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
    ):
        return f"{type(module).__name__} is not a supported layer type (only Conv2d and Linear)"
    weight = getattr(module, "weight", None)
    if (
        isinstance(module, tuple(MAPPING))
        and weight is not None
        and not weight.dtype.is_floating_point
    ):
        return f"weights are {weight.dtype}; load the float model instead"
    return None


class _PathTracer(fx.Tracer):
    """fx's default tracer that also remembers in which submodule tracing failed."""

    def __init__(self) -> None:
        super().__init__()
        self.failed_in: str | None = None

    def call_module(
        self,
        m: nn.Module,
        forward: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:  # the innermost module raises first
                try:
                    self.failed_in = self.path_of_module(m)
                except NameError:  # a module that is not an attribute of the model
                    self.failed_in = type(m).__name__
            raise


def trace(model: nn.Module) -> fx.GraphModule | None:
    """fx graph of ``model``, or None (with a warning) when fx cannot trace it.

    The warning names the innermost submodule whose forward() could not be traced, and why.
    """
    tracer = _PathTracer()
    try:
        graph = tracer.trace(model)
    except Exception as exc:  # fx raises many exception types for untraceable code
        where = (
            f"in '{tracer.failed_in}'"
            if tracer.failed_in
            else f"in {type(model).__name__}.forward()"
        )
        text = str(exc).strip()
        reason = text.splitlines()[0] if text else ""
        warnings.warn(
            f"torch.fx could not trace {type(model).__name__} ({where}: "
            f"{type(exc).__name__}: {reason}); converting nn.Conv2d/nn.Linear modules only — "
            "functional conv/linear calls, if any, stay in float",
            stacklevel=3,
        )
        return None
    return fx.GraphModule(tracer.root, graph, type(model).__name__)


def _functional_call_sites(gm: fx.GraphModule) -> list[fx.Node]:
    return [
        n
        for n in gm.graph.nodes
        if n.op == "call_function" and n.target in (*FUNCTIONAL_CONV, *FUNCTIONAL_LINEAR)
    ]


def _arg(node: fx.Node, index: int, name: str, default: Any) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def functional_to_modules(gm: fx.GraphModule, plan: ConversionPlan) -> None:
    """Replace ``F.conv2d`` / ``F.linear`` calls on parameters by equivalent modules."""
    for node in _functional_call_sites(gm):
        weight, bias = _arg(node, 1, "weight", None), _arg(node, 2, "bias", None)
        if (
            not all(
                arg is None or (isinstance(arg, fx.Node) and arg.op == "get_attr")
                for arg in (weight, bias)
            )
            or weight is None
        ):
            plan.unsupported[node.name] = (
                "functional call whose weight is computed, not a parameter"
            )
            continue
        w = operator.attrgetter(weight.target)(gm)
        b = None if bias is None else operator.attrgetter(bias.target)(gm)
        if node.target in FUNCTIONAL_CONV:
            stride, padding, dilation, groups = (
                _arg(node, 3, "stride", 1),
                _arg(node, 4, "padding", 0),
                _arg(node, 5, "dilation", 1),
                _arg(node, 6, "groups", 1),
            )
            if any(isinstance(v, fx.Node) for v in (stride, padding, dilation, groups)):
                plan.unsupported[node.name] = "conv2d arguments are computed at run time"
                continue
            if w.dim() != 4:
                plan.unsupported[node.name] = "only 2-D convolutions are supported"
                continue
            module: nn.Module = nn.Conv2d(
                w.shape[1] * groups,
                w.shape[0],
                tuple(w.shape[2:]),
                stride=stride,
                padding=padding,
                dilation=dilation,
                groups=groups,
                bias=b is not None,
                device="meta",
            )
        else:
            module = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device="meta")
        module.weight = w if isinstance(w, nn.Parameter) else nn.Parameter(w, requires_grad=False)
        if b is not None:
            module.bias = b if isinstance(b, nn.Parameter) else nn.Parameter(b, requires_grad=False)
        name = f"{node.name}_module"
        gm.add_submodule(name, module)
        with gm.graph.inserting_after(node):
            new = gm.graph.call_module(name, (node.args[0],))
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
    gm.graph.eliminate_dead_code()
    gm.recompile()


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def replace_layers(root: nn.Module, names: Iterable[str], plan: ConversionPlan) -> None:
    """Swap each named conv/linear of ``root`` for its approximate layer, honouring excludes."""
    cache: dict[TargetConfig, targets.Target] = {}
    for name in names:
        module = root.get_submodule(name)
        if reason := _unsupported_reason(module):
            plan.unsupported[name] = reason
            continue
        approx_type = _convertible(module)
        if approx_type is None:
            continue
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in plan.exclude):
            plan.excluded.append(name)
            continue
        config = _layer_config(name, module, plan)
        if config not in cache:  # layers with equal options share one target (and one LUT)
            cache[config] = targets.make_target(config)
        layer = approx_type.from_float(module, cache[config], config, name)  # type: ignore[attr-defined]
        _set_submodule(root, name, layer)
        plan.converted.append(name)


def _describe_user(node: fx.Node) -> str:
    if node.op == "call_function":
        return f"{getattr(node.target, '__name__', node.target)}()"
    if node.op == "call_method":
        return f".{node.target}()"
    if node.op == "call_module":
        return f"module '{node.target}'"
    return node.op


def _calls_weights_itself(module: nn.Module) -> bool:
    """Modules whose forward reads their children's weights instead of calling them."""
    return isinstance(module, nn.MultiheadAttention)


def not_called(
    model: nn.Module, gm: fx.GraphModule | None, called: Iterable[str], plan: ConversionPlan
) -> dict[str, str]:
    """Conv2d/Linear modules of ``model`` that no module call reaches, each with the reason.

    They keep computing in float: a function that reads the layer's weight itself (Swin's
    ``shifted_window_attention``, ``nn.MultiheadAttention``'s ``out_proj``), or a branch the
    traced forward never takes (GoogLeNet/Inception auxiliary classifiers in eval mode).
    """
    called = set(called)
    users: dict[str, list[str]] = {}
    shared: set[int] = set()  # weights that a called layer uses (functional calls, tied weights)
    if gm is not None:
        for name in called:
            shared.add(id(getattr(gm.get_submodule(name), "weight", None)))
        for node in gm.graph.nodes:
            if node.op == "get_attr":
                owner = str(node.target).rpartition(".")[0]
                users.setdefault(owner, []).extend(_describe_user(u) for u in node.users)
    found: dict[str, str] = {}
    for name, module in model.named_modules():
        if (
            not name
            or not isinstance(module, tuple(MAPPING))
            or isinstance(module, ApproxLayer)
            or any(fnmatch.fnmatchcase(name, pattern) for pattern in plan.exclude)
        ):
            continue
        parents = [name.rsplit(".", i)[0] for i in range(1, name.count(".") + 1)]
        if gm is None:  # the module walk visits every layer; only known weight readers stay
            owner = next(
                (p for p in parents if _calls_weights_itself(model.get_submodule(p))), None
            )
            if owner is None:
                continue
        elif name in called or id(module.weight) in shared:
            continue
        else:
            owner = next((p for p in parents if p in called), None)
        if name in users:
            found[name] = (
                f"its weight is used directly by {', '.join(dict.fromkeys(users[name]))}, not "
                "through the layer's forward(); that computation stays in float"
            )
        elif owner is not None:
            found[name] = (
                f"inside {type(model.get_submodule(owner)).__name__} '{owner}', which computes "
                "with the layer's weight itself instead of calling the layer; stays in float"
            )
        else:
            found[name] = (
                "never called by the traced forward() (a branch the model skips in its current "
                "mode, e.g. an auxiliary classifier in eval mode); stays in float"
            )
    return found


def convert(
    model: nn.Module,
    target: str,
    *,
    exclude: Iterable[str] = (),
    example_inputs: Iterable[Any] | torch.Tensor | None = None,
    type_overrides: Mapping[str, Mapping[str, Any]] | None = None,
    layer_overrides: Mapping[str, Mapping[str, Any]] | None = None,
    **options: Any,
) -> nn.Module:
    """A copy of ``model`` whose conv/linear layers run on ``target`` (in ``float`` mode).

    ``exclude`` holds globs on qualified layer names (e.g. the first and last layer).
    ``type_overrides`` ({"Linear": {...}}) and ``layer_overrides`` ({"layer1.*": {...}}) set
    per-layer options over the global ``options``. With ``example_inputs`` (a tensor or an
    iterable of batches), the converted model is also calibrated on them.
    """
    config = targets.make_config(target, **options)
    plan = ConversionPlan(
        target=targets.canonical_name(target),
        config=config,
        exclude=tuple(exclude),
        type_overrides={k: dict(v) for k, v in (type_overrides or {}).items()},
        layer_overrides={k: dict(v) for k, v in (layer_overrides or {}).items()},
    )
    for options_set in (*plan.type_overrides.values(), *plan.layer_overrides.values()):
        targets.make_config(target, config, **options_set)  # fail early on a bad override
    gm = trace(model)
    if gm is not None and _functional_call_sites(gm):
        result: nn.Module = gm
        functional_to_modules(gm, plan)
    else:
        result = copy.deepcopy(model)
    plan.traced = gm is not None
    if gm is not None:  # the copy keeps the original's module names, so gm's names fit both
        names = list(dict.fromkeys(n.target for n in gm.graph.nodes if n.op == "call_module"))
    else:
        names = [n for n, _ in model.named_modules() if n]
    skipped = not_called(model, gm, names, plan)
    replace_layers(result, [n for n in names if n not in skipped], plan)
    plan.unsupported.update(skipped)
    if not plan.converted:
        raise ApproxError(
            "no Conv2d or Linear layer was converted"
            + (f" (all excluded by {list(plan.exclude)})" if plan.excluded else "")
            + "".join(f"; {name}: {why}" for name, why in list(plan.unsupported.items())[:3])
        )
    result.approx_plan = plan  # type: ignore[assignment]
    if example_inputs is not None:
        batches = [example_inputs] if isinstance(example_inputs, torch.Tensor) else example_inputs
        calibrate(result, batches)
    return result


# --------------------------------------------------------------------- modes
def set_mode(model: nn.Module, mode: str) -> nn.Module:
    """Put every approximate layer of ``model`` in ``float``, ``exact`` or ``inject`` mode."""
    layers = approx_layers(model)
    if not layers:
        raise ApproxError("the model has no approximate layers; convert it first")
    for _, layer in layers:
        layer.set_mode(mode)
    return model


def set_checkpointing(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Recompute each approximate layer's added ops in the backward pass (paper section 3.4)."""
    for _, layer in approx_layers(model):
        layer.checkpointing = enabled
    return model


def get_mode(model: nn.Module) -> str:
    modes = {layer.mode for _, layer in approx_layers(model)}
    return modes.pop() if len(modes) == 1 else "mixed"


# --------------------------------------------------------------- calibration
def _inputs(batch: Any) -> Any:
    if isinstance(batch, (tuple, list)):
        return batch[0]
    return batch


def _run(model: nn.Module, batches: Iterable[Any], max_batches: int | None) -> int:
    device = next(model.parameters()).device
    count = 0
    for batch in batches:
        if max_batches is not None and count >= max_batches:
            break
        x = _inputs(batch)
        if not isinstance(x, torch.Tensor):
            raise ApproxError(
                f"batches must yield tensors or (inputs, targets) pairs, got {type(x).__name__}"
            )
        model(x.to(device))
        count += 1
    if count == 0:
        raise ApproxError("no batches were given for calibration")
    return count


class _ModesKept:
    """Restores layer modes, flags and the train/eval state after a calibration pass."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __enter__(self) -> list[ApproxLayer]:
        self.layers = [layer for _, layer in approx_layers(self.model)]
        if not self.layers:
            raise ApproxError("the model has no approximate layers; convert it first")
        self.modes = [layer.mode for layer in self.layers]
        self.training = self.model.training
        self.model.eval()
        return self.layers

    def __exit__(self, *exc: object) -> None:
        for layer, mode in zip(self.layers, self.modes, strict=True):
            layer.mode = mode
            layer.observing = False
            layer.recording = False
        self.model.train(self.training)


@torch.no_grad()
def calibrate(
    model: nn.Module, batches: Iterable[Any], *, max_batches: int | None = None
) -> nn.Module:
    """Set activation scales (and ADC ranges for analog) from float-mode runs on ``batches``.

    ``batches`` is any re-iterable of input tensors or (inputs, targets) pairs, e.g. a
    DataLoader. Targets with ADCs take a second pass, once activation scales are known.
    """
    batches = batches if isinstance(batches, (list, tuple)) else list(_take(batches, max_batches))
    with _ModesKept(model) as layers:
        for layer in layers:
            layer.mode = "float"
            layer.act_absmax.zero_()
            layer.input_signed.fill_(False)
            layer.observing = True
        _run(model, batches, max_batches)
        for layer in layers:
            layer.observing = False
            layer.finish_observation()
        adc_layers = [layer for layer in layers if layer.target.has_adc]
        if adc_layers:
            hooks = [
                layer.register_forward_pre_hook(lambda m, args: m.target.observe_adc(m, args[0]))
                for layer in adc_layers
            ]
            try:
                _run(model, batches, max_batches)
            finally:
                for hook in hooks:
                    hook.remove()
            for layer in adc_layers:
                layer.target.finish_adc_calibration(layer)
    return model


def _take(batches: Iterable[Any], limit: int | None) -> Iterable[Any]:
    for i, batch in enumerate(batches):
        if limit is not None and i >= limit:
            return
        yield batch


@torch.no_grad()
def fit_error_model(
    model: nn.Module, batches: Iterable[Any], *, max_batches: int | None = None
) -> nn.Module:
    """Fit every layer's injection error model (SPEC section 4) on exact-mode runs of ``batches``.

    Each layer records ``exact - proxy`` against the proxy output in the exact-mode forward
    (so later layers see exact inputs, as in hardware), then fits its polynomial (type 1) or
    Gaussian (type 2) model.
    """
    with _ModesKept(model) as layers:
        for layer in layers:
            layer.mode = "exact"
            layer.recording = True
            layer.error_model.reset_recording()
        _run(model, batches, max_batches)
        for layer in layers:
            layer.error_model.fit_recorded()
    return model


@torch.no_grad()
def recalibrate_batchnorm(
    model: nn.Module, batches: Iterable[Any], *, mode: str = "exact", max_batches: int | None = None
) -> nn.Module:
    """Re-estimate every BatchNorm's running mean and variance on ``batches`` run in ``mode``.

    Running statistics are an exponential average over the last few training batches, gathered
    in the mode that trained them: after inject-mode epochs they describe the proxy plus
    injected noise, not the hardware, and even after exact-mode epochs they follow the last ~10
    batches. Exact-mode accuracy read with them can be off by several points (docs/training.md).
    This replaces them with the plain average over ``batches`` ("precise BatchNorm"); weights,
    scales and error models stay as they are. Returns ``model``.
    """
    norms = [
        m for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    ]  # fmt: skip
    if not norms:
        return model
    layers = [layer for _, layer in approx_layers(model)]
    modes = [layer.mode for layer in layers]
    momenta = [m.momentum for m in norms]
    training = model.training
    saved = [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone())
             for m in norms]  # fmt: skip
    try:
        if layers:
            set_mode(model, mode)
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # a cumulative average: every batch counts the same
        # BatchNorm updates its running statistics only in training mode; everything else
        # (dropout above all) runs as in evaluation.
        model.eval()
        for m in norms:
            m.train()
        _run(model, batches, max_batches)
    except BaseException:
        for m, (mean, var, count) in zip(norms, saved, strict=True):
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)
            m.num_batches_tracked.copy_(count)
        raise
    finally:
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum
        for layer, layer_mode in zip(layers, modes, strict=True):
            layer.mode = layer_mode
        model.train(training)
    return model
