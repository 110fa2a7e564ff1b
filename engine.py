"""One training epoch and one evaluation pass (DeiT's engine.py, extended).

Additions over DeiT: gradient accumulation, per-method training hooks, dict outputs
with an auxiliary loss, bf16 autocast on CPU, a non-finite-loss policy, cooperative
stopping (Slurm preemption) with a mid-epoch checkpoint, periodic mid-epoch
checkpoints, and an exact distributed evaluation (no padded duplicates).
"""
from __future__ import annotations

import contextlib
import logging
import math

import torch
import torch.nn.functional as F
from timm.utils import accuracy

from losses import main_logits
from utils.precision import AMP_DTYPE_PRECISIONS, autocast_dtype, autocast_in, cast_for_inference  # noqa: F401  (cast_for_inference is part of engine's API)
from utils.distributed import all_reduce_sum, any_rank, get_rank
from utils.logger import MetricLogger, SmoothedValue
from utils.resume import RunState

_logger = logging.getLogger("train")


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/Inf and the --skip-nonfinite budget is spent."""


class TrainingInterrupted(Exception):
    """A stop was requested (SIGTERM/SIGUSR1); a mid-epoch checkpoint has been written."""

    def __init__(self, epoch: int, next_step: int, reason: str):
        super().__init__(f"stopped by {reason} at epoch {epoch}, step {next_step}")
        self.epoch, self.next_step, self.reason = epoch, next_step, reason


def amp_dtype(args, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of this run (None: fp32): `--amp` with `--amp-dtype` (auto: fp16 on CUDA
    with a GradScaler, as DeiT, and bf16 elsewhere)."""
    if not bool(getattr(args, "amp", False)):
        return None
    return autocast_dtype(AMP_DTYPE_PRECISIONS[getattr(args, "amp_dtype", "auto") or "auto"], device)


def _split_outputs(outputs):
    """(outputs for the criterion, auxiliary loss or None); the aux loss is removed from dicts."""
    if isinstance(outputs, dict) and "aux_loss" in outputs:
        outputs = dict(outputs)
        return outputs, outputs.pop("aux_loss")
    return outputs, None


def _to_float(outputs):
    """Model outputs in float32, so losses are not computed in bf16/fp16 under autocast."""
    if isinstance(outputs, torch.Tensor):
        return outputs.float() if outputs.is_floating_point() else outputs
    if isinstance(outputs, dict):
        return {k: _to_float(v) for k, v in outputs.items()}
    if isinstance(outputs, (tuple, list)):
        return type(outputs)(_to_float(v) for v in outputs)
    return outputs


def _backward_and_step(loss, optimizer, loss_scaler, clip_grad, parameters, need_update: bool) -> None:
    if loss_scaler is not None:
        loss_scaler(loss, optimizer, clip_grad=clip_grad, parameters=parameters, need_update=need_update)
        return
    loss.backward()
    if need_update:
        if clip_grad is not None:
            torch.nn.utils.clip_grad_norm_(parameters, clip_grad)
        optimizer.step()


def _log_skipped_files(prefix: str, kind: str, skipped: list) -> None:
    """One warning for a pass over the data: each unreadable file once (first 20 named) and the total."""
    unique = list(dict.fromkeys(skipped))  # a file can be skipped again when a neighbour replaces it
    if unique:
        shown = ", ".join(unique[:20])
        _logger.warning(f"{prefix}{len(unique)} {kind} files could not be read and were replaced: "
                        f"{shown}{' ...' if len(unique) > 20 else ''}")


def train_one_epoch(model, criterion, data_loader, optimizer, device, epoch: int, loss_scaler,
                    clip_grad=None, model_ema=None, mixup_fn=None, hooks=None, args=None, *,
                    model_without_ddp=None, lr_scheduler=None, run_state: RunState | None = None,
                    start_step: int = 0, stop_request=None, save_mid_epoch=None,
                    set_training_mode: bool = True) -> dict:
    """Train for one epoch (or its remainder from batch `start_step`); return the meters' averages.

    `save_mid_epoch(next_step)` writes a checkpoint that resumes at batch `next_step`
    of this epoch; it is called every --save-every-iters optimizer steps and when
    `stop_request` is set, after which TrainingInterrupted is raised.
    """
    model.train(set_training_mode)
    unwrapped = model_without_ddp if model_without_ddp is not None else model
    run_state = run_state if run_state is not None else RunState()
    accum_iter = max(int(getattr(args, "accum_iter", 1)), 1)
    dtype = amp_dtype(args, device)
    channels_last = bool(getattr(args, "channels_last", False))
    total_batches = start_step + len(data_loader)
    optimizer_steps_per_epoch = max(total_batches // accum_iter, 1)
    print_freq = int(getattr(args, "print_freq", 10))
    named_params = [(name, p) for name, p in unwrapped.named_parameters() if p.requires_grad]
    params = [p for _, p in named_params]

    metric_logger = MetricLogger(delimiter="  ")
    metric_logger.add_meter("lr", SmoothedValue(window_size=1, fmt="{value:.6f}"))
    header = f"Epoch: [{epoch}]"
    skipped_files: list = []

    optimizer.zero_grad(set_to_none=True)
    with contextlib.closing(metric_logger.log_every(data_loader, print_freq, header, total=total_batches,
                                                    start_index=start_step,
                                                    batch_size=getattr(args, "batch_size", None))) as batches:
        for i, batch in enumerate(batches, start=start_step):
            skipped_files.extend(getattr(batch, "skipped", None) or [])
            samples, targets = batch[0], batch[1]
            samples = samples.to(device, non_blocking=True)
            targets = targets.to(device, non_blocking=True)
            if channels_last:
                samples = samples.contiguous(memory_format=torch.channels_last)
            if mixup_fn is not None:
                samples, targets = mixup_fn(samples, targets)

            first_of_step = i % accum_iter == 0
            need_update = (i + 1) % accum_iter == 0 or i + 1 == total_batches
            if hooks is not None and first_of_step:
                opt_step = i // accum_iter
                hooks.on_step_start(unwrapped, epoch, opt_step, optimizer_steps_per_epoch)
                if model_ema is not None:
                    hooks.on_step_start(model_ema.module, epoch, opt_step, optimizer_steps_per_epoch)

            sync_ctx = model.no_sync() if (not need_update and hasattr(model, "no_sync")) else contextlib.nullcontext()
            with sync_ctx:
                with autocast_in(device, dtype):
                    outputs = _to_float(model(samples))
                    outputs, aux_loss = _split_outputs(outputs)
                    loss = criterion(samples, outputs, targets)
                    if aux_loss is not None:
                        loss = loss + aux_loss
                loss_value = loss.item()
                if any_rank(not math.isfinite(loss_value), device):
                    _handle_nonfinite(loss_value, epoch, i, args, run_state, _nonfinite_weight(named_params, device))
                    optimizer.zero_grad(set_to_none=True)
                    continue
                if need_update and hooks is not None:
                    hooks.before_optimizer_step(unwrapped, optimizer)
                _backward_and_step(loss / accum_iter, optimizer, loss_scaler, clip_grad, params, need_update)

            if need_update:
                optimizer.zero_grad(set_to_none=True)
                run_state.optimizer_steps += 1
                if hooks is not None:
                    hooks.after_optimizer_step(unwrapped)
                if model_ema is not None:
                    model_ema.update(unwrapped)
                if lr_scheduler is not None and getattr(args, "sched_step", "epoch") == "iter":
                    lr_scheduler.step_update(num_updates=epoch * optimizer_steps_per_epoch + i // accum_iter + 1)

            metric_logger.update(loss=loss_value)
            if aux_loss is not None:
                metric_logger.update(aux_loss=float(aux_loss.detach().float().item()))
            metric_logger.update(lr=optimizer.param_groups[0]["lr"])
            if hooks is not None and (i + 1) % max(print_freq, 1) == 0:
                method_state = hooks.log_state(unwrapped)
                if method_state:
                    metric_logger.update(**method_state)

            if need_update:
                preempt_at = int(getattr(args, "preempt_at_step", 0) or 0)
                if stop_request is not None and preempt_at and run_state.optimizer_steps == preempt_at:
                    stop_request.request("--preempt-at-step")
                if i + 1 < total_batches:  # after the last step the epoch checkpoint follows instead
                    _maybe_stop_or_save(args, run_state, stop_request, save_mid_epoch, epoch, i + 1, device,
                                        _with_optimizer_state(named_params, optimizer))

    # The epoch checkpoint follows: an update with a finite loss may have left NaN/Inf weights.
    _stop_if_weights_nonfinite(_with_optimizer_state(named_params, optimizer), epoch, total_batches - 1, device)
    _log_skipped_files(f"epoch {epoch}: ", "training", skipped_files)
    metric_logger.synchronize_between_processes()
    _logger.info(f"Averaged stats: {metric_logger}")
    return metric_logger.global_averages()


def _with_optimizer_state(named_params, optimizer) -> list:
    """The parameters and the optimizer's state tensors (moments can overflow before the weights do)."""
    names = {id(p): name for name, p in named_params}
    state = [(f"optimizer.{key}[{names.get(id(param), 'parameter')}]", value)
             for param, entry in getattr(optimizer, "state", {}).items()
             for key, value in entry.items() if isinstance(value, torch.Tensor) and value.is_floating_point()]
    return list(named_params) + state


def _nonfinite_weight(named_params, device) -> str | None:
    """Name of the first non-finite parameter (every rank gets an answer when any rank has one), or None.

    One device sync for all parameters; called only where a decision depends on it.
    """
    flags = [torch.isfinite(p).all() for _, p in named_params]
    finite = torch.stack(flags) if flags else torch.ones(1, dtype=torch.bool)
    bad = not bool(finite.all().item())
    if not any_rank(bad, device):
        return None
    return named_params[int((~finite).nonzero()[0].item())][0] if bad else "on another rank"


def _stop_if_weights_nonfinite(named_params, epoch: int, step: int, device) -> None:
    """Stop before a checkpoint is due when the update of `step` left non-finite weights.

    A CPU may overflow the weights one step before the loss (or the other way round); both
    orders end in one NonFiniteLossError, so the run stops with a single message.
    """
    bad = _nonfinite_weight(named_params, device)
    if bad:
        raise NonFiniteLossError(
            f"weights became non-finite ({bad}) at epoch {epoch}, step {step} while the loss was finite: "
            f"training stopped and the last checkpoint is left untouched; lower --lr or set --clip-grad")


def _handle_nonfinite(loss_value: float, epoch: int, step: int, args, run_state: RunState,
                      bad_weight: str | None = None) -> None:
    if bad_weight:  # skipping a step cannot repair weights that are already NaN/Inf
        raise NonFiniteLossError(
            f"loss is {loss_value} at epoch {epoch}, step {step} because the weights are already non-finite "
            f"({bad_weight}): training stopped and the last checkpoint is left untouched; lower --lr or "
            f"set --clip-grad (--skip-nonfinite cannot help here)")
    budget = int(getattr(args, "skip_nonfinite", 0) or 0)
    if run_state.nonfinite_skipped < budget:
        run_state.nonfinite_skipped += 1
        _logger.warning(f"non-finite loss ({loss_value}) at epoch {epoch}, step {step}: step skipped "
                        f"({run_state.nonfinite_skipped}/{budget} allowed by --skip-nonfinite)")
        return
    raise NonFiniteLossError(
        f"loss is {loss_value} at epoch {epoch}, step {step}: training stopped and the last checkpoint "
        f"is left untouched; lower --lr, set --clip-grad, or allow skips with --skip-nonfinite K")


def _maybe_stop_or_save(args, run_state: RunState, stop_request, save_mid_epoch, epoch: int,
                        next_step: int, device, named_params=()) -> None:
    stop = any_rank(stop_request is not None and stop_request.is_set(), device)
    every = int(getattr(args, "save_every_iters", 0) or 0)
    if save_mid_epoch is not None and (stop or (every and run_state.optimizer_steps % every == 0)):
        _stop_if_weights_nonfinite(list(named_params), epoch, next_step - 1, device)
        save_mid_epoch(next_step)
    if stop:
        raise TrainingInterrupted(epoch, next_step, getattr(stop_request, "signal_name", None) or "a stop request")


@torch.no_grad()
def evaluate(data_loader, model, device, args=None, header: str = "Test:", summary_prefix: str = "*") -> dict:
    """Top-1/top-5 accuracy and CE loss, summed exactly over ranks (each sample counted once)."""
    model.eval()
    dtype = amp_dtype(args, device)
    channels_last = bool(getattr(args, "channels_last", False))
    metric_logger = MetricLogger(delimiter="  ", logger=logging.getLogger("eval"))
    if getattr(args, "dist_eval", False):
        header = f"{header} (rank {get_rank()}'s shard)"
    # loss sum, correct@1, correct@5, samples, sum of per-batch mean losses, batches
    totals = torch.zeros(6, dtype=torch.float64, device=device)
    skipped_files: list = []
    with contextlib.closing(metric_logger.log_every(data_loader, int(getattr(args, "print_freq", 10)),
                                                    header)) as batches:
        for batch in batches:
            skipped_files.extend(getattr(batch, "skipped", None) or [])
            images = batch[0].to(device, non_blocking=True)
            target = batch[1].to(device, non_blocking=True)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with autocast_in(device, dtype):
                output = main_logits(model(images))
            output = output.float()
            loss = F.cross_entropy(output, target, reduction="sum")
            acc1, acc5 = accuracy(output, target, topk=(1, 5))
            n = images.shape[0]
            # timm's accuracy is a percentage of the batch: back to exact counts
            totals += torch.tensor([loss.item(), round(acc1.item() * n / 100.0), round(acc5.item() * n / 100.0), n,
                                    loss.item() / n, 1], dtype=torch.float64, device=device)
            metric_logger.update(n=n, acc1=acc1.item(), acc5=acc5.item())
    _log_skipped_files(f"{header} ", "evaluation", skipped_files)
    if getattr(args, "dist_eval", False):  # sharded: each rank saw a disjoint part
        all_reduce_sum(totals)
    count = max(totals[3].item(), 1.0)
    # DeiT's printed loss is its meter's average of per-batch mean losses (batches weigh equally);
    # `loss_per_image` is the exact mean over images. They differ only when batch sizes differ.
    stats = {
        "loss": totals[4].item() / max(totals[5].item(), 1.0),
        "acc1": 100.0 * totals[1].item() / count,
        "acc5": 100.0 * totals[2].item() / count,
        "loss_per_image": totals[0].item() / count,
    }
    logging.getLogger("eval").info(
        f"{summary_prefix} Acc@1 {stats['acc1']:.3f} Acc@5 {stats['acc5']:.3f} loss {stats['loss']:.3f} ({int(count)} images)"
        f"  per-image loss {stats['loss_per_image']:.4f}")
    return stats
