"""Pieces every trainer shares: seeding, run folders, optimizer and schedule, checkpoints, resume."""

from __future__ import annotations

import errno
import functools
import json
import math
import os
import random
import shutil
import tempfile
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch

from heed.config import OptimConfig, save_config
from heed.config.base import HeedConfig
from heed.errors import (
    DataError,
    HeedError,
    RunInterrupted,
    StorageError,
    TrainingDivergedError,
    describe_os_error,
    is_disk_full,
)

STATE_FILE = "trainer_state.pt"
F = TypeVar("F", bound=Callable[..., Any])


def set_seed(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:  # pragma: no cover
        pass


# what a trainer writes into its run folder (moved aside together by ``overwrite: true``)
RUN_ENTRIES = (
    "config.yaml",
    "metrics.jsonl",
    "checkpoints",
    "final",
    "summary.json",
    "samples.jsonl",
    "alarms.jsonl",
    "report.html",
    "tensorboard",
    "ref_logps.pt",
    "eval.json",
)
JSONL_LOGS = ("metrics.jsonl", "samples.jsonl", "alarms.jsonl")
# ``overwrite: true`` moves the old run here; it is deleted once the new run has saved a checkpoint
# or finished, and put back if the new run fails before either
PREVIOUS_RUN = ".previous-run"


def holds_run(run: Path) -> bool:
    """Whether ``run`` holds a started or finished run (metrics, checkpoints or a final model)."""
    return any((run / name).exists() for name in ("metrics.jsonl", "checkpoints", "final"))


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def ensure_writable_dir(path: Path, what: str = "out") -> None:
    """Create ``path`` (and its parents) and check that files can be written in it; a path that is
    a file, read-only or cannot be created is a :class:`StorageError` naming it."""
    if path.exists() and not path.is_dir():
        raise StorageError(f"{what}: {path} is a file; give a folder for the run (--out DIR)")
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".heed-write-test-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        if exc.filename is None:
            exc.filename = str(path)
        fix = "choose another --out"
        if exc.errno == errno.ENOENT:  # e.g. under /proc, or a vanished mount
            raise StorageError(f"{what}: {exc.filename} cannot be created ({exc.strerror}); {fix}") from None
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise StorageError(f"{what}: {exc.filename}: not writable ({exc.strerror}); {fix}") from None
        raise StorageError(f"{what}: {describe_os_error(exc, fix)}") from None


def prepare_run_dir(out: str | Path, cfg: HeedConfig, resume: bool) -> Path:
    """Create the run folder and write ``config.yaml``.

    A folder that already holds a finished or started run is only reused with ``--resume``
    (or ``overwrite: true`` in the config), so no earlier result is lost by accident.
    ``--resume`` on a folder without a run starts one; on a run without a usable checkpoint it is
    an error. ``overwrite: true`` moves the old run aside (:data:`PREVIOUS_RUN`); it is deleted
    only when the new run saves its first checkpoint or finishes (see :func:`guard_run`).
    """
    run = Path(out)
    ensure_writable_dir(run)
    if (run / PREVIOUS_RUN).exists():
        _settle_previous_run(run, failed=not _has_checkpoint_or_final(run))
    started = holds_run(run)
    overwrite = bool(getattr(cfg, "overwrite", False))
    if started and not resume and not overwrite:
        raise HeedError(
            f"{run}: already holds a run; pass --resume to continue it, or choose another --out "
            "(or set overwrite: true)"
        )
    if resume:
        _repair_for_resume(run)
        if started and usable_checkpoint(run) is None:
            raise HeedError(
                f"{run}: --resume: this run has no checkpoint to continue from (log.save_every was 0, or "
                "it stopped before its first save); start it again with --set overwrite=true, or choose "
                "another --out"
            )
    elif started:  # overwrite: true
        aside = run / PREVIOUS_RUN
        aside.mkdir()
        for name in RUN_ENTRIES:
            if (run / name).exists():
                os.replace(run / name, aside / name)
    save_config(cfg, run / "config.yaml")
    return run


def _has_checkpoint_or_final(run: Path) -> bool:
    return bool(list_checkpoints(run)) or (run / "final").is_dir()


def _settle_previous_run(run: Path, failed: bool) -> bool:
    """Finish an ``overwrite: true`` replacement: delete the old run (the new one has started), or,
    when the new run ``failed`` before saving anything resumable, put the old run back. Returns
    True when the old run was put back."""
    aside = run / PREVIOUS_RUN
    if not aside.is_dir():
        return False
    if not failed:
        shutil.rmtree(aside, ignore_errors=True)
        return False
    for name in RUN_ENTRIES:
        target = run / name
        if target.is_dir():
            shutil.rmtree(target, ignore_errors=True)
        elif target.exists():
            target.unlink()
    for entry in aside.iterdir():
        os.replace(entry, run / entry.name)
    aside.rmdir()
    return True


def _repair_for_resume(run: Path) -> None:
    """What a killed run can leave half-written: a checkpoint's temporary folder (removed) and a torn
    last line in the JSONL logs (cut at the last full line)."""
    from heed.report.metrics import repair_jsonl

    ckpts = run / "checkpoints"
    if ckpts.is_dir():
        for tmp in ckpts.glob(".step-*.tmp"):
            shutil.rmtree(tmp, ignore_errors=True)
    for name in JSONL_LOGS:
        if repair_jsonl(run / name):
            warnings.warn(
                f"{run / name}: cut a torn last line (the run was killed while writing it)", stacklevel=3
            )


def guard_run(train: F) -> F:
    """Wrap a trainer ``train_x(cfg, resume=False, ...)``: what happens to the run folder when it stops.

    * Ctrl-C becomes :class:`RunInterrupted`, whose message names the last step logged and the last
      checkpoint (the command line adds the ``--resume`` command and exits 130);
    * a full disk becomes a :class:`StorageError` naming the run folder;
    * with ``overwrite: true``, the old run is put back when the new one stops before its first
      checkpoint, and deleted otherwise;
    * a half-written ``final/`` is removed.
    """

    @functools.wraps(train)
    def wrapper(cfg: Any, *args: Any, **kwargs: Any) -> Any:
        run = Path(cfg.out)
        main = _is_main_process()
        try:
            result = train(cfg, *args, **kwargs)
        except BaseException as exc:
            restored = False
            if main and run.is_dir():
                shutil.rmtree(run / "final.tmp", ignore_errors=True)
                restored = _settle_previous_run(run, failed=not _has_checkpoint_or_final(run))
            if isinstance(exc, KeyboardInterrupt):
                raise interrupted(run, restored) from None
            if is_disk_full(exc) and not isinstance(exc, HeedError):
                then = (
                    f"resume with --resume{_last_checkpoint_note(run)}"
                    if latest_checkpoint(run) is not None
                    else "start it again with --set overwrite=true (it has no checkpoint to resume from)"
                )
                raise StorageError(
                    f"no space left on {run} ({type(exc).__name__}: {str(exc).splitlines()[0][:120]}); "
                    f"free some space and {then}"
                ) from exc
            raise
        if main:
            _settle_previous_run(run, failed=False)
        return result

    return wrapper  # type: ignore[return-value]


def _last_checkpoint_note(run: Path) -> str:
    last = latest_checkpoint(run)
    return f" (the last checkpoint, {last.name}, is intact)" if last is not None else ""


def interrupted(run: Path, restored: bool = False) -> RunInterrupted:
    """The :class:`RunInterrupted` error of a run stopped by Ctrl-C: where it stopped and what to do."""
    from heed.report.metrics import read_metrics

    if restored:
        return RunInterrupted(
            f"{run}: stopped before the new run's first checkpoint; the previous run there was put back",
            run,
        )
    steps = [r.get("step", 0) for r in read_metrics(run) if r.get("split", "train") == "train"]
    logged = f" (metrics logged up to step {max(steps)})" if steps else ""
    last = latest_checkpoint(run)
    if last is None:
        return RunInterrupted(
            f"{run}: stopped with no checkpoint to resume from{logged} (log.save_every is 0 or its first "
            "save was not reached); start it again with --set overwrite=true",
            run,
        )
    return RunInterrupted(f"{run}: stopped; its last checkpoint is {last.name}{logged}", run, resumable=True)


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
    accelerator = accelerator or make_accelerator(mixed_precision)
    main = accelerator.is_main_process
    fresh = resume and main and not holds_run(Path(out))
    run = prepare_run_dir(out, cfg, resume) if main else Path(out)
    accelerator.wait_for_everyone()
    set_seed(seed)
    ckpt = latest_checkpoint(run) if resume else None
    if fresh:
        warnings.warn(f"{run}: --resume given but there is no run to resume yet; starting one", stacklevel=2)
    return accelerator, run, ckpt


def make_optimizer(params: Any, cfg: OptimConfig) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases and norm weights (1-D tensors).

    On the CPU torch's fused AdamW (one kernel per parameter, no temporaries) is used: torch's
    default there is the per-tensor loop, 2-3x slower, which was a quarter of a small model's RL
    update. Elsewhere torch picks its own default (foreach on CUDA)."""
    params = [p for p in params if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = bool(params) and all(p.device.type == "cpu" and p.is_floating_point() for p in params)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=fused or None)


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


def check_batch_weight(weights: Sequence[float], where: Sequence[str], step: int) -> float:
    """The total weight of an optimizer step's records; a total that is not positive is a
    :class:`DataError` naming the step and the records (their loss would be divided by ~0, or be 0)."""
    total = float(sum(weights))
    if total > 0:
        return total
    named = [w for w in where if w][:3]
    shown = ", ".join(named) + (f" and {len(where) - len(named)} more" if len(where) > len(named) else "")
    raise DataError(
        f"step {step}: the `weight` of this batch's {len(where)} records sums to {total:g} ({shown}); "
        "every batch needs a positive total weight: give the records positive weights"
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

    The folder is written under a temporary name, flushed to disk and renamed, so a run killed
    while saving never leaves a half-written checkpoint behind; when the write fails (a full disk)
    the temporary folder is removed and the earlier checkpoints stay. Older checkpoints beyond
    ``keep`` are removed. The first checkpoint of an ``overwrite: true`` run deletes the old run.
    """
    from heed.models.loading import save_pretrained

    ckpts = Path(run_dir) / "checkpoints"
    ckpts.mkdir(parents=True, exist_ok=True)
    target = ckpts / f"step-{step}"
    tmp = ckpts / f".step-{step}.tmp"
    try:
        save_pretrained(model, tokenizer, tmp)
        state = {
            "step": step,
            "optimizer": optimizer.state_dict() if optimizer is not None else None,
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "rng": _rng_state(),
            "extra": extra or {},
        }
        torch.save(state, tmp / STATE_FILE)
        _fsync_files(tmp)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if is_disk_full(exc):
            raise StorageError(
                f"no space left on {ckpts} while writing checkpoint step-{step}; the partial checkpoint "
                f"was removed{_last_checkpoint_note(run_dir)}; free some space and resume with --resume"
            ) from exc
        raise
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    _settle_previous_run(Path(run_dir), failed=False)
    return target


def _fsync_files(folder: Path) -> None:
    """Flush every file of ``folder`` to disk before it is renamed into place (a power cut must not
    leave a renamed checkpoint with empty files)."""
    for f in folder.rglob("*"):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    ckpts = Path(run_dir) / "checkpoints"
    if not ckpts.is_dir():
        return []
    found = [
        p
        for p in ckpts.iterdir()
        if p.is_dir() and p.name.startswith("step-") and p.name[5:].isdigit() and (p / STATE_FILE).exists()
    ]
    return sorted(found, key=lambda p: int(p.name.split("-", 1)[1]))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def checkpoint_problem(ckpt: Path) -> str | None:
    """Why ``ckpt`` cannot be resumed from (a truncated or unreadable file), or None when it can.

    Cheap: ``trainer_state.pt`` and ``.bin`` files are opened memory-mapped (a truncated zip has no
    central directory), ``.safetensors`` headers are checked against the file size, JSON is parsed.
    """
    for f in sorted(ckpt.iterdir()):
        if not f.is_file():
            continue
        try:
            if f.suffix in (".pt", ".bin"):
                torch.load(f, map_location="cpu", weights_only=False, mmap=True)
            elif f.suffix == ".safetensors":
                from safetensors import safe_open

                with safe_open(str(f), "pt"):
                    pass
            elif f.suffix == ".json":
                json.loads(f.read_text(encoding="utf-8"))
        except Exception as exc:  # any failure to read means the file cannot be resumed from
            first = (str(exc).splitlines() or [type(exc).__name__])[0][:120]
            return f"{f.name} is unreadable ({first})"
    return None


def usable_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest checkpoint that can be read. A damaged newer one (a truncated file) is renamed to
    ``checkpoints/.damaged-step-N`` with a warning, and the one before it is used."""
    for ckpt in reversed(list_checkpoints(run_dir)):
        problem = checkpoint_problem(ckpt)
        if problem is None:
            return ckpt
        damaged = ckpt.with_name(f".damaged-{ckpt.name}")
        shutil.rmtree(damaged, ignore_errors=True)
        os.replace(ckpt, damaged)
        earlier = list_checkpoints(run_dir)
        instead = f"resuming from {earlier[-1].name} instead" if earlier else "no earlier checkpoint is left"
        warnings.warn(f"{ckpt}: {problem}; moved it to {damaged.name}, {instead}", stacklevel=2)
    return None


def load_trainer_state(ckpt: Path, optimizer: Any | None, scheduler: Any | None = None) -> dict[str, Any]:
    """Restore optimizer, scheduler and RNG from a checkpoint; returns the saved state."""
    try:
        state = torch.load(ckpt / STATE_FILE, map_location="cpu", weights_only=False)
    except Exception as exc:  # a damaged file: say which and what to do
        raise HeedError(
            f"{ckpt / STATE_FILE}: cannot be read ({str(exc).splitlines()[0][:120]}); delete {ckpt} to "
            "resume from the checkpoint before it"
        ) from None
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
    if getattr(accelerator, "num_processes", 1) == 1:  # sparse gradients stay out of distributed hooks
        from heed.models.lm import sparse_tied_embedding

        sparse_tied_embedding(model)
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
