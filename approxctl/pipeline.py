"""The command-line jobs as Python functions: SOURCE + data -> converted, calibrated model.

Each function takes plain values, returns a result object and prints nothing, so the CLI stays a
thin layer of parsing and printing, and notebooks can run the same jobs.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import torch
from torch import nn

from approxctl import io
from approxctl.convert import calibrate, convert, fit_error_model
from approxctl.data import DataBundle, load_data
from approxctl.errors import ApproxError
from approxctl.layers import approx_layers
from approxctl.sources import build_model, classify

Progress = Callable[[str, int, int], None]  # (stage, done, total)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ApproxError(f"unknown device '{name}'; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ApproxError("--device cuda was asked for, but no CUDA device is available")
    return device


@dataclass
class DataOptions:
    """The ``--data`` family of options (SPEC section 1)."""

    spec: str = "fashion-mnist"
    batch_size: int = 128
    image_size: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    limit_train: int | None = None
    limit_val: int | None = None
    workers: int = 0
    seed: int = 0

    def load(self) -> DataBundle:
        return load_data(
            self.spec,
            batch_size=self.batch_size,
            image_size=self.image_size,
            mean=self.mean,
            std=self.std,
            limit_train=self.limit_train,
            limit_val=self.limit_val,
            workers=self.workers,
            seed=self.seed,
        )


@dataclass
class ConvertResult:
    model: nn.Module
    out: Path | None
    layers: list[dict[str, Any]]
    data: dict[str, Any]
    seconds: float
    unsupported: dict[str, str] = field(default_factory=dict)
    excluded: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        plan = self.model.approx_plan  # type: ignore[union-attr]
        return {
            "target": plan.target,
            "options": plan.config.to_dict(),
            "out": str(self.out) if self.out else None,
            "data": self.data,
            "seconds": self.seconds,
            "layers": self.layers,
            "excluded": self.excluded,
            "unsupported": self.unsupported,
        }


def _batches(loader: Iterable[Any], count: int, device: torch.device) -> Iterator[torch.Tensor]:
    for x, _ in islice(loader, count):
        yield x.to(device)


def check_input_fits(model: nn.Module, bundle: DataBundle, device: torch.device) -> None:
    """One clear line when the data's images do not fit the model (channels, size, classes)."""
    shape = (bundle.in_channels, bundle.image_size, bundle.image_size)
    check_shape_fits(model, shape, bundle.num_classes, f"images from {bundle.name}", device)


def check_shape_fits(
    model: nn.Module, shape: tuple[int, ...], classes: int, what: str, device: torch.device
) -> None:
    """Run two zero images of ``shape`` (C, H, W) through ``model``: a clear error if it
    cannot take them or does not output ``classes`` scores. A converted directory says which
    input it was converted for."""
    c, h, w = shape
    built = _built_for(model)
    if built is not None and built[0] != c:
        hint = (
            f"it was converted for {built[0]}-channel images: evaluate it on data with "
            f"{built[0]} channel(s), or convert the model again for this data"
        )
    elif built is not None:
        hint = f"it was converted for {built[1]}x{built[1]} images: add --image-size {built[1]}"
    else:
        first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
        if first is not None and first.in_channels != c:  # e.g. torchvision on Fashion-MNIST
            hint = (
                f"the model's first convolution takes {first.in_channels}-channel images but the "
                f"data has {c}: use data with {first.in_channels} channel(s) or a model built "
                f"for {c}"
            )
        else:
            hint = "use --image-size or a model built for this input"
    x = torch.zeros(2, c, h, w, device=device)
    try:
        with torch.no_grad():
            out = model.eval()(x)
    except (RuntimeError, ValueError, IndexError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ApproxError(
            f"the model does not accept {c}x{h}x{w} {what} ({reason}); {hint}"
        ) from None
    if out.dim() != 2 or out.shape[1] != classes:
        raise ApproxError(
            f"the model outputs shape {tuple(out.shape[1:])} but the {what} have {classes} "
            "classes; use a model (or weights) with that many classes"
        )


def _built_for(model: nn.Module) -> tuple[int, int | None] | None:
    """(channels, image size) a converted model's source was built for, when recorded."""
    source = getattr(model, "approx_source", None)
    kwargs = getattr(source, "kwargs", None) or {}
    if "in_channels" not in kwargs:
        return None
    return int(kwargs["in_channels"]), kwargs.get("image_size")


def check_out_dir(out: Path | None) -> None:
    """Refuse an ``--out`` that cannot become a writable folder before any work is done."""
    if out is None:
        return
    for path in (out, *out.parents):
        if not path.exists():
            continue
        if not path.is_dir():
            raise ApproxError(f"--out {out}: {path} is a file, not a folder; choose another --out")
        if not os.access(path, os.W_OK | os.X_OK):
            raise ApproxError(
                f"--out {out}: {path} is not writable (permission denied or a read-only file "
                "system); fix its permissions or choose another --out"
            )
        return


def layer_rows(model: nn.Module) -> list[dict[str, Any]]:
    """Per-layer settings and measured emulation error, for tables and approx.json."""
    rows = []
    for name, layer in approx_layers(model):
        row = layer.describe()
        row["shape"] = list(layer.weight.shape)
        if bool(layer.error_model.fitted):
            row.update(layer.error_model.relative_error())
        rows.append(row | {"name": name})
    return rows


def convert_source(
    source: str,
    target: str,
    *,
    weights: str | None = None,
    exclude: Iterable[str] = (),
    data: DataOptions | None = None,
    out: str | Path | None = None,
    options: dict[str, Any] | None = None,
    calib_batches: int = 8,
    error_batches: int = 2,
    device: str = "auto",
    trust_pickle: bool = False,
) -> ConvertResult:
    """``approxctl convert``: build SOURCE, convert for ``target``, calibrate, fit, save.

    Calibration runs on ``calib_batches`` training batches; the error models (and the per-layer
    emulation error reported) on ``error_batches`` more, in exact mode.
    """
    started = time.perf_counter()
    data = data or DataOptions()
    if calib_batches < 1 or error_batches < 1:
        raise ApproxError("--calib-batches and --error-batches must be at least 1")
    if classify(source) == "dir":
        raise ApproxError(
            f"'{source}' is already converted; evaluate it with `approxctl eval {source}`"
        )
    dev = resolve_device(device)
    check_out_dir(Path(out) if out is not None else None)
    bundle = data.load()
    converted, _, _ = prepare_model(
        source, target, bundle, dev, weights=weights, exclude=exclude, options=options,
        calib_batches=calib_batches, error_batches=error_batches, trust_pickle=trust_pickle,
    )  # fmt: skip
    out_dir = Path(out) if out is not None else None
    if out_dir is not None:
        io.save(converted, out_dir)
    plan = converted.approx_plan  # type: ignore[union-attr]
    return ConvertResult(
        model=converted,
        out=out_dir,
        layers=layer_rows(converted),
        data=bundle.describe(),
        seconds=time.perf_counter() - started,
        unsupported=dict(plan.unsupported),
        excluded=list(plan.excluded),
    )


def device_name(device: torch.device) -> str:
    """A human-readable name of the device the numbers were measured on."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = "CPU"
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model} ({torch.get_num_threads()} threads)"


def profile_source(
    source: str,
    target: str | None,
    *,
    weights: str | None = None,
    data: DataOptions | None = None,
    input_shape: tuple[int, int, int] | None = None,
    num_classes: int = 10,
    options: dict[str, Any] | None = None,
    iters: int = 7,
    warmup: int = 2,
    checkpointing: bool = True,
    device: str = "auto",
    trust_pickle: bool = False,
) -> dict[str, Any]:
    """``approxctl profile``: seconds per training step and memory per mode (SPEC section 5).

    Inputs are one batch of ``data`` or, with ``input_shape`` (C, H, W), random normal images
    (for shapes no local dataset has, e.g. 3x32x32 without CIFAR-10).
    """
    from approxctl.profile import profile_modes

    data = data or DataOptions()
    dev = resolve_device(device)
    if iters < 1 or warmup < 0:
        raise ApproxError("--iters must be at least 1 and --warmup at least 0")
    generator = torch.Generator().manual_seed(data.seed)
    if input_shape is not None:
        if len(input_shape) != 3 or min(input_shape) < 1:
            raise ApproxError(f"--input-shape must be C,H,W, got {input_shape}")
        x = torch.randn(data.batch_size, *input_shape, generator=generator)
        y = torch.randint(0, num_classes, (data.batch_size,), generator=generator)
        in_channels, image_size, classes = input_shape[0], input_shape[1], num_classes
        data_name = f"random normal {'x'.join(map(str, input_shape))}"
    else:
        bundle = data.load()
        x, y = next(iter(bundle.train))
        if x.shape[0] < data.batch_size:
            raise ApproxError(f"{bundle.name} has fewer than {data.batch_size} training images")
        in_channels, image_size, classes = bundle.in_channels, bundle.image_size, bundle.num_classes
        data_name = bundle.name
    x, y = x.to(dev), y.to(dev)
    if classify(source) == "dir":
        converted = io.load(source, trust_pickle=trust_pickle).to(dev)
        model_name = source
        what = f"images from {data_name}" if input_shape is None else "--input-shape inputs"
        check_shape_fits(converted, tuple(x.shape[1:]), classes, what, dev)
    else:
        if target is None:
            raise ApproxError("--target is required unless SOURCE is a converted directory")
        model, info = build_model(
            source, weights=weights, num_classes=None if weights else classes,
            in_channels=in_channels, image_size=image_size, trust_pickle=trust_pickle,
        )  # fmt: skip
        converted = convert(model.to(dev), target, **(options or {}))
        calibrate(converted, [x])
        model_name = info.name
    fit_error_model(converted, [x])
    plan = converted.approx_plan  # type: ignore[union-attr]
    result = profile_modes(converted, x, y, iters=iters, warmup=warmup, checkpointing=checkpointing)
    return {
        "target": plan.target,
        "model": model_name,
        "device": device_name(dev),
        "batch_size": int(x.shape[0]),
        "input_shape": list(x.shape[1:]),
        "data": data_name,
        "iters": iters,
        **result,
    }


def prepare_model(
    source: str,
    target: str | None,
    bundle: DataBundle,
    dev: torch.device,
    *,
    weights: str | None = None,
    exclude: Iterable[str] = (),
    options: dict[str, Any] | None = None,
    calib_batches: int = 8,
    error_batches: int = 2,
    trust_pickle: bool = False,
) -> tuple[nn.Module, str | None, str]:
    """SOURCE -> (model on ``dev``, its target or None for a float model, a display name).

    A converted directory is loaded as it is (``target``, if given, must match it). Any other
    SOURCE is built for the data; with a ``target`` it is converted, calibrated on
    ``calib_batches`` training batches and its error models fitted on ``error_batches``.
    """
    from approxctl.targets import canonical_name

    if classify(source) == "dir":
        model = io.load(source, trust_pickle=trust_pickle).to(dev)
        stored = model.approx_plan.target  # type: ignore[union-attr]
        if target is not None and canonical_name(target) != stored:
            raise ApproxError(f"{source} was converted for target {stored}, not {target}")
        if options:
            raise ApproxError(f"{source} is already converted; target options cannot change")
        check_input_fits(model, bundle, dev)
        return model, stored, source
    model, info = build_model(
        source, weights=weights, num_classes=None if weights else bundle.num_classes,
        in_channels=bundle.in_channels, image_size=bundle.image_size, trust_pickle=trust_pickle,
    )  # fmt: skip
    model = model.to(dev)
    check_input_fits(model, bundle, dev)
    if target is None:
        return model, None, info.name
    converted = convert(model, target, exclude=exclude, **(options or {}))
    converted.approx_source = info  # type: ignore[assignment]
    if info.kind == "onnx":
        converted.approx_onnx_path = source  # type: ignore[assignment]
    calibrate(converted, list(_batches(bundle.train, calib_batches, dev)))
    fit_error_model(converted, list(_batches(bundle.train, error_batches, dev)))
    return converted, converted.approx_plan.target, info.name  # type: ignore[union-attr]


def eval_source(
    source: str,
    target: str | None = None,
    *,
    modes: Iterable[str] = ("exact",),
    weights: str | None = None,
    exclude: Iterable[str] = (),
    data: DataOptions | None = None,
    out: str | Path | None = None,
    options: dict[str, Any] | None = None,
    calib_batches: int = 8,
    error_batches: int = 2,
    bn_recalib: int = 0,
    device: str = "auto",
    trust_pickle: bool = False,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """``approxctl eval``: accuracy per mode on the validation split, report.json/md in ``out``.

    A float model (no target) is evaluated in float mode only; its result is what plain
    PyTorch gives on the same data and preprocessing. With ``bn_recalib`` > 0, BatchNorm
    statistics are re-estimated in each mode on the first ``bn_recalib`` training batches
    before that mode is evaluated (docs/training.md); nothing is written back to ``source``.
    """
    from approxctl.convert import recalibrate_batchnorm
    from approxctl.evaluate import evaluate
    from approxctl.layers import MODES
    from approxctl.report import eval_markdown, write_report

    data = data or DataOptions()
    modes = list(dict.fromkeys(modes))
    for mode in modes:
        if mode not in MODES:
            raise ApproxError(f"unknown mode '{mode}'; choose from {', '.join(MODES)}")
    if isinstance(bn_recalib, bool) or not isinstance(bn_recalib, int) or bn_recalib < 0:
        raise ApproxError(f"--bn-recalib must be an integer >= 0, got {bn_recalib!r}")
    dev = resolve_device(device)
    check_out_dir(Path(out) if out is not None else None)
    bundle = data.load()
    model, target_name, name = prepare_model(
        source, target, bundle, dev, weights=weights, exclude=exclude, options=options,
        calib_batches=calib_batches, error_batches=error_batches, trust_pickle=trust_pickle,
    )  # fmt: skip
    if target_name is None and modes != ["float"]:
        raise ApproxError(
            "without --target only --mode float applies; give --target to emulate hardware"
        )
    results = []
    order = bundle.train_generator.get_state()  # every mode recalibrates on the same batches
    for mode in modes:
        if bn_recalib:
            bundle.train_generator.set_state(order)
            recalibrate_batchnorm(model, bundle.train, mode=mode, max_batches=bn_recalib)
        result = evaluate(
            model, bundle.val, mode=mode, device=dev, total=len(bundle.val),
            progress=(lambda done, total, m=mode: progress(f"eval {m}", done, total))
            if progress else None,
        )  # fmt: skip
        results.append(result.to_json())
    doc = {
        "model": name,
        "target": target_name,
        "options": model.approx_plan.config.to_dict() if target_name else None,  # type: ignore[union-attr]
        "device": device_name(dev),
        "data": bundle.describe(),
        "bn_recalib": bn_recalib,
        "results": results,
    }
    if out is not None:
        out_dir = Path(out)
        write_report(out_dir, doc, eval_markdown(doc))
        doc["out"] = str(out_dir)
    return doc


def train_source(
    source: str,
    target: str,
    config: Any,
    *,
    weights: str | None = None,
    exclude: Iterable[str] = (),
    data: DataOptions | None = None,
    out: str | Path | None = None,
    options: dict[str, Any] | None = None,
    resume: bool = False,
    device: str = "auto",
    trust_pickle: bool = False,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """``approxctl train``: the paper's method end to end; writes the SPEC section 5 outputs.

    ``config`` is a ``train.TrainConfig``. SOURCE is built for the data (or loaded, when it is a
    converted directory) and trained; ``out`` receives model.safetensors + approx.json,
    checkpoints/last.pt, report.json/md and plots/.
    """
    from approxctl import distributed
    from approxctl.plots import convergence_plot, error_fit_plots
    from approxctl.report import train_markdown, write_report
    from approxctl.targets import canonical_name, make_config
    from approxctl.train import Trainer

    data = data or DataOptions()
    config.validate()
    target = canonical_name(target)
    make_config(target, **(options or {}))  # bad options fail now, not after a pretrain epoch
    out_dir = Path(out) if out is not None else None
    if resume and out_dir is None:
        raise ApproxError("--resume needs --out: the directory of the run to continue")
    dev = resolve_device(device)
    check_out_dir(out_dir)
    ctx = distributed.context(dev)
    if out_dir is not None and ctx.is_main:  # what a killed run was writing when it died
        io.remove_stale_temporaries(out_dir, ("checkpoints", "plots"))
    if ctx.enabled and dev.type == "cuda":
        dev = torch.device("cuda", ctx.local_rank)
    data.seed = config.seed
    torch.manual_seed(config.seed)  # before the model's random initialization
    bundle = data.load()
    started = time.perf_counter()
    if classify(source) == "dir":
        if config.pretrain:
            raise ApproxError("--pretrain applies to float models, not a converted directory")
        config.pretrain = 0
        model, _, name = prepare_model(source, target, bundle, dev, trust_pickle=trust_pickle)
        convert_fn, pretrained, info = None, True, getattr(model, "approx_source", None)
    else:
        model, info = build_model(
            source, weights=weights, num_classes=None if weights else bundle.num_classes,
            in_channels=bundle.in_channels, image_size=bundle.image_size,
            trust_pickle=trust_pickle,
        )  # fmt: skip
        model = model.to(dev)
        check_input_fits(model, bundle, dev)
        name, pretrained = info.name, weights is not None

        def convert_fn(float_model: nn.Module) -> nn.Module:
            converted = convert(float_model, target, exclude=exclude, **(options or {}))
            converted.approx_source = info  # type: ignore[assignment]
            if info.kind == "onnx":
                converted.approx_onnx_path = source  # type: ignore[assignment]
            return converted

    if config.pretrain is None:  # train from scratch in float first, unless weights are given
        config.pretrain = 0 if pretrained else 1
    trainer = Trainer(
        model, bundle, config, device=dev, out=out_dir, convert_fn=convert_fn,
        progress=progress, pretrained=pretrained, dist_ctx=ctx,
    )  # fmt: skip
    summary = trainer.run(resume=resume)
    model = trainer.model
    if not ctx.is_main:  # rank 0 reports and writes; the others are done
        distributed.barrier(ctx)
        return {"rank": ctx.rank, "summary": summary}
    # Final statistics, for plots and model.safetensors, on batches that do not depend on how
    # the run got here (uninterrupted, or resumed from any checkpoint).
    bundle.train_generator.manual_seed(config.seed)
    fit_error_model(model, list(_batches(bundle.train, 2, dev)))
    doc = {
        "model": name,
        "target": target,
        "options": model.approx_plan.config.to_dict(),  # type: ignore[union-attr]
        "train": vars(config) | {},
        "device": device_name(dev),
        "data": bundle.describe(),
        "summary": summary,
        "history": trainer.state.history,
        "layers": layer_rows(model),
        "seconds": time.perf_counter() - started,
        "peak_memory_mb": _peak_memory_mb(dev),
    }
    if out_dir is not None:
        io.save(model, out_dir)
        plots = out_dir / "plots"
        convergence_plot(trainer.state.history, plots / "convergence.png", f"{name} on {target}")
        doc["plots"] = [str(p.relative_to(out_dir)) for p in error_fit_plots(model, plots)]
        doc["plots"].insert(0, "plots/convergence.png")
        write_report(out_dir, doc, train_markdown(doc))
        doc["out"] = str(out_dir)
    distributed.barrier(ctx)
    return doc


def _peak_memory_mb(device: torch.device) -> float:
    """Peak CUDA memory, or the process's peak resident set size on CPU (Linux: KiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
