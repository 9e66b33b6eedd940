"""Pieces every trainer shares: seeding, run folders, optimizer and schedule, checkpoints, resume."""

from __future__ import annotations

import json
import math
import os
import random
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from heed.config import OptimConfig, save_config
from heed.config.base import HeedConfig
from heed.errors import HeedError, TrainingDivergedError

STATE_FILE = "trainer_state.pt"


def set_seed(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:  # pragma: no cover
        pass


def prepare_run_dir(out: str | Path, cfg: HeedConfig, resume: bool) -> Path:
    """Create the run folder and write ``config.yaml``.

    A folder that already holds a finished or started run is only reused with ``--resume``
    (or ``overwrite: true`` in the config), so no earlier result is lost by accident.
    """
    run = Path(out)
    started = (run / "metrics.jsonl").exists() or (run / "checkpoints").exists() or (run / "final").exists()
    if started and not resume and not getattr(cfg, "overwrite", False):
        raise HeedError(
            f"{run}: already holds a run; pass --resume to continue it, or choose another --out "
            "(or set overwrite: true)"
        )
    if started and not resume:
        for name in (
            "metrics.jsonl",
            "checkpoints",
            "final",
            "summary.json",
            "samples.jsonl",
            "alarms.jsonl",
        ):
            target = run / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    run.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run / "config.yaml")
    return run


def make_accelerator(mixed_precision: str = "no") -> Any:
    """The run's ``accelerate.Accelerator`` (processes, device, mixed precision).

    ``mixed_precision`` (``model.mixed_precision``): no | bf16 | fp16. Trainers run their forward
    passes under ``accelerator.autocast()``, because Heed's forwards call the transformer body
    directly rather than the wrapped ``model.forward``. fp16 needs a GPU (its gradient scaler);
    bf16 also autocasts on CPU.
    """
    from accelerate import Accelerator

    if mixed_precision == "fp16" and not torch.cuda.is_available():
        raise HeedError("model.mixed_precision: fp16 needs a GPU (none is visible); use bf16 or no on CPU")
    # several processes without a GPU (torchrun / accelerate launch --cpu): accelerate only forms the
    # gloo process group when told to run on the CPU; without it each process would train alone
    cpu_group = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    from accelerate.state import AcceleratorState

    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision", mixed_precision) != mixed_precision:
        # accelerate keeps one state per process; a second trainer in the same process (the demo, tests)
        # with another precision starts a fresh one (the process group, kept in PartialState, stays)
        AcceleratorState._reset_state()
    try:
        return Accelerator(mixed_precision=mixed_precision, cpu=cpu_group)
    except (ValueError, RuntimeError) as exc:
        raise HeedError(
            f"accelerate could not start this run ({str(exc).splitlines()[0]}); check the "
            "accelerate config / launch flags against this machine (e.g. --cpu without GPUs, "
            "--num_processes no larger than the GPU count)"
        ) from None


def start_run(
    cfg: HeedConfig, out: str | Path, seed: int, mixed_precision: str, resume: bool, accelerator: Any = None
) -> tuple[Any, Path, Path | None]:
    """Step 1 of every trainer: the accelerator, the run folder (prepared by the main process only),
    the seed and the checkpoint to resume from. Returns ``(accelerator, run_dir, checkpoint or None)``."""
    import warnings

    accelerator = accelerator or make_accelerator(mixed_precision)
    main = accelerator.is_main_process
    run = prepare_run_dir(out, cfg, resume) if main else Path(out)
    accelerator.wait_for_everyone()
    set_seed(seed)
    ckpt = latest_checkpoint(run) if resume else None
    if resume and ckpt is None and main:
        warnings.warn(f"{run}: --resume given but no checkpoint found; starting from scratch", stacklevel=2)
    return accelerator, run, ckpt


def make_optimizer(params: Any, cfg: OptimConfig) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases and norm weights (1-D tensors)."""
    params = [p for p in params if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)


def lr_factor(step: int, total: int, cfg: OptimConfig) -> float:
    """Multiplier of the peak LR at optimizer step ``step`` (0-based): linear warmup, then
    cosine / linear decay to ``min_lr_ratio`` at ``total``, or constant."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant" or total <= cfg.warmup_steps:
        return 1.0
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
    if cfg.schedule == "cosine":
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        decay = 1.0 - progress
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * decay


def make_scheduler(
    optimizer: torch.optim.Optimizer, cfg: OptimConfig, total: int
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total, cfg))


def check_finite(value: float, step: int, source: str) -> None:
    """Stop with a message naming the step and source when a loss or reward is NaN/inf."""
    if not math.isfinite(value):
        raise TrainingDivergedError(
            f"step {step}: {source} is {value}; stopping (the last checkpoint is intact; "
            "lower the learning rate or check the reward source)"
        )


def _rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "torch": torch.get_rng_state()}


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model: Any,
    tokenizer: Any,
    optimizer: torch.optim.Optimizer | None,
    scheduler: Any | None = None,
    extra: dict[str, Any] | None = None,
    keep: int = 2,
) -> Path:
    """Write ``checkpoints/step-N/`` atomically: HF model + tokenizer + ``trainer_state.pt``.

    The folder is written under a temporary name and renamed, so a run killed while saving
    never leaves a half-written checkpoint behind. Older checkpoints beyond ``keep`` are removed.
    """
    from heed.models.loading import save_pretrained

    ckpts = Path(run_dir) / "checkpoints"
    ckpts.mkdir(parents=True, exist_ok=True)
    target = ckpts / f"step-{step}"
    tmp = ckpts / f".step-{step}.tmp"
    save_pretrained(model, tokenizer, tmp)
    state = {
        "step": step,
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "rng": _rng_state(),
        "extra": extra or {},
    }
    torch.save(state, tmp / STATE_FILE)
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    ckpts = Path(run_dir) / "checkpoints"
    if not ckpts.is_dir():
        return []
    found = [
        p for p in ckpts.iterdir() if p.is_dir() and p.name.startswith("step-") and (p / STATE_FILE).exists()
    ]
    return sorted(found, key=lambda p: int(p.name.split("-", 1)[1]))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def load_trainer_state(ckpt: Path, optimizer: Any | None, scheduler: Any | None = None) -> dict[str, Any]:
    """Restore optimizer, scheduler and RNG from a checkpoint; returns the saved state."""
    state = torch.load(ckpt / STATE_FILE, map_location="cpu", weights_only=False)
    if optimizer is not None and state.get("optimizer") is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])
    _set_rng_state(state["rng"])
    return state


def prepare_optimization(
    accelerator: Any,
    model: Any,
    params: Any,
    cfg: OptimConfig,
    total_steps: int,
    ckpt: Path | None,
    extra_groups: Sequence[dict[str, Any]] = (),
) -> tuple[Any, Any, Any, dict[str, Any]]:
    """The optimizer over ``params`` (plus ``extra_groups``, e.g. a value head at its own learning
    rate), its schedule over ``total_steps``, model and optimizer prepared by accelerate, and the
    checkpoint's trainer state restored. Returns ``(model, optimizer, scheduler, state)``; ``state``
    is ``{"step": 0}`` when starting fresh, else what :func:`load_trainer_state` returns."""
    optimizer = make_optimizer(params, cfg)
    for group in extra_groups:
        optimizer.add_param_group(group)
    scheduler = make_scheduler(optimizer, cfg, total_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    state = load_trainer_state(ckpt, optimizer, scheduler) if ckpt is not None else {"step": 0}
    return model, optimizer, scheduler, state


def write_json(path: str | Path, data: dict[str, Any]) -> None:
    """Write JSON atomically."""
    p = Path(path)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False, default=float) + "\n", encoding="utf-8")
    os.replace(tmp, p)


def peak_memory_mb() -> float:
    """Peak resident memory of this process (CPU) or peak allocated CUDA memory, in MiB.

    On Linux the CPU figure is ``VmHWM`` from ``/proc/self/status``: unlike ``ru_maxrss``, which a
    child started with fork + exec inherits from its parent, it counts this process's pages only.
    """
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**20
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
