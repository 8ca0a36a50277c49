"""The paper's training method (SPEC section 4): error-injection epochs, then a short fine-tune
with the exact emulation, validated in exact mode.

Phases, in order (each optional):

1. ``pretrain`` epochs of plain float training (the "pretrained model" the paper starts from,
   when no weights are given); then conversion and calibration;
2. ``epochs`` epochs in ``inject`` mode, refitting the error models on the current batch —
   ``calib_per_epoch`` times per epoch for type-1 targets (sc, approx-mult), every
   ``calib_every`` batches for type 2 (analog). A calibration batch runs the model in exact mode
   once; its cost counts in the epoch's time;
3. ``finetune`` epochs in ``exact`` mode; a fraction trains on that fraction of an epoch's
   batches (0.25: a quarter of an epoch).

A checkpoint (``checkpoints/last.pt``) is written atomically after every epoch; ``resume``
continues after the last complete epoch. Every epoch seeds torch's generator and the data order
from (seed, epoch number, rank), so a resumed run ends exactly where an uninterrupted one would.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from approxctl import distributed
from approxctl.convert import (
    calibrate,
    fit_error_model,
    recalibrate_batchnorm,
    set_checkpointing,
    set_mode,
)
from approxctl.data import drop_singleton
from approxctl.distributed import DistContext
from approxctl.errors import ApproxError
from approxctl.evaluate import evaluate
from approxctl.io import atomic_write
from approxctl.layers import approx_layers

Progress = Callable[[str, int, int], None]

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULERS = ("cosine", "step", "none")


@dataclass
class TrainConfig:
    """Every training option; what ``--recipe`` files and CLI flags set (SPEC section 4)."""

    # Defaults are the quick start (minutes on 2 CPU cores); the paper's setups are recipes.
    # pretrain None: 1 float epoch for a model without trained weights, else 0.
    pretrain: int | None = None
    epochs: int = 2
    finetune: float = 0.5
    lr: float = 0.01
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    scheduler: str = "cosine"
    seed: int = 0
    calib_per_epoch: int = 5
    calib_every: int = 10
    val_every: int = 1
    # Training batches on which BatchNorm statistics are re-estimated in exact mode before each
    # exact-mode validation (0: off; the statistics training left are used).
    bn_recalib: int = 0
    amp: bool = False
    checkpointing: bool = False

    def validate(self) -> None:
        if (self.pretrain or 0) < 0 or self.epochs < 0 or self.finetune < 0:
            raise ApproxError("--pretrain, --epochs and --finetune must not be negative")
        if self.epochs == 0 and self.finetune == 0 and self.pretrain == 0:
            raise ApproxError("nothing to train: --pretrain, --epochs and --finetune are all 0")
        if not self.lr > 0:
            raise ApproxError(f"--lr must be positive, got {self.lr}")
        if self.optimizer not in OPTIMIZERS:
            raise ApproxError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}")
        if self.scheduler not in SCHEDULERS:
            raise ApproxError(f"--scheduler must be one of {', '.join(SCHEDULERS)}")
        if self.calib_per_epoch < 1 or self.calib_every < 1 or self.val_every < 1:
            raise ApproxError("--calib-per-epoch, --calib-every and --val-every must be >= 1")
        if self.bn_recalib < 0:
            raise ApproxError(f"--bn-recalib must not be negative, got {self.bn_recalib}")


@dataclass
class EpochRecord:
    phase: str  # pretrain | inject | finetune
    epoch: int  # 1-based within the phase
    fraction: float  # of the epoch's batches that were trained
    train_loss: float
    train_top1: float
    seconds: float
    calibrations: int
    calibration_seconds: float
    val: dict[str, Any] | None = None


@dataclass
class TrainState:
    """What a checkpoint holds besides tensors: where the run is and what it measured."""

    phase_index: int = 0  # index into the plan's phases
    epoch_in_phase: int = 0  # complete epochs done in that phase
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)


def calibration_batches(kind: str, batches: int, config: TrainConfig) -> set[int]:
    """Batch indices of one inject epoch that refit the error models (SPEC section 4)."""
    if kind == "gaussian":
        return set(range(0, batches, config.calib_every))
    count = min(config.calib_per_epoch, batches)
    return {math.floor(i * batches / count) for i in range(count)}


def _phase_plan(config: TrainConfig) -> list[tuple[str, str, float]]:
    """(phase, layer mode, epochs) in order; fractional epochs only for the fine-tune."""
    plan = []
    if config.pretrain:
        plan.append(("pretrain", "float", float(config.pretrain)))
    if config.epochs:
        plan.append(("inject", "inject", float(config.epochs)))
    if config.finetune:
        plan.append(("finetune", "exact", float(config.finetune)))
    return plan


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
        )
    cls = torch.optim.Adam if config.optimizer == "adam" else torch.optim.AdamW
    return cls(params, lr=config.lr, weight_decay=config.weight_decay)


def make_scheduler(
    optimizer: torch.optim.Optimizer, config: TrainConfig, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    if config.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(1, total_steps))
    if config.scheduler == "step":  # a tenth of the rate for the last third of the steps
        return torch.optim.lr_scheduler.StepLR(optimizer, max(1, 2 * total_steps // 3), 0.1)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)


class Trainer:
    """Runs the phases of one training job on a model and a DataBundle, with checkpoints."""

    def __init__(
        self,
        model: nn.Module,
        bundle: Any,
        config: TrainConfig,
        *,
        device: torch.device,
        out: Path | None,
        convert_fn: Callable[[nn.Module], nn.Module] | None = None,
        progress: Progress | None = None,
        pretrained: bool = False,
        dist_ctx: DistContext | None = None,
    ) -> None:
        config.validate()
        self.model = model
        self.bundle = bundle
        self.config = config
        self.device = device
        self.out = out
        self.convert_fn = convert_fn
        self.dist = dist_ctx or DistContext()
        self.is_main = self.dist.is_main
        self.progress = progress if self.is_main else None
        self.train_loader = (
            distributed.shard_loader(bundle.train, self.dist, config.seed)
            if self.dist.enabled
            else bundle.train
        )
        self.train_model = distributed.wrap(model, self.dist, device)
        self.plan = _phase_plan(config)
        self.state = TrainState(summary={"pretrained": pretrained})
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: torch.optim.lr_scheduler.LRScheduler | None = None

    # ---------------------------------------------------------------- checkpoints
    @property
    def checkpoint_path(self) -> Path | None:
        return None if self.out is None else self.out / "checkpoints" / "last.pt"

    def save_checkpoint(self) -> None:
        path = self.checkpoint_path
        if path is None or not self.is_main:
            return
        payload = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict() if self.optimizer else None,
            "scheduler": self.scheduler.state_dict() if self.scheduler else None,
            "state": asdict(self.state),
            "config": asdict(self.config),
            "converted": bool(approx_layers(self.model)),
        }
        atomic_write(path, lambda tmp: torch.save(payload, tmp))

    def load_checkpoint(self, path: Path) -> dict[str, Any]:
        if not path.is_file():
            raise ApproxError(
                f"cannot resume: {path} does not exist (the run stopped before its first "
                "checkpoint); run the same command without --resume"
            )
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # a truncated or foreign file
            raise ApproxError(
                f"cannot resume: {path} is not a readable checkpoint ({exc})"
            ) from None
        needed = ("model", "optimizer", "scheduler", "state", "config", "converted")
        if not isinstance(payload, dict) or any(key not in payload for key in needed):
            raise ApproxError(f"cannot resume: {path} is not an approxctl training checkpoint")
        saved = payload.get("config", {})
        for key in ("pretrain", "epochs", "finetune", "seed", "optimizer", "scheduler"):
            if saved.get(key) != getattr(self.config, key):
                raise ApproxError(
                    f"cannot resume: the checkpoint was made with {key}={saved.get(key)!r}, "
                    f"this run asks for {getattr(self.config, key)!r}"
                )
        return payload

    # ---------------------------------------------------------------- epochs
    def _seed_epoch(self) -> None:
        """Seed noise and data order from (seed, epoch number, rank): resumable, and each rank
        draws its own injected error."""
        epoch = len(self.state.history)
        torch.manual_seed(self.config.seed + 1_000_003 * epoch + 7_919 * self.dist.rank)
        if self.dist.enabled:
            self.train_loader.sampler.set_epoch(epoch)  # type: ignore[union-attr]
        else:
            self.bundle.train_generator.manual_seed(self.config.seed + epoch)

    def _batches(self, fraction: float) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        total = len(self.train_loader)
        count = max(1, round(total * fraction)) if fraction < 1 else total
        for index, (x, y) in enumerate(self.train_loader):
            if index >= count:
                break
            yield index, x.to(self.device), y.to(self.device)

    def _diverged(self, what: str, where: str) -> ApproxError:
        """Training stops at the first non-finite loss or weight; last.pt stays as it was."""
        if self.checkpoint_path is None:
            kept = "nothing was saved (no --out)"
        elif self.state.history:
            last = self.state.history[-1]
            kept = f"{self.checkpoint_path} keeps the state after {last['phase']} epoch " + str(
                last["epoch"]
            )
        else:
            kept = f"{self.checkpoint_path} keeps the starting point"
        return ApproxError(
            f"training diverged: {what} in {where}; stopped, {kept}; lower --lr "
            f"(now {self.config.lr:g}) and train again"
        )

    def _step(self, x: torch.Tensor, y: torch.Tensor, where: str = "") -> tuple[float, int]:
        assert self.optimizer is not None and self.scheduler is not None
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, enabled=self.config.amp):
            logits = self.train_model(x)
            loss = F.cross_entropy(logits.float(), y)
        if not torch.isfinite(loss):
            value = float(loss.detach())
            raise self._diverged(f"the loss became {value}", where or "a training step")
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        return float(loss.detach()) * y.numel(), int((logits.argmax(1) == y).sum())

    def _run_epoch(self, phase: str, mode: str, epoch: int, fraction: float) -> EpochRecord:
        started = time.perf_counter()
        self._seed_epoch()
        if phase != "pretrain":
            set_mode(self.model, mode)
            set_checkpointing(self.model, self.config.checkpointing)
        self.model.train()
        total = len(self.train_loader)
        planned = max(1, round(total * fraction)) if fraction < 1 else total
        calibrate_at: set[int] = set()
        if phase == "inject":
            kind = approx_layers(self.model)[0][1].target.error_kind
            calibrate_at = calibration_batches(kind, planned, self.config)
        loss_sum, correct, seen, calibrations, calib_seconds = 0.0, 0, 0, 0, 0.0
        for index, x, y in self._batches(fraction):
            if index in calibrate_at:
                t0 = time.perf_counter()
                fit_error_model(self.model, [x])  # one exact-mode pass on this batch
                calib_seconds += time.perf_counter() - t0
                calibrations += 1
                self.model.train()
            loss, hits = self._step(x, y, f"{phase} epoch {epoch}, step {index + 1}/{planned}")
            loss_sum, correct, seen = loss_sum + loss, correct + hits, seen + y.numel()
            if self.progress:
                self.progress(f"{phase} {epoch}", index + 1, planned)
        return EpochRecord(
            phase=phase,
            epoch=epoch,
            fraction=fraction,
            train_loss=loss_sum / max(seen, 1),
            train_top1=correct / max(seen, 1),
            seconds=time.perf_counter() - started,
            calibrations=calibrations,
            calibration_seconds=calib_seconds,
        )

    def validate(self, mode: str, label: str, *, recalibrate: bool = False) -> dict[str, Any]:
        """Accuracy on the validation split (``exact`` for approximate phases, SPEC 4).

        With ``recalibrate`` and ``bn_recalib`` > 0, BatchNorm statistics are first re-estimated
        in ``mode``; they then stay in the model (training itself normalizes by batch statistics,
        so this changes no later step). Under DDP rank 0 evaluates and the others receive its
        result, and DDP hands rank 0's statistics to them at the next step."""
        if not self.is_main:
            return distributed.share(None, self.dist)
        progress = None
        if self.progress is not None:
            report = self.progress
            progress = lambda done, total: report(label, done, total)  # noqa: E731
        if recalibrate and self.config.bn_recalib:
            recalibrate_batchnorm(self.model, self._bn_batches(), mode=mode)
        result = evaluate(
            self.model, self.bundle.val, mode=mode, device=self.device,
            layer_errors=False, progress=progress, total=len(self.bundle.val),
        )  # fmt: skip
        return distributed.share(result.to_json(), self.dist)

    def _bn_batches(self) -> Iterator[torch.Tensor]:
        """The first ``bn_recalib`` batches of one fixed shuffle of the training set (seeded
        by --seed): the same images at every validation, and a resumed run uses them too."""
        loader = self.bundle.train
        order = torch.randperm(
            len(loader.dataset), generator=torch.Generator().manual_seed(self.config.seed)
        )
        size = loader.batch_size or 1
        subset = torch.utils.data.Subset(loader.dataset, order[: self.config.bn_recalib * size])
        fixed = torch.utils.data.DataLoader(
            subset, batch_size=size, shuffle=False, num_workers=loader.num_workers,
            collate_fn=loader.collate_fn, drop_last=drop_singleton(len(subset), size),
        )  # fmt: skip
        for x, _ in fixed:
            yield x.to(self.device)

    # ---------------------------------------------------------------- the run
    def _total_steps(self) -> int:
        batches = len(self.train_loader)
        return sum(
            batches * math.floor(epochs) + round(batches * (epochs % 1))
            for phase, _, epochs in self.plan
            if phase != "pretrain"
        )

    def _start_phase_optimizer(self, phase: str) -> None:
        if phase == "pretrain":
            steps = len(self.train_loader) * self.config.pretrain
        else:
            steps = self._total_steps()
        self.optimizer = make_optimizer(self.model, self.config)
        self.scheduler = make_scheduler(self.optimizer, self.config, steps)

    def _convert(self) -> None:
        """After pretraining (or at the start): convert, calibrate, and record inference-only."""
        if self.convert_fn is None or approx_layers(self.model):
            return
        self.model = self.convert_fn(self.model).to(self.device)
        calibrate(self.model, [x.to(self.device) for x, _ in _take(self.bundle.train, 8)])
        fit_error_model(self.model, [next(iter(self.bundle.train))[0].to(self.device)])
        # Every rank calibrated on the same batches; DDP keeps rank 0's buffers from here on.
        self.train_model = distributed.wrap(self.model, self.dist, self.device)

    def run(self, resume: bool = False) -> dict[str, Any]:
        """Run (or resume) every phase; return the training summary for report.json."""
        if resume:
            assert self.checkpoint_path is not None
            self._restore(self.load_checkpoint(self.checkpoint_path))
        else:
            if not self.config.pretrain:
                self._convert()
                self._record_inference_only()
            self.save_checkpoint()  # a resumable starting point, before any epoch
        while self.state.phase_index < len(self.plan):
            phase, mode, epochs = self.plan[self.state.phase_index]
            parts = [1.0] * math.floor(epochs) + ([epochs % 1] if epochs % 1 > 1e-9 else [])
            if self.optimizer is None:
                self._start_phase_optimizer(phase)
            for epoch in range(self.state.epoch_in_phase, len(parts)):
                record = self._run_epoch(phase, mode, epoch + 1, parts[epoch])
                broken = [n for n, t in self.model.named_parameters() if not t.isfinite().all()]
                if broken:  # never checkpoint weights a last step turned into inf/nan
                    where = f"{phase} epoch {epoch + 1}"
                    raise self._diverged(f"the weights of {broken[0]} became non-finite", where)
                last = epoch == len(parts) - 1
                if (epoch + 1) % self.config.val_every == 0 or last:
                    val_mode = "float" if phase == "pretrain" else "exact"
                    record.val = self.validate(
                        val_mode, f"validate {phase} {epoch + 1}", recalibrate=phase != "pretrain"
                    )
                self.state.history.append(asdict(record))
                self.state.epoch_in_phase = epoch + 1
                if last:
                    self._finish_phase(phase)
                self.save_checkpoint()
        return self.state.summary

    def _restore(self, payload: dict[str, Any]) -> None:
        self.state = TrainState(**payload["state"])
        if payload["converted"]:
            self._convert()  # the architecture; the checkpoint then overwrites every tensor
        self.model.load_state_dict(payload["model"])
        # A checkpoint written after the last phase (killed while writing the outputs, or a
        # finished run resumed) has no phase left to optimize; the caller writes the outputs.
        if payload["optimizer"] is not None and self.state.phase_index < len(self.plan):
            self._start_phase_optimizer(self.plan[self.state.phase_index][0])
            assert self.optimizer is not None and self.scheduler is not None
            self.optimizer.load_state_dict(payload["optimizer"])
            self.scheduler.load_state_dict(payload["scheduler"])

    def _record_inference_only(self) -> None:
        """'Inference only' (paper Table 5): the starting weights run on the hardware as they
        are — only meaningful when they were trained (pretrained or given)."""
        if approx_layers(self.model) and self.state.summary.get("pretrained"):
            self.state.summary["inference_only"] = self.validate("exact", "inference only")

    def _finish_phase(self, phase: str) -> None:
        summary = self.state.summary
        last_val = self.state.history[-1]["val"]
        if phase == "pretrain":
            summary["pretrained"] = True
            summary["float"] = last_val
            if self.is_main and self.out is not None:
                from safetensors.torch import save_file

                state = {
                    k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()
                }
                atomic_write(
                    self.out / "pretrained.safetensors", lambda t: save_file(state, str(t))
                )
            self._convert()
            self._record_inference_only()
            self.state.phase_index += 1
            self.state.epoch_in_phase = 0
            self.optimizer = None
            return
        if phase == "inject":
            summary["error_injection"] = last_val
        else:
            key = "fine_tuning" if self.config.epochs else "with_model"
            summary[key] = last_val
        self.state.phase_index += 1
        self.state.epoch_in_phase = 0


def _take(loader: Any, count: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for index, batch in enumerate(loader):
        if index >= count:
            return
        yield batch
