"""The ``approxctl`` command line: parse, call the library, print (SPEC section 1).

Errors a user can cause (``ApproxError``, unreadable or unwritable files) print one line on
stderr and exit with status 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import json
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from typer.core import TyperGroup

try:  # typer >= 0.20 vendors click
    from typer._click.exceptions import ClickException, UsageError
except ImportError:  # pragma: no cover - older typer on top of click
    from click.exceptions import ClickException, UsageError

from approxctl.errors import ApproxError

out = Console()
err = Console(stderr=True)


class _OneLineUsageErrors(TyperGroup):
    """Typer's command group, printing usage errors (a flag value that does not parse, a
    missing or unknown option) as one line on stderr with exit status 2, like every other
    error of bad input (SPEC section 1), instead of a usage box."""

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            status = super().main(*args, standalone_mode=False, **kwargs)
        except UsageError as exc:
            if type(exc).__name__ == "NoArgsIsHelpError":  # plain `approxctl`: the help text
                exc.show()
                sys.exit(exc.exit_code)
            command = exc.ctx.command_path if exc.ctx is not None else "approxctl"
            message = " ".join(exc.format_message().split()).rstrip(".")
            err.print(
                f"[bold red]error:[/] {escape(message)}; see `{escape(command)} --help`",
                highlight=False,
                soft_wrap=True,
            )
            sys.exit(exc.exit_code)
        except ClickException as exc:
            exc.show()
            sys.exit(exc.exit_code)
        except typer.Abort:
            err.print("aborted")
            sys.exit(1)
        sys.exit(status if isinstance(status, int) else 0)


app = typer.Typer(
    cls=_OneLineUsageErrors,
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Convert, emulate bit-exactly and retrain CNNs for approximate hardware.",
)

F = TypeVar("F", bound=Callable[..., Any])

JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show tracebacks of errors.")]
# Options several commands share, declared once so their flags and help read the same.
DeviceOpt = Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N.")]
TrustPickleOpt = Annotated[
    bool, typer.Option(help="Allow pickled full modules (runs code from the file).")
]
LutOpt = Annotated[str | None, typer.Option(help="approx-mult: multiplier.")]
AdcBitsOpt = Annotated[int | None, typer.Option(help="analog: ADC resolution.")]
ScLengthOpt = Annotated[int | None, typer.Option(help="sc: stream length.")]
NoiseScaleOpt = Annotated[
    float | None,
    typer.Option(help="Factor on the injected error's std (default: 1, as fitted; 0: mean only)."),
]


def _fail(message: str) -> None:
    # escape: messages quote user input and TOML keys such as "[options]", which are not markup
    message = " ".join(message.split())  # one line, whatever the library's message held
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def _os_error_message(exc: OSError) -> str:
    """One line for a file-system error: what failed on which path, and what to do."""
    path = exc.filename or "the output"
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"no space left on the device writing {path}; free space or choose another --out"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return f"permission denied: {path}; fix its permissions or choose another --out"
    if exc.errno == errno.EROFS:
        return f"{path} is on a read-only file system; choose another --out"
    if exc.errno in (errno.EEXIST, errno.ENOTDIR):
        return f"{path} (or a folder above it) is a file, not a folder; choose another --out"
    reason = exc.strerror or type(exc).__name__
    return f"{reason}: {path}; check the path (and --out)"


def user_errors(func: F) -> F:
    """Turn the errors a user can cause into one line on stderr and exit status 2."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if kwargs.get("debug"):
            return func(*args, **kwargs)
        try:
            return func(*args, **kwargs)
        except ApproxError as exc:
            _fail(str(exc))
        except OSError as exc:
            if exc.errno is None:  # not a file-system error: a bug, shown in full
                raise
            _fail(_os_error_message(exc))
        except KeyboardInterrupt:
            if func.__name__ == "train":
                err.print(
                    "interrupted; checkpoints/last.pt in --out holds the last completed epoch: "
                    "run the same command with --resume to continue from it",
                    highlight=False,
                    soft_wrap=True,
                )
            else:
                err.print("interrupted")
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


def _print_json(doc: Any) -> None:
    sys.stdout.write(json.dumps(doc, indent=2, default=str) + "\n")


# ------------------------------------------------------------------ options
# Command-line flags that set target options: flag -> (target, option name in the dataclass).
TARGET_FLAGS: dict[str, tuple[str | None, str]] = {
    "sc_length": ("sc", "length"),
    "sc_gain": ("sc", "gain"),
    "lut": ("approx-mult", "lut"),
    "adc_bits": ("analog", "adc_bits"),
    "array_size": ("analog", "array_size"),
    "adc_calib": ("analog", "adc_calib"),
    "proxy_clamp": ("analog", "proxy_clamp"),
    "proxy": (None, "proxy"),
    "poly_degree": (None, "poly_degree"),
    "poly_bins": (None, "poly_bins"),
    "noise_scale": (None, "noise_scale"),
    "backend": (None, "backend"),
}


def parse_sc_phase(text: str) -> dict[str, tuple[int, int]]:
    """``"1,0:3,1"`` -> phase_a (1,0), phase_b (3,1): (alpha, beta) of each stream's phase rule."""
    try:
        a, b = text.split(":")
        rules = [tuple(int(v) for v in part.split(",")) for part in (a, b)]
    except ValueError:
        raise ApproxError(
            f"--sc-phase must look like 'alpha,beta:alpha,beta' (activations:weights), got '{text}'"
        ) from None
    if any(len(r) != 2 for r in rules):
        raise ApproxError(f"--sc-phase needs two integers per stream, got '{text}'")
    return {"phase_a": rules[0], "phase_b": rules[1]}  # type: ignore[dict-item]


def target_options(target: str, flags: dict[str, Any], sc_phase: str | None) -> dict[str, Any]:
    from approxctl.targets import canonical_name

    name = canonical_name(target)
    options: dict[str, Any] = {}
    for flag, value in flags.items():
        if value is None:
            continue
        owner, option = TARGET_FLAGS[flag]
        if flag == "proxy" and name == "approx-mult":
            raise ApproxError("--proxy/--no-proxy applies to targets sc and analog (approx-mult "
                              "has no proxy activation)")  # fmt: skip
        if owner is not None and owner != name:
            raise ApproxError(f"--{flag.replace('_', '-')} applies to target {owner}, not {name}")
        options[option] = value
    if sc_phase is not None:
        if name != "sc":
            raise ApproxError(f"--sc-phase applies to target sc, not {name}")
        options.update(parse_sc_phase(sc_phase))
    return options


def _floats(text: str | None, flag: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise ApproxError(f"{flag} takes comma-separated numbers, got '{text}'") from None


# ------------------------------------------------------------------ commands
@app.command()
@user_errors
def targets(json_out: JsonOpt = False, debug: DebugOpt = False) -> None:
    """List the hardware targets with their options and defaults."""
    from approxctl.targets import ALIASES, TARGETS

    doc = []
    for name, cls in TARGETS.items():
        fields = dataclasses.fields(cls.config_cls)
        doc.append(
            {
                "name": name,
                "aliases": [a for a, t in ALIASES.items() if t == name],
                "summary": cls.summary,
                "error_injection": "type 1 (polynomial)"
                if cls.error_kind == "poly"
                else "type 2 (Gaussian)",
                "options": {f.name: f.default for f in fields},
                "flags": {
                    "--" + flag.replace("_", "-"): option
                    for flag, (owner, option) in TARGET_FLAGS.items()
                    if owner in (None, name)
                },
            }
        )
    if json_out:
        _print_json(doc)
        return
    for entry in doc:
        table = Table(title=f"{entry['name']}  —  {entry['summary']}", title_justify="left")
        table.add_column("option")
        table.add_column("default")
        table.add_column("flag")
        flag_of = {option: flag for flag, option in entry["flags"].items()}
        for option, default in entry["options"].items():
            flag = flag_of.get(option, "--sc-phase" if option.startswith("phase_") else "")
            table.add_row(option, repr(default), flag)
        out.print(table)


@app.command()
@user_errors
def luts(json_out: JsonOpt = False, debug: DebugOpt = False) -> None:
    """List the bundled EvoApprox multipliers with their published error and power figures."""
    from approxctl.luts import DEFAULT_LUT, bundled_luts

    infos = list(bundled_luts().values())
    if json_out:
        _print_json([dataclasses.asdict(i) | {"default": i.name == DEFAULT_LUT} for i in infos])
        return
    table = Table(title="EvoApproxLib multipliers (MIT, EHW@FIT Brno); figures from the library")
    for col in ("name", "kind", "MAE %", "WCE %", "MRE %", "EP %", "power mW", "area um2"):
        table.add_column(col, justify="left" if col in ("name", "kind") else "right", no_wrap=True)
    for i in infos:
        kind = f"{i.bits}{'s' if i.signed else 'u'}"
        name = f"{i.name} (default)" if i.name == DEFAULT_LUT else i.name
        table.add_row(name, kind, f"{i.mae_pct:g}", f"{i.wce_pct:g}", f"{i.mre_pct:g}",
                      f"{i.ep_pct:g}", f"{i.power_mw:g}", f"{i.area_um2:g}")  # fmt: skip
    out.print(table)


@app.command()
@user_errors
def convert(
    source: Annotated[
        str,
        typer.Argument(help="Built-in or torchvision model name, pkg.mod:Class, or .onnx file."),
    ],
    target: Annotated[str, typer.Option("--target", "-t", help="sc, approx-mult (am) or analog.")],
    weights: Annotated[
        str | None, typer.Option(help=".pt/.pth state dict or .safetensors.")
    ] = None,
    exclude: Annotated[
        list[str] | None, typer.Option(help="Glob on layer names to keep in float; repeatable.")
    ] = None,
    data: Annotated[
        str,
        typer.Option(
            help="fashion-mnist[:PATH], mnist:PATH, cifar10:PATH, imagefolder:PATH, digits."
        ),
    ] = "fashion-mnist",
    out_dir: Annotated[
        Path | None, typer.Option("--out", help="Output directory (default: runs/SOURCE-TARGET).")
    ] = None,
    calib_batches: Annotated[int, typer.Option(help="Batches for activation/ADC calibration.")] = 8,
    error_batches: Annotated[int, typer.Option(help="Batches for the error models.")] = 2,
    batch_size: Annotated[int, typer.Option(help="Batch size.")] = 128,
    image_size: Annotated[int | None, typer.Option(help="Resize/pad images to this size.")] = None,
    mean: Annotated[
        str | None, typer.Option(help="Normalization mean, one value or one per channel.")
    ] = None,
    std: Annotated[
        str | None, typer.Option(help="Normalization std, one value or one per channel.")
    ] = None,
    limit_train: Annotated[
        int | None, typer.Option(help="Use the first N training samples.")
    ] = None,
    limit_val: Annotated[
        int | None, typer.Option(help="Use the first N validation samples.")
    ] = None,
    device: DeviceOpt = "auto",
    trust_pickle: TrustPickleOpt = False,
    sc_length: Annotated[int | None, typer.Option(help="sc: stream length L (16..256).")] = None,
    sc_phase: Annotated[
        str | None, typer.Option(help="sc: phase rules 'a,b:a,b' (activations:weights).")
    ] = None,
    sc_gain: Annotated[float | None, typer.Option(help="sc: weight gain g.")] = None,
    lut: Annotated[
        str | None, typer.Option(help="approx-mult: bundled multiplier name or .npy table.")
    ] = None,
    adc_bits: AdcBitsOpt = None,
    array_size: Annotated[int | None, typer.Option(help="analog: inputs per array.")] = None,
    adc_calib: Annotated[
        str | None, typer.Option(help="analog: mse, max or percentile:P.")
    ] = None,
    proxy_clamp: Annotated[
        float | None, typer.Option(help="analog: T of the proxy clamp.")
    ] = None,
    proxy: Annotated[
        bool | None,
        typer.Option(
            "--proxy/--no-proxy",
            help="sc, analog: backward through the proxy activation (default) or plain.",
        ),
    ] = None,
    poly_degree: Annotated[int | None, typer.Option(help="Type-1 error polynomial degree.")] = None,
    poly_bins: Annotated[int | None, typer.Option(help="Type-1 error bins.")] = None,
    noise_scale: NoiseScaleOpt = None,
    backend: Annotated[str | None, typer.Option(help="Emulation backend: auto, torch, ...")] = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Convert a model's conv/linear layers for a hardware target, calibrate and save it."""
    from approxctl.pipeline import DataOptions, convert_source
    from approxctl.targets import canonical_name

    flags = {k: v for k, v in locals().items() if k in TARGET_FLAGS}
    options = target_options(target, flags, sc_phase)
    target = canonical_name(target)
    if out_dir is None:
        out_dir = Path("runs") / f"{Path(source).stem.replace(':', '.')}-{target}"
    data_options = DataOptions(
        spec=data, batch_size=batch_size, image_size=image_size,
        mean=_floats(mean, "--mean"), std=_floats(std, "--std"),
        limit_train=limit_train, limit_val=limit_val,
    )  # fmt: skip
    with err.status("converting…", spinner="dots") if not (quiet or json_out) else _nullcontext():
        result = convert_source(
            source, target, weights=weights, exclude=exclude or (), data=data_options,
            out=out_dir, options=options, calib_batches=calib_batches,
            error_batches=error_batches, device=device, trust_pickle=trust_pickle,
        )  # fmt: skip
    if json_out:
        _print_json(result.to_json())
        return
    _print_layers(result.layers, target)
    for name, reason in result.unsupported.items():
        err.print(f"[yellow]not converted:[/] {name}: {reason}")
    if result.excluded:
        out.print(f"kept in float (--exclude): {', '.join(result.excluded)}")
    out.print(f"wrote {result.out}/model.safetensors and approx.json in {result.seconds:.1f} s")


@app.command()
@user_errors
def train(
    source: Annotated[
        str | None,
        typer.Argument(help="Model (as for convert) or a converted directory (default: tinyconv)."),
    ] = None,
    target: Annotated[
        str | None, typer.Option("--target", "-t", help="sc, approx-mult (am) or analog.")
    ] = None,
    epochs: Annotated[
        int | None, typer.Option(help="Error-injection epochs (default: 2).")
    ] = None,
    finetune: Annotated[
        float | None,
        typer.Option(help="Exact-mode fine-tune epochs; fractions allowed (default: 0.5)."),
    ] = None,
    pretrain: Annotated[
        int | None,
        typer.Option(help="Float epochs before conversion (default: 1 without --weights, else 0)."),
    ] = None,
    recipe: Annotated[Path | None, typer.Option(help="TOML recipe; flags override it.")] = None,
    weights: Annotated[
        str | None, typer.Option(help=".pt/.pth state dict or .safetensors.")
    ] = None,
    exclude: Annotated[
        list[str] | None, typer.Option(help="Glob on layer names to keep in float.")
    ] = None,
    data: Annotated[str | None, typer.Option(help="Dataset (default: fashion-mnist).")] = None,
    out_dir: Annotated[
        Path | None, typer.Option("--out", help="Output directory (default: runs/SOURCE-TARGET).")
    ] = None,
    resume: Annotated[
        bool, typer.Option(help="Continue the run in --out from its last checkpoint.")
    ] = False,
    batch_size: Annotated[int | None, typer.Option(help="Batch size (default: 128).")] = None,
    lr: Annotated[float | None, typer.Option(help="Learning rate (default: 0.01).")] = None,
    optimizer: Annotated[
        str | None, typer.Option(help="sgd, adam or adamw (default: sgd).")
    ] = None,
    scheduler: Annotated[
        str | None, typer.Option(help="cosine, step or none (default: cosine).")
    ] = None,
    seed: Annotated[
        int | None, typer.Option(help="Seed; runs are reproducible (default: 0).")
    ] = None,
    workers: Annotated[int | None, typer.Option(help="Data loader workers (default: 0).")] = None,
    calib_per_epoch: Annotated[
        int | None, typer.Option(help="Type-1 error-model refits per epoch (default: 5).")
    ] = None,
    calib_every: Annotated[
        int | None, typer.Option(help="Type-2 refit every N batches (default: 10).")
    ] = None,
    val_every: Annotated[
        int | None, typer.Option(help="Validate every N epochs (default: 1).")
    ] = None,
    amp: Annotated[
        bool | None, typer.Option("--amp/--no-amp", help="Autocast the float parts.")
    ] = None,
    checkpointing: Annotated[
        bool | None,
        typer.Option(
            "--checkpointing/--no-checkpointing",
            help="Recompute the added ops in backward (less memory).",
        ),
    ] = None,
    image_size: Annotated[int | None, typer.Option(help="Resize/pad images to this size.")] = None,
    limit_train: Annotated[
        int | None, typer.Option(help="Use the first N training samples.")
    ] = None,
    limit_val: Annotated[
        int | None, typer.Option(help="Use the first N validation samples.")
    ] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda, cuda:N.")] = None,
    trust_pickle: TrustPickleOpt = False,
    sc_length: ScLengthOpt = None,
    sc_phase: Annotated[str | None, typer.Option(help="sc: phase rules 'a,b:a,b'.")] = None,
    sc_gain: Annotated[float | None, typer.Option(help="sc: weight gain g.")] = None,
    lut: LutOpt = None,
    adc_bits: AdcBitsOpt = None,
    array_size: Annotated[int | None, typer.Option(help="analog: inputs per array.")] = None,
    proxy: Annotated[
        bool | None,
        typer.Option(
            "--proxy/--no-proxy",
            help="sc, analog: backward through the proxy activation (default) or plain.",
        ),
    ] = None,
    noise_scale: NoiseScaleOpt = None,
    bn_recalib: Annotated[
        int | None,
        typer.Option(
            help="Re-estimate BatchNorm statistics in exact mode on N training batches before "
            "each exact-mode validation (default: 0, off)."
        ),
    ] = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Train for the hardware: error-injection epochs, then an exact-mode fine-tune."""
    from approxctl.pipeline import DataOptions, train_source
    from approxctl.recipes import load_recipe, pick
    from approxctl.targets import canonical_name
    from approxctl.train import TrainConfig

    book = load_recipe(recipe) if recipe is not None else {}
    source = pick(source, book, "source", "tinyconv")
    target = pick(target, book, "target", None)
    if target is None:
        raise ApproxError("--target is required (sc, approx-mult/am or analog)")
    flags = {
        "sc_length": sc_length, "sc_gain": sc_gain, "lut": lut, "adc_bits": adc_bits,
        "array_size": array_size, "proxy": proxy, "noise_scale": noise_scale,
    }  # fmt: skip
    options = dict(book.get("options", {})) | target_options(target, flags, sc_phase)
    defaults = TrainConfig()
    given = {
        "pretrain": pretrain, "epochs": epochs, "finetune": finetune, "lr": lr,
        "optimizer": optimizer, "scheduler": scheduler, "seed": seed,
        "calib_per_epoch": calib_per_epoch, "calib_every": calib_every, "val_every": val_every,
        "amp": amp, "checkpointing": checkpointing, "bn_recalib": bn_recalib,
    }  # fmt: skip
    config = TrainConfig(
        **{key: pick(value, book, key, getattr(defaults, key)) for key, value in given.items()},
        **{k: book[k] for k in ("momentum", "weight_decay") if k in book},
    )
    if out_dir is None:
        out_dir = Path("runs") / f"{Path(source).stem.replace(':', '.')}-{canonical_name(target)}"
    data_options = DataOptions(
        spec=pick(data, book, "data", "fashion-mnist"),
        batch_size=pick(batch_size, book, "batch_size", 128),
        image_size=pick(image_size, book, "image_size", None),
        mean=tuple(book["mean"]) if "mean" in book else None,
        std=tuple(book["std"]) if "std" in book else None,
        limit_train=pick(limit_train, book, "limit_train", None),
        limit_val=pick(limit_val, book, "limit_val", None),
        workers=pick(workers, book, "workers", 0),
    )
    with _progress(quiet or json_out) as progress:
        doc = train_source(
            source, target, config, weights=pick(weights, book, "weights", None),
            exclude=exclude or book.get("exclude", ()), data=data_options, out=out_dir,
            options=options, resume=resume, device=pick(device, book, "device", "auto"),
            trust_pickle=trust_pickle, progress=progress,
        )  # fmt: skip
    if "rank" in doc:  # a torchrun worker other than rank 0: rank 0 reports
        return
    if json_out:
        _print_json(doc)
        return
    from approxctl.report import COLUMNS

    summary = doc["summary"]
    table = Table(
        title=f"{doc['model']} on {doc['target']}: validation top-1 in exact mode",
        title_justify="left",
    )
    shown = [(key, label) for key, label in COLUMNS if key in summary]
    for _, label in shown:
        table.add_column(label, justify="right")
    table.add_row(*(f"{100 * summary[key]['top1']:.2f}%" for key, _ in shown))
    out.print(table)
    out.print(f"wrote {out_dir}: model.safetensors, approx.json, report.md, plots/ "
              f"({doc['seconds']:.0f} s)")  # fmt: skip


@app.command(name="eval")
@user_errors
def eval_command(
    source: Annotated[
        str, typer.Argument(help="A converted directory, or a model as for convert.")
    ],
    target: Annotated[
        str | None, typer.Option("--target", "-t", help="Convert SOURCE for this target first.")
    ] = None,
    mode: Annotated[
        list[str] | None,
        typer.Option(
            help="exact, inject or float; repeatable (default: exact, or float without a target)."
        ),
    ] = None,
    weights: Annotated[
        str | None, typer.Option(help=".pt/.pth state dict or .safetensors.")
    ] = None,
    exclude: Annotated[
        list[str] | None, typer.Option(help="Glob on layer names to keep in float.")
    ] = None,
    data: Annotated[
        str, typer.Option(help="Dataset (see convert); evaluated on its validation split.")
    ] = "fashion-mnist",
    out_dir: Annotated[
        Path | None, typer.Option("--out", help="Write report.json and report.md here.")
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Batch size.")] = 256,
    image_size: Annotated[int | None, typer.Option(help="Resize/pad images to this size.")] = None,
    mean: Annotated[
        str | None, typer.Option(help="Normalization mean, one value or one per channel.")
    ] = None,
    std: Annotated[
        str | None, typer.Option(help="Normalization std, one value or one per channel.")
    ] = None,
    limit_train: Annotated[
        int | None, typer.Option(help="Use the first N training samples (calibration).")
    ] = None,
    limit_val: Annotated[int | None, typer.Option(help="Evaluate on N validation samples.")] = None,
    calib_batches: Annotated[
        int, typer.Option(help="Batches for calibration when converting.")
    ] = 8,
    bn_recalib: Annotated[
        int,
        typer.Option(
            help="Re-estimate BatchNorm statistics in each mode on N training batches first."
        ),
    ] = 0,
    device: DeviceOpt = "auto",
    trust_pickle: TrustPickleOpt = False,
    lut: LutOpt = None,
    adc_bits: AdcBitsOpt = None,
    sc_length: ScLengthOpt = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Top-1/top-5 accuracy per mode, with per-layer emulation error (report.json/md)."""
    from approxctl.pipeline import DataOptions, eval_source

    options = {}
    if target is not None:
        flags = {"lut": lut, "adc_bits": adc_bits, "sc_length": sc_length}
        options = target_options(target, flags, None)
    elif any(v is not None for v in (lut, adc_bits, sc_length)):
        raise ApproxError("target options need --target (a converted directory keeps its own)")
    modes = mode or (["exact"] if target is not None or Path(source).is_dir() else ["float"])
    data_options = DataOptions(
        spec=data, batch_size=batch_size, image_size=image_size,
        mean=_floats(mean, "--mean"), std=_floats(std, "--std"),
        limit_train=limit_train, limit_val=limit_val,
    )  # fmt: skip
    with _progress(quiet or json_out) as progress:
        doc = eval_source(
            source, target, modes=modes, weights=weights, exclude=exclude or (),
            data=data_options, out=out_dir, options=options, calib_batches=calib_batches,
            bn_recalib=bn_recalib, device=device, trust_pickle=trust_pickle, progress=progress,
        )  # fmt: skip
    if json_out:
        _print_json(doc)
        return
    table = Table(
        title=f"{doc['model']} on {doc['target'] or 'float'}: {doc['data']['name']} validation",
        title_justify="left",
    )
    for col in ("mode", "top-1", "top-5", "loss", "images"):
        table.add_column(col, justify="left" if col == "mode" else "right")
    for result in doc["results"]:
        table.add_row(result["mode"], f"{100 * result['top1']:.2f}%",
                      f"{100 * result['top5']:.2f}%", f"{result['loss']:.4f}",
                      str(result["samples"]))  # fmt: skip
    out.print(table)
    if out_dir is not None:
        out.print(f"wrote {out_dir}/report.json and report.md")


@contextlib.contextmanager
def _progress(disabled: bool) -> Iterator[Callable[[str, int, int], None] | None]:
    """A rich progress bar fed by ``(stage, done, total)`` calls, or None when disabled."""
    if disabled:
        yield None
        return
    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), TimeRemainingColumn(), console=err, transient=True,
    ) as bar:  # fmt: skip
        tasks: dict[str, TaskID] = {}

        def update(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total or None)
            bar.update(tasks[stage], completed=done)

        yield update


@app.command()
@user_errors
def profile(
    source: Annotated[str, typer.Argument(help="Model (as for convert) or a converted directory.")],
    target: Annotated[
        str | None, typer.Option("--target", "-t", help="sc, approx-mult (am) or analog.")
    ] = None,
    weights: Annotated[
        str | None, typer.Option(help=".pt/.pth state dict or .safetensors.")
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Batch size.")] = 128,
    iters: Annotated[
        int, typer.Option(help="Timed steps per configuration (median reported).")
    ] = 7,
    warmup: Annotated[int, typer.Option(help="Untimed steps first.")] = 2,
    device: DeviceOpt = "auto",
    data: Annotated[
        str, typer.Option(help="Dataset for the batch (see convert).")
    ] = "fashion-mnist",
    input_shape: Annotated[
        str | None, typer.Option(help="C,H,W: random inputs of this shape instead of --data.")
    ] = None,
    num_classes: Annotated[int, typer.Option(help="Classes for random inputs.")] = 10,
    checkpointing: Annotated[
        bool, typer.Option(help="Also time with gradient checkpointing.")
    ] = True,
    lut: LutOpt = None,
    adc_bits: AdcBitsOpt = None,
    sc_length: ScLengthOpt = None,
    backend: Annotated[str | None, typer.Option(help="Emulation backend.")] = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Seconds per training step and memory in float, exact and inject mode (Tables 6/7)."""
    from approxctl.pipeline import DataOptions, profile_source
    from approxctl.profile import unsteady_ratios

    options = {}
    if target is not None:
        flags = {"lut": lut, "adc_bits": adc_bits, "sc_length": sc_length, "backend": backend}
        options = target_options(target, flags, None)
    shape = None
    if input_shape is not None:
        try:
            shape = tuple(int(v) for v in input_shape.split(","))
        except ValueError:
            raise ApproxError(f"--input-shape takes C,H,W, got '{input_shape}'") from None
    with err.status("profiling…", spinner="dots") if not (quiet or json_out) else _nullcontext():
        result = profile_source(
            source, target, weights=weights, data=DataOptions(spec=data, batch_size=batch_size),
            input_shape=shape, num_classes=num_classes, options=options, iters=iters,  # type: ignore[arg-type]
            warmup=warmup, checkpointing=checkpointing, device=device,
        )  # fmt: skip
    if json_out:
        _print_json(result)
        return
    table = Table(
        title=f"{result['model']} on {result['target']}: training step, batch "
        f"{result['batch_size']}, {'x'.join(map(str, result['input_shape']))}, {result['device']}",
        title_justify="left",
    )
    for col in ("mode", "step (s)", "x float", "per round", "memory (MB)"):
        table.add_column(col, justify="left" if col == "mode" else "right")
    base = result["modes"]["float"]["step_s"]
    quartiles = result["ratio_quartiles"]
    rows = [(m, s, quartiles.get(m)) for m, s in result["modes"].items()]
    quartiles = result.get("checkpointing_ratio_quartiles", {})
    ckpt = result.get("checkpointing", {})
    rows += [(f"{m} + checkpointing", s, quartiles[m]) for m, s in ckpt.items()]
    for mode, stats, q in rows:
        rounds = f"{q[0]:.2f}-{q[1]:.2f}" if q else ""
        table.add_row(mode, f"{stats['step_s']:.4f}", f"{stats['step_s'] / base:.2f}", rounds,
                      f"{stats['peak_mem_mb']:.1f}")  # fmt: skip
    out.print(table)
    out.print("x float: median step over float's; per round: the middle half of the ratios "
              "within each round (every configuration runs once per round)")  # fmt: skip
    unsteady = unsteady_ratios(result)
    if unsteady:
        out.print(f"x float of {', '.join(unsteady)} lies outside its per-round range: the "
                  "machine's speed moved during the run; read the per-round range, or run "
                  "again with more --iters")  # fmt: skip
    kind = (
        "peak CUDA memory"
        if result["memory"] == "cuda_peak_allocated"
        else ("memory: tensors saved for backward")
    )
    out.print(f"median of {result['iters']} steps per mode, timed round-robin; {kind}")


class _nullcontext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _print_layers(rows: list[dict[str, Any]], target: str) -> None:
    table = Table(
        title=f"{target}: emulation error per layer (exact - proxy, in units of the output's "
        "std, on calibration data)",
        title_justify="left",
    )
    table.add_column("layer", no_wrap=True)
    table.add_column("weight", no_wrap=True)
    table.add_column("input")
    table.add_column("settings")
    table.add_column("err mean", justify="right")
    table.add_column("err std", justify="right")
    skip = {"name", "kind", "target", "shape", "act_absmax", "input_signed", "rel_err_mean",
            "rel_err_std", "adc_calib"}  # fmt: skip
    for row in rows:
        settings = " ".join(f"{k}={v}" for k, v in row.items() if k not in skip)
        table.add_row(
            row["name"],
            "x".join(map(str, row["shape"])),
            f"{'±' if row['input_signed'] else '+'}{row['act_absmax']:.3g}",
            settings,
            f"{row.get('rel_err_mean', float('nan')):+.3f}",
            f"{row.get('rel_err_std', float('nan')):.3f}",
        )
    out.print(table)


def _one_line_warning(message: Any, category: Any, *args: Any, **kwargs: Any) -> None:
    """Warnings (e.g. a model fx cannot trace) as one line on stderr, not file:line + source."""
    text = " ".join(str(message).split())
    err.print(f"[yellow]warning:[/] {escape(text)}", highlight=False, soft_wrap=True)


def main() -> None:
    from approxctl.runtime import keep_freed_memory

    warnings.showwarning = _one_line_warning
    keep_freed_memory()
    app()


if __name__ == "__main__":
    main()
