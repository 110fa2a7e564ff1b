"""Training checkpoints: the one place the checkpoint dict is assembled, and resuming from one.

Two objects describe a run to a checkpoint:

* `RunState`: where the run stands. The engine counts `optimizer_steps` and
  `nonfinite_skipped` in it (saved under the checkpoint's `run_state` entry); resuming
  fills in where to start (`start_epoch`, `start_step`), the best accuracy so far, this
  rank's RNG state and the file it came from.
* `TrainingParts`: what a checkpoint captures and restores (model, optimizer, scheduler,
  loss scaler, EMA, the method hooks' state) plus the run's `RunState`.

`save_training_checkpoint` is collective (every rank's RNG state is gathered, rank 0
writes); a checkpoint with NaN/Inf weights is never written. `resume_if_possible` loads
`--resume` or, with `--auto-resume`, the newest readable checkpoint of the output folder;
a checkpoint saved for another model or other method options is refused unless
`--resume-other-model` says that is intended (`--finetune` starts from other weights).
"""
from __future__ import annotations

import ast
import glob
import io
import json
import logging
import os
from dataclasses import dataclass, field

import torch

from models import family as families
from models.errors import ModelConfigError
from models.factory import load_weights
from utils import distributed as dist_utils
from utils.checkpoint import (capture_rng_state, extract_state_dict, load_checkpoint_file, save_checkpoint,
                              saved_args)
from utils.errors import UserError

_logger = logging.getLogger("main")

CHECKPOINT_NAME = "checkpoint.pth"
EPOCH_COPIES = "checkpoint-[0-9][0-9][0-9][0-9]*.pth"


@dataclass
class RunState:
    """Where a run stands: the engine's counters and the point a resumed run starts from."""
    optimizer_steps: int = 0
    nonfinite_skipped: int = 0
    start_epoch: int = 0
    start_step: int = 0
    max_accuracy: float = 0.0
    rng_state: dict | None = field(default=None, repr=False)
    resumed_from: str = ""       # the checkpoint file resumed from ("" for a fresh start)
    finished_epochs: int = 0     # --epochs of the run that wrote that checkpoint

    COUNTERS = ("optimizer_steps", "nonfinite_skipped")  # the checkpoint's `run_state` entry

    def state_dict(self) -> dict:
        return {key: getattr(self, key) for key in self.COUNTERS}

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            if key in self.COUNTERS:
                setattr(self, key, int(value))


@dataclass
class TrainingParts:
    """What a checkpoint captures and restores."""
    model_without_ddp: torch.nn.Module
    optimizer: torch.optim.Optimizer | None = None
    lr_scheduler: object = None
    loss_scaler: object = None
    model_ema: object = None
    run_state: RunState = field(default_factory=RunState)
    hooks: object = None


# ----------------------------------------------------------------------------- writing

def gather_rng_states() -> list:
    """Every rank's RNG state (rank order), so that each rank resumes its own stream."""
    state = capture_rng_state()
    if not dist_utils.is_dist_avail_and_initialized():
        return [state]
    # Tensors are exchanged as torch.save bytes (all_gather_object cannot pickle them on every backend).
    buffer = io.BytesIO()
    torch.save(state, buffer)
    blobs = [None] * dist_utils.get_world_size()
    torch.distributed.all_gather_object(blobs, buffer.getvalue())
    return [torch.load(io.BytesIO(blob), weights_only=True) for blob in blobs]


def checkpoint_state(args, parts: TrainingParts, epoch: int, epoch_step: int, epoch_complete: bool,
                     rng_states: list) -> dict:
    """The one place the checkpoint dict is assembled (tensors and plain values only)."""
    return {
        "model": parts.model_without_ddp.state_dict(),
        "optimizer": parts.optimizer.state_dict() if parts.optimizer is not None else None,
        "lr_scheduler": parts.lr_scheduler.state_dict() if parts.lr_scheduler is not None else None,
        "epoch": epoch,
        "epoch_step": epoch_step,
        "epoch_complete": epoch_complete,
        "model_ema": parts.model_ema.module.state_dict() if parts.model_ema is not None else None,
        "scaler": parts.loss_scaler.state_dict() if parts.loss_scaler is not None else None,
        "args": vars(args),
        "max_accuracy": float(parts.run_state.max_accuracy),
        "run_state": parts.run_state.state_dict(),
        "method_state": parts.hooks.checkpoint_state(parts.model_without_ddp) if parts.hooks is not None else {},
        "rng": rng_states,
        "world_size": dist_utils.get_world_size(),
    }


def write_checkpoint(state: dict, path: str) -> bool:
    """Rank 0 writes; a failed write (e.g. disk full) is logged and the previous file stays valid."""
    if not dist_utils.is_main_process():
        return True
    try:
        save_checkpoint(state, path)
        return True
    except OSError as err:
        _logger.error(f"could not write checkpoint {path} ({err.strerror or err}); the previous checkpoint "
                      f"there is unchanged and training continues; free space or fix the directory")
        return False


def save_training_checkpoint(args, parts: TrainingParts, path: str, epoch: int, epoch_step: int,
                             epoch_complete: bool) -> bool:
    """Collective: every rank calls it (RNG states are gathered); rank 0 writes."""
    rng_states = gather_rng_states()
    if not dist_utils.is_main_process():
        return True
    state = checkpoint_state(args, parts, epoch, epoch_step, epoch_complete, rng_states)
    optimizer_state = (state["optimizer"] or {}).get("state", {})
    bad = first_nonfinite_key(state["model"]) or first_nonfinite_key(state["model_ema"] or {}) or next(
        (f"optimizer state of parameter {index} ({key})" for index, entry in optimizer_state.items()
         if (key := first_nonfinite_key(entry))), None)
    if bad:
        # A step with a finite loss can still leave NaN/Inf weights (an overflowing update);
        # the last good checkpoint must survive that.
        _logger.error(f"not writing {path}: the weights or optimizer state have non-finite values ({bad}); "
                      f"the previous checkpoint is kept")
        return False
    return write_checkpoint(state, path)


def first_nonfinite_key(state_dict: dict) -> str | None:
    for key, value in state_dict.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not torch.isfinite(value).all():
            return key
    return None


# ----------------------------------------------------------------------------- reading

def load_latest_checkpoint(output_dir: str):
    """(checkpoint, path) for --auto-resume: checkpoint.pth, else the newest readable checkpoint-EEEE.pth.

    (None, "") when the directory holds none (a fresh start). If checkpoint.pth exists but
    cannot be read and no epoch copy can either, its UserError is raised.
    """
    main_path = os.path.join(output_dir, CHECKPOINT_NAME)
    history = sorted(glob.glob(os.path.join(output_dir, EPOCH_COPIES)), reverse=True)
    candidates = ([main_path] if os.path.isfile(main_path) else []) + history
    first_error = None
    for path in candidates:
        try:
            checkpoint = load_checkpoint_file(path)
        except UserError as err:
            first_error = first_error or err
            _logger.warning(f"auto-resume: {err}; trying an older checkpoint")
            continue
        _logger.info(f"auto-resume: found {path}")
        return checkpoint, path
    if first_error is not None:
        raise first_error
    return None, ""


def checkpoint_error(err: ModelConfigError, state_dict: dict, model_name: str) -> UserError:
    """A checkpoint that does not fit: the factory's key list plus which model (and options) it fits."""
    from utils.model_match import suggest_model_for_keys
    hint = ""
    try:
        hint = suggest_model_for_keys(state_dict, model_name) or ""
    except Exception as suggestion_error:  # the hint is best effort; the key list is the error
        _logger.debug(f"no model suggestion: {suggestion_error}")
    return UserError(f"{err}{'; the weights fit --model ' + hint if hint else ''}")


def _comparable(value):
    if isinstance(value, str) and value.strip()[:1] in ("(", "["):  # official runs saved lists as text
        try:
            value = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            return value
    if isinstance(value, (list, tuple)):
        return [_comparable(v) for v in value]
    if isinstance(value, dict):
        return {k: _comparable(v) for k, v in sorted(value.items())}
    return value


def model_differences(saved: dict, args) -> list:
    """What a checkpoint's saved `args` say about its model that differs from this run:
    ["--model A (checkpoint) vs B", "--base_keep_rate 0.7 vs 0.5", ...]; [] when they agree or
    the checkpoint names no model."""
    saved_model = saved.get("model")
    if not isinstance(saved_model, str) or not saved_model:
        return []
    differences = [] if saved_model == args.model else [f"--model {saved_model} vs {args.model}"]
    dests = ["model_kwargs"]
    for name in dict.fromkeys([args.model, saved_model]):
        for family in families.families():
            if family.is_patch() or family is families.family_of_model(name):
                dests += [flag.dest for flag in family.flags if flag.kwarg or family.is_patch()]
    for dest in dict.fromkeys(dests):
        if dest not in saved:
            continue
        ours, theirs = getattr(args, dest, None), saved[dest]
        if _comparable(ours) != _comparable(theirs) and not (dest == "model_kwargs" and not ours and not theirs):
            differences.append(f"--{dest.replace('_', '-')} {theirs} vs {ours}")
    return differences


def check_same_model(checkpoint, path: str, args, flag: str = "--resume") -> None:
    """A training run resumes only the model (and method options) its checkpoint was saved for;
    an evaluation of another model's weights is only logged."""
    differences = model_differences(saved_args(checkpoint), args)
    if not differences:
        return
    text = "; ".join(differences)
    if args.eval:
        _logger.warning(f"evaluating {path}, saved for another model or options (checkpoint vs this run: {text})")
    elif getattr(args, "resume_other_model", False):
        _logger.warning(f"--resume-other-model: resuming {path} although it was saved for another model or "
                        f"options (checkpoint vs this run: {text})")
    else:
        raise UserError(f"{flag} {path} was saved for another model or other method options (checkpoint vs this "
                        f"run: {text}); to start from these weights use --finetune {path}, to resume anyway pass "
                        f"--resume-other-model")


def resume_if_possible(args, parts: TrainingParts) -> RunState:
    """--resume / --auto-resume: restore the model (strict), and unless --eval the full training
    state; returns `parts.run_state` with the point to start from."""
    point = parts.run_state
    point.start_epoch = args.start_epoch
    checkpoint, path, flag = None, args.resume, "--resume"
    if args.auto_resume and args.output_dir:
        try:
            checkpoint, auto_path = load_latest_checkpoint(args.output_dir)
        except UserError as err:
            raise UserError(f"--auto-resume: {err}") from None
        path, flag = (auto_path, "--auto-resume") if auto_path else (path, flag)
    if not path:
        return point
    if checkpoint is None:
        try:
            checkpoint = load_checkpoint_file(path)
        except UserError as err:
            raise UserError(f"{flag}: {err}") from None
    check_same_model(checkpoint, path, args, flag)
    use_ema = bool(getattr(args, "use_ema", False))
    if use_ema and not isinstance(checkpoint, dict) or use_ema and checkpoint.get("model_ema") is None:
        raise UserError(f"--use-ema: {path} holds no EMA weights (no 'model_ema' entry); drop --use-ema")
    try:
        state_dict = extract_state_dict(checkpoint["model_ema"] if use_ema else checkpoint)
        load_weights(parts.model_without_ddp, state_dict, load="strict", model_name=args.model,
                     source=f"checkpoint {path}")
    except ModelConfigError as err:
        raise (checkpoint_error(err, state_dict, args.model) if hasattr(err, "summary") else UserError(str(err))) \
            from None
    point.resumed_from = path
    _logger.info(f"resumed {'EMA ' if use_ema else ''}model weights from {path}")
    if args.eval or not all(k in checkpoint for k in ("optimizer", "lr_scheduler", "epoch")):
        return point
    if parts.optimizer is not None and checkpoint["optimizer"] is not None:
        parts.optimizer.load_state_dict(checkpoint["optimizer"])
    if parts.lr_scheduler is not None and checkpoint["lr_scheduler"] is not None:
        parts.lr_scheduler.load_state_dict(checkpoint["lr_scheduler"])
    if parts.model_ema is not None and checkpoint.get("model_ema") is not None:
        parts.model_ema.module.load_state_dict(extract_state_dict(checkpoint["model_ema"]))
    if parts.loss_scaler is not None and checkpoint.get("scaler") is not None:
        parts.loss_scaler.load_state_dict(checkpoint["scaler"])
    if checkpoint.get("run_state"):
        point.load_state_dict(checkpoint["run_state"])
    epoch = int(checkpoint["epoch"])
    if checkpoint.get("epoch_complete", True):
        point.start_epoch, point.start_step = epoch + 1, 0
    else:
        point.start_epoch, point.start_step = epoch, int(checkpoint.get("epoch_step", 0))
    point.max_accuracy = float(checkpoint.get("max_accuracy", 0.0) or 0.0)
    point.finished_epochs = int(saved_args(checkpoint).get("epochs") or 0)
    rng = checkpoint.get("rng")
    rank = dist_utils.get_rank()
    if isinstance(rng, list) and len(rng) == dist_utils.get_world_size():
        point.rng_state = rng[rank]
    elif rng:
        _logger.warning("checkpoint RNG states are for another world size: random streams are re-seeded")
    if args.resume_lr_quirk and parts.lr_scheduler is not None:
        parts.lr_scheduler.step(point.start_epoch)
    if point.start_epoch < args.epochs:
        if point.start_step == 0 and point.finished_epochs and point.start_epoch >= point.finished_epochs:
            _logger.warning(f"extending the run of {path}, finished at epoch {point.start_epoch} of "
                            f"{point.finished_epochs}, to --epochs {args.epochs}")
        _logger.info(f"resuming at epoch {point.start_epoch}"
                     + (f", step {point.start_step}" if point.start_step else ""))
    return point


def finished_run_summary(args, point: RunState) -> str:
    """The line for --auto-resume / --resume into a run that has already done --epochs epochs:
    where it finished and its final metrics (the last evaluation in log.txt beside the checkpoint,
    else the checkpoint's best accuracy)."""
    last = {}
    log_path = os.path.join(os.path.dirname(os.path.abspath(point.resumed_from)), "log.txt")
    try:
        with open(log_path) as f:
            for line in f:
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if isinstance(record, dict) and "test_acc1" in record and not record.get("eval"):
                    last = record
    except OSError:
        pass
    metrics = (f"final accuracy {last['test_acc1']:.2f}% top-1, {last.get('test_acc5', float('nan')):.2f}% top-5 "
               f"(best {point.max_accuracy:.2f}%, {log_path})" if last
               else f"best accuracy {point.max_accuracy:.2f}%")
    return (f"{point.resumed_from}: the run already finished at epoch {point.start_epoch} of {args.epochs}; "
            f"{metrics}; nothing to do (pass a larger --epochs to train on)")


__all__ = ["RunState", "TrainingParts", "gather_rng_states", "checkpoint_state", "write_checkpoint",
           "save_training_checkpoint", "first_nonfinite_key", "load_latest_checkpoint", "checkpoint_error",
           "model_differences", "check_same_model", "resume_if_possible", "finished_run_summary"]
