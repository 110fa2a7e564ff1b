"""Training and evaluation entry point: DeiT's recipe (Touvron et al., ICML 2021) on timm 1.0.

Every flag and default of DeiT's main.py is kept (see docs/training.md),
plus timm-style aliases, `--cfg FILE.yaml`, and reliability features: atomic
checkpoints, `--auto-resume` (also mid-epoch), Slurm preemption and Ctrl-C handling,
`--save-every-iters`, `--skip-nonfinite`, and bitwise-reproducible resumption.
Method flags, hooks, criteria and commands come from the method-family registry
(`models/family.py`): this file names no method.

    python main.py --model deit_small_patch16_224 --data-path /imagenet --output_dir out
    torchrun --nproc_per_node=8 main.py --model ... --dist-eval

Deliberate deviations from DeiT (documented in the flag help): no site-specific
default --data-path (without one the SYNTHETIC data set is used); mixed precision is
on by default only on CUDA (fp16, as DeiT; on CPU DeiT's autocast is a no-op, so fp32;
`--amp` asks for bf16 there); `--resume` continues with the learning rate the
interrupted run would have used (`--resume-lr-quirk` reproduces DeiT's extra step);
the distributed evaluation counts every sample exactly once; checkpoints store `args`
as a dict.
"""
from __future__ import annotations

import argparse
import datetime
import glob
import json
import logging
import os
import random
import sys
import time
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import torch
import torch.backends.cudnn as cudnn
import yaml

import datasets
import mixing
from arguments import parse_args, resolved_options, training_only_dests
from engine import NonFiniteLossError, TrainingInterrupted, amp_dtype, cast_for_inference, evaluate, train_one_epoch
from losses import build_criterion, build_teacher
from models import family as families
from models.compiling import compile_model
from models.errors import ModelConfigError
from models.hooks import MethodHooks
from samplers import ExactDistributedEvalSampler, PerSampleSeeded, RASampler, ShardedShuffleSampler, mix_seed
from utils import distributed as dist_utils
from utils.checkpoint import (describe_finetune, extract_state_dict, keep_epoch_copy, load_checkpoint_file, preserved_rng,
                              restore_rng_state)
from utils.errors import UserError
from utils.input_size import dropped_pixels, nearest_sizes
from utils.logger import append_json_line, attach_log_file, make_tensorboard_writer, quiet_cpu_compile, setup_logging
from utils.resume import (RunState, TrainingParts, checkpoint_error, finished_run_summary, resume_if_possible,
                          save_training_checkpoint)
from utils.run_dir import OutputDirLock, check_output_dir, make_output_dir

# Importable from main as before the parser and checkpoint code moved out (DeiT's `main.get_args_parser`
# is what scripts/submitit_train.py, benchmark.py and the tests use).
from arguments import add_method_args, build_parser, get_args_parser, load_cfg_defaults, option_dests  # noqa: E402,F401,I001
from utils.resume import write_checkpoint  # noqa: E402,F401,I001

_logger = logging.getLogger("main")


def seed_everything(seed: int, deterministic: bool) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % (1 << 32))
    random.seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        cudnn.deterministic = True
        cudnn.benchmark = False
    else:
        cudnn.benchmark = True


def check_model_name(name: str) -> None:
    from models.factory import check_model_name as check
    try:
        check(name)
    except ModelConfigError as err:
        raise UserError(str(err).replace("unknown model", "unknown --model", 1)) from None


def _warn_ignored(model_name: str, ignored: list) -> None:
    _logger.warning(f"--{', --'.join(ignored)} ha{'s' if len(ignored) == 1 else 've'} no effect on --model "
                    f"{model_name} (not an option of its family)")


def create(args, num_classes: int, checkpoint=None, load: str = "strict", source: str = "checkpoint",
           apply_patches: bool = True, options=None):
    """models.factory.create_model with the trainer's sizes, drop rates and method flags."""
    from models.factory import create_model
    return create_model(args.model, options=args if options is None else options, num_classes=num_classes,
                        img_size=args.input_size, drop_rate=args.drop, drop_path_rate=args.drop_path,
                        model_kwargs=args.model_kwargs, checkpoint=checkpoint, load=load, source=source,
                        apply_patches=apply_patches, on_ignored=lambda names: _warn_ignored(args.model, names))


def resolve_target_gmacs(args, num_classes: int) -> None:
    """--target-gmacs: replace the family's 'auto' reduction value by the searched one (logged)."""
    if args.target_gmacs is None:
        return
    from models import flops

    family = next(f for f in families.active_families(args.model, args)
                  if f.reduction is not None and getattr(args, f.reduction.dest, None) == families.AUTO)
    dest = family.reduction.dest
    size = args.input_size

    def build(value):
        options = argparse.Namespace(**vars(args))
        setattr(options, dest, value)
        with preserved_rng():
            return create(args, num_classes, options=options).eval()

    def gmacs_of(model):
        return flops.count_flops(model, (size, size))["gmacs"]

    try:
        value, gmacs = family.reduction.search(build, args.target_gmacs, gmacs_of)
    except ModelConfigError as err:
        raise UserError(str(err)) from None
    setattr(args, dest, value)
    _logger.info(f"--target-gmacs {args.target_gmacs:g}: --{dest.replace('_', '-')} {value} gives {gmacs:.3f} GMACs "
                 f"({100 * (gmacs - args.target_gmacs) / args.target_gmacs:+.2f}%, fvcore counter)")
    args.target_gmacs_result = {"dest": dest, "value": value, "gmacs": gmacs}


def build_model(args, num_classes: int):
    """The model with its initial weights: --resume/--auto-resume are loaded later, strictly;
    --finetune and --pretrained go through timm's pretrained machinery here."""
    check_model_name(args.model)
    try:
        if args.pretrained:
            model = _pretrained(args, num_classes)
        elif args.finetune and not args.resume:
            try:
                checkpoint = load_checkpoint_file(args.finetune)
            except UserError as err:
                raise UserError(f"--finetune: {err}") from None
            load = "partial" if args.finetune_partial else "finetune"
            try:
                model = create(args, num_classes, checkpoint=checkpoint, load=load,
                               source=f"--finetune {args.finetune}")
            except ModelConfigError as err:
                if hasattr(err, "summary"):
                    raise checkpoint_error(err, extract_state_dict(checkpoint), args.model) from None
                raise
            summary, *details = describe_finetune(model.load_summary, extract_state_dict(checkpoint),
                                                  model.state_dict())
            _logger.info(f"finetune from {args.finetune}: {summary}")
            for line in details:
                _logger.info(f"finetune: {line}")
        else:
            model = create(args, num_classes)
    except ModelConfigError as err:
        raise UserError(str(err)) from None
    return model


def _pretrained(args, num_classes: int):
    """--pretrained: timm's own weights of the model, from the local cache only."""
    import timm
    from models.factory import create_model
    try:
        base = timm.create_model(args.model, pretrained=True, num_classes=num_classes)
    except Exception as err:  # noqa: BLE001  (offline: any hub/download failure means the same)
        raise UserError(f"--pretrained: timm has no local copy of the weights of {args.model} and this machine "
                        f"does not download ({type(err).__name__}); download them elsewhere and pass "
                        f"--finetune FILE") from None
    model = create_model(args.model, options=args, num_classes=num_classes, img_size=args.input_size,
                         drop_rate=args.drop, drop_path_rate=args.drop_path, model_kwargs=args.model_kwargs,
                         checkpoint={"model": base.state_dict()}, load="finetune", source="--pretrained weights")
    _logger.info(f"pretrained weights of {args.model}: {model.load_summary.line()}")
    return model


def check_runs_at_input_size(model, args) -> None:
    """One image through the model before any data is read, so a size the architecture cannot take
    (or would take only by dropping pixels: a patch size or stride that does not divide it) fails
    at start-up, not after 'start training'."""
    size = args.input_size
    param = next(model.parameters(), None)
    try:
        with preserved_rng():
            found = dropped_pixels(model, size, param.device if param is not None else "cpu")
    except (RuntimeError, ValueError, AssertionError) as err:
        text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"--model {args.model} cannot run on {size}x{size} images ({text}); "
                        f"pick another --input-size (the model's default is its pretrained size)") from None
    if found:
        sizes = nearest_sizes(size, found)
        raise UserError(f"--input-size {size} does not fit --model {args.model}: {found[0].describe()}; "
                        + (f"use --input-size {' or '.join(map(str, sizes))}" if sizes
                           else "use a size its patches and strides divide"))


def apply_attn_only(model) -> None:
    """DeiT --attn-only: train attention weights, the head and pos_embed; freeze the rest."""
    for name, param in model.named_parameters():
        param.requires_grad = ".attn." in name or name.startswith(("head.", "head_dist.", "pos_embed"))


def precision_name(args, device) -> str:
    """What the forward runs in: 'fp32', 'bf16 weights', or the autocast dtype."""
    if getattr(args, "bf16_weights", False):
        return "bf16 weights"
    dtype = amp_dtype(args, device)
    return "fp32" if dtype is None else {torch.float16: "fp16 autocast", torch.bfloat16: "bf16 autocast"}[dtype]


def fused_attention_state() -> str:
    from timm.layers import use_fused_attn
    return "on" if use_fused_attn() else "off"


def lr_scale(args, world_size: int) -> float:
    return 1.0 if args.unscale_lr else args.batch_size * world_size * args.accum_iter / 512.0


def scaled_lr(args, world_size: int) -> float:
    return args.lr * lr_scale(args, world_size)


def build_optimizer(args, model, lr: float, world_size: int = 1, hooks: MethodHooks | None = None):
    """timm's optimizer factory: no weight decay on 1-D params and no_weight_decay() names, unless
    --decay-norm-and-bias; a method's hooks may give their own parameter groups (one lr per --lr value)."""
    from timm.optim import create_optimizer_v2, optimizer_kwargs

    kwargs = optimizer_kwargs(args)
    kwargs["lr"] = lr
    lrs = [value * lr_scale(args, world_size) for value in getattr(args, "lr_values", [args.lr])]
    if hooks is not None:
        try:
            groups = hooks.param_groups(model, lrs)
        except ModelConfigError as err:
            raise UserError(str(err)) from None
        if groups is not None:
            return create_optimizer_v2(groups, **kwargs)
    if len(lrs) > 1:
        raise UserError(f"--lr takes one value for --model {args.model} (several values are for families whose "
                        f"help names them); got {' '.join(map(str, args.lr_values))}")
    if args.decay_norm_and_bias:
        # A plain parameter list gets one group with weight decay on everything.
        return create_optimizer_v2([p for p in model.parameters() if p.requires_grad], **kwargs)
    return create_optimizer_v2(model, **kwargs)


def build_scheduler(args, optimizer, updates_per_epoch: int):
    from timm.scheduler import create_scheduler_v2
    from timm.scheduler.scheduler_factory import scheduler_kwargs

    kwargs = scheduler_kwargs(args)
    kwargs["step_on_epochs"] = args.sched_step == "epoch"
    if args.warmup_prefix:  # timm adds the warm-up on top of num_epochs; the run itself lasts --epochs
        kwargs["num_epochs"] = args.epochs - args.warmup_epochs
    scheduler, _ = create_scheduler_v2(optimizer, **kwargs, updates_per_epoch=updates_per_epoch)
    return scheduler


def build_loaders(args, dataset_train, dataset_val, world_size: int, rank: int):
    """Train loader (seeded per sample, resumable sampler) and val loader (exact shards with --dist-eval)."""
    collate = getattr(datasets, "collate_skipping", None)
    pin = bool(args.pin_mem) and str(args.device).startswith("cuda")
    train_loader = sampler_train = None
    if dataset_train is not None:
        if args.distributed and args.repeated_aug:
            sampler_train = RASampler(len(dataset_train), world_size, rank, seed=args.seed, tag_seeds=True)
            if len(sampler_train) < args.batch_size:
                raise UserError(f"repeated augmentation uses floor(n / 256) * 256 / world samples per process: "
                                f"{len(sampler_train)} for {len(dataset_train)} images, fewer than --batch-size "
                                f"{args.batch_size}; pass --no-repeated-aug or use more data")
        else:
            sampler_train = ShardedShuffleSampler(len(dataset_train), world_size, rank, seed=args.seed, tag_seeds=True)
        if len(sampler_train) < args.batch_size:
            raise UserError(f"the training set gives {len(sampler_train)} samples per process, fewer than "
                            f"--batch-size {args.batch_size}; lower --batch-size")
        train_loader = torch.utils.data.DataLoader(
            PerSampleSeeded(dataset_train), sampler=sampler_train, batch_size=args.batch_size,
            num_workers=args.num_workers, pin_memory=pin, drop_last=True, collate_fn=collate,
            generator=torch.Generator(), worker_init_fn=dist_utils.ignore_stop_signals)
    if args.distributed and args.dist_eval:
        sampler_val = ExactDistributedEvalSampler(len(dataset_val), world_size, rank)
    else:
        sampler_val = torch.utils.data.SequentialSampler(dataset_val)
    val_loader = torch.utils.data.DataLoader(
        dataset_val, sampler=sampler_val, batch_size=int(1.5 * args.batch_size), num_workers=args.num_workers,
        pin_memory=pin, drop_last=False, collate_fn=collate, generator=torch.Generator().manual_seed(args.seed),
        worker_init_fn=dist_utils.ignore_stop_signals)
    return train_loader, sampler_train, val_loader


# ============================================================================ main

def _log_eval(stats: dict, n: int, label: str = "the network", decimals: int = 1) -> None:
    _logger.info(f"Accuracy of {label} on the {n} test images: {stats['acc1']:.{decimals}f}%")


def cap_workers(args) -> None:
    """More DataLoader workers than cores only slow a run down (and make PyTorch warn per loader)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    if args.num_workers > cores:
        _logger.warning(f"--num_workers {args.num_workers} is more than the {cores} CPU cores available: using {cores}")
        args.num_workers = cores


def run_record(args, device, weights: str) -> dict:
    """What every evaluation record names: precision, fused attention, which weights."""
    record = {"precision": precision_name(args, device), "fused_attn": fused_attention_state(), "weights": weights}
    if getattr(args, "target_gmacs_result", None):
        record["target_gmacs"] = args.target_gmacs_result
    return record


def main(args) -> int:
    check_output_dir(args.output_dir)
    dist_utils.init_distributed_mode(args)
    # Rank 0 holds the output folder for the whole run: a second run into it stops with exit 2.
    with OutputDirLock(args.output_dir if dist_utils.is_main_process() else "") as lock:
        return _main(args, lock)


def _main(args, lock: OutputDirLock) -> int:
    rank, world_size = dist_utils.get_rank(), dist_utils.get_world_size()
    setup_logging(None, rank)
    cap_workers(args)
    device = torch.device(args.device)
    options = resolved_options(args)
    if args.eval:  # an evaluation logs only what shapes it (no lr, epochs, mixup, ...)
        training_only = training_only_dests()
        options = {k: v for k, v in options.items() if k not in training_only}
    _logger.info("arguments: " + json.dumps(options, default=str))
    _logger.info(f"precision: {precision_name(args, device)}; fused attention: {fused_attention_state()}"
                 + ("" if args.amp or device.type == "cuda" else " (pass --amp for bf16 autocast on CPU)"))
    if not args.output_dir and not args.eval:
        _logger.warning("no --output_dir: this run saves no checkpoint, log.txt or args.yaml; "
                        "pass --output_dir DIR to keep them")
    seed_everything(args.seed + rank, args.deterministic)
    if args.output_dir and os.path.isdir(args.output_dir):
        lock.acquire()  # before reading its checkpoints; a new folder is locked once created

    run = build_run(args, device, world_size, rank)
    if not args.eval and run.state.resumed_from and run.state.start_epoch >= args.epochs:
        _logger.info(finished_run_summary(args, run.state))
        return 0

    if args.output_dir and dist_utils.is_main_process():
        make_output_dir(args.output_dir)
        lock.acquire()
        with open(os.path.join(args.output_dir, "args.yaml"), "w") as f:
            yaml.safe_dump(resolved_options(args), f, sort_keys=True)
    dist_utils.barrier()
    if args.output_dir:
        attach_log_file(args.output_dir, rank)

    if run_commands(args, run, device, before_eval=True):
        return 0
    if args.eval:
        weights = "EMA (model_ema)" if args.use_ema else "model"
        state = run.parts.hooks.log_state(run.model_without_ddp)
        _logger.info(f"evaluating the {weights} weights of {run.state.resumed_from or args.finetune or 'the initialised model'}"
                     + (f" ({_format_state(state)})" if state else ""))
        stats = evaluate(run.val_loader, run.model_without_ddp, device, args)
        _log_eval(stats, len(run.dataset_val), decimals=getattr(args, "accuracy_decimals", 1))
        if args.output_dir and dist_utils.is_main_process():
            append_json_line(os.path.join(args.output_dir, "log.txt"),
                             {**{f"test_{k}": v for k, v in stats.items()}, "eval": True,
                              **run_record(args, device, weights)})
        run_commands(args, run, device, before_eval=False)
        return 0
    # Only training turns SIGTERM/SIGUSR1/SIGINT into "finish the step, save, exit 0"; before
    # that (data scan, --eval) the default behaviour (terminate) is what a user wants.
    stop_request = dist_utils.StopRequest()
    stop_request.install()
    return train(args, run, device, stop_request)


def run_commands(args, run, device, before_eval: bool) -> bool:
    """The families' extra commands switched on by their flags; True when one ends the run.

    Exiting commands (e.g. a visualisation) run after --eval when both are given, as the
    official code does; non-exiting ones (a speed test) run before."""
    context = SimpleNamespace(**{**vars(args), "data_loader": run.val_loader, "device": device})
    ran_exiting = False
    for family in families.active_families(args.model, args):
        for command in family.commands:
            if not getattr(args, command.dest, False) or (command.exits and before_eval and args.eval) \
                    or (not command.exits and not before_eval):
                continue
            if command.main_process_only and not dist_utils.is_main_process():
                ran_exiting = ran_exiting or command.exits
                continue
            if args.output_dir:
                make_output_dir(args.output_dir)
            _logger.info(f"--{command.dest.replace('_', '-')} ({family.name})")
            families.resolve_command(command)(run.model_without_ddp, context)
            ran_exiting = ran_exiting or command.exits
    return ran_exiting


@dataclass
class Run:
    """Everything built before the first epoch: what checkpoints hold (`parts`, with the run's
    progress in `parts.run_state`) plus the wrapped model, data and criterion."""
    model: torch.nn.Module  # DDP / compiled wrapper of parts.model_without_ddp
    parts: TrainingParts
    train_loader: object
    sampler_train: object
    val_loader: object
    dataset_val: object
    mixup_fn: object
    criterion: object
    n_parameters: int
    set_training_mode: bool

    @property
    def model_without_ddp(self) -> torch.nn.Module:
        return self.parts.model_without_ddp

    @property
    def state(self) -> RunState:
        return self.parts.run_state


def _needs_training_data(args) -> bool:
    if args.eval:
        return False
    for family in families.active_families(args.model, args):
        for command in family.commands:
            if getattr(args, command.dest, False) and command.exits and not command.needs_data:
                return False
    return True


def build_run(args, device, world_size: int, rank: int) -> Run:
    """Data, model, weights, optimizer, criterion and resume state; raises UserError on bad input."""
    check_model_name(args.model)  # before the (possibly slow) data set scan

    dataset_train = None
    if _needs_training_data(args):
        dataset_train, nb_classes = datasets.build_dataset(True, args)
    dataset_val, nb_val_classes = datasets.build_dataset(False, args)
    nb_classes = nb_val_classes if dataset_train is None else nb_classes
    datasets.check_class_count(nb_classes, args, training=dataset_train is not None)
    resolve_target_gmacs(args, nb_classes)
    _logger.info(f"creating model {args.model}")
    model = build_model(args, nb_classes)
    check_runs_at_input_size(model, args)
    train_loader, sampler_train, val_loader = build_loaders(args, dataset_train, dataset_val, world_size, rank)
    mixup_fn = mixing.build_mixup(args, nb_classes) if dataset_train is not None else None

    if args.attn_only:
        apply_attn_only(model)
    if args.distillation_type != "none" and hasattr(model, "set_distilled_training"):
        model.set_distilled_training(True)
    model.to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)

    model_ema = None
    if args.model_ema and not args.eval:
        from timm.utils import ModelEmaV2
        model_ema = ModelEmaV2(model, decay=args.model_ema_decay, device="cpu" if args.model_ema_force_cpu else None)

    model_without_ddp = model
    try:
        hooks = families.training_hooks(model_without_ddp, args.model, args)
    except ModelConfigError as err:
        raise UserError(str(err)) from None
    if args.distributed:
        find_unused = hooks.ddp_find_unused_parameters(model_without_ddp)
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=find_unused)
    if args.compile:
        quiet_cpu_compile()
        model = compile_model(model)
    n_parameters = sum(p.numel() for p in model_without_ddp.parameters() if p.requires_grad)
    _logger.info(f"number of params: {n_parameters}")

    lr = scaled_lr(args, world_size)
    optimizer = build_optimizer(args, model_without_ddp, lr, world_size, hooks)
    loss_scaler = None
    if amp_dtype(args, device) == torch.float16 and device.type == "cuda":
        from timm.utils import NativeScaler
        loss_scaler = NativeScaler()
    updates_per_epoch = max(len(train_loader) // args.accum_iter, 1) if train_loader is not None else 1
    lr_scheduler = build_scheduler(args, optimizer, updates_per_epoch)
    if not args.eval:
        _logger.info(f"lr {args.lr:g} scaled to {lr:g} (batch {args.batch_size} x {world_size} processes x "
                     f"{args.accum_iter} accumulation / 512)" if not args.unscale_lr else f"lr {lr:g} (unscaled)")

    teacher = build_teacher(args, nb_classes, device) if args.distillation_type != "none" and not args.eval else None
    criterion = build_criterion(args, model_without_ddp, mixup_fn, teacher)
    if not args.eval:
        try:
            criterion = hooks.wrap_criterion(criterion, model_without_ddp)
        except ModelConfigError as err:
            raise UserError(str(err)) from None
    parts = TrainingParts(model_without_ddp, optimizer, lr_scheduler, loss_scaler, model_ema, RunState(), hooks)
    resume_if_possible(args, parts)
    if args.eval:
        hooks.prepare_eval(model_without_ddp)
        if args.bf16_weights:
            cast_for_inference(model_without_ddp, torch.bfloat16)
    set_training_mode = args.train_mode
    if args.finetune and args.train_mode and hooks.train_mode_when_finetuning is False:
        set_training_mode = False
        _logger.info("fine-tuning with model.train(False) (dropout and drop-path off), as the official code of "
                     f"{', '.join(n for n, h in zip(hooks.names, hooks.hooks) if h.train_mode_when_finetuning is False)} does")
    return Run(model, parts, train_loader, sampler_train, val_loader, dataset_val, mixup_fn, criterion,
               n_parameters, set_training_mode)


def _should_evaluate(args, epoch: int) -> bool:
    return epoch % args.eval_every == 0 or epoch == args.epochs - 1


def _mark_preempted(output_dir: str, reason: str) -> None:
    """A marker the Slurm script looks for to requeue the job."""
    if output_dir and dist_utils.is_main_process():
        with open(os.path.join(output_dir, ".preempted"), "w") as f:
            f.write(reason + "\n")


def _format_state(state: dict) -> str:
    return " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in state.items())


def train(args, run: Run, device, stop_request) -> int:
    parts, model_without_ddp, hooks = run.parts, run.model_without_ddp, run.parts.hooks
    output_dir = args.output_dir
    ckpt_path = os.path.join(output_dir, "checkpoint.pth") if output_dir else ""
    log_path = os.path.join(output_dir, "log.txt") if output_dir else ""
    tb_writer = make_tensorboard_writer(output_dir) if (args.tensorboard and output_dir and dist_utils.is_main_process()) else None
    if output_dir and dist_utils.is_main_process():
        # Leftovers of an interrupted run: the requeue marker and half-written temporary files.
        for stale in [os.path.join(output_dir, ".preempted")] + glob.glob(os.path.join(output_dir, ".tmp_*.pth.*")):
            if os.path.exists(stale):
                os.unlink(stale)
    if log_path and not run.state.resumed_from and os.path.exists(log_path) and dist_utils.is_main_process():
        _logger.warning(f"{log_path} exists from an earlier run: this new run appends to it "
                        f"(pass --auto-resume to continue that run instead)")
    state = run.state
    last_stats: dict = {}
    if state.rng_state is not None:
        restore_rng_state(state.rng_state)

    _logger.info(f"start training for {args.epochs} epochs")
    start_time = time.time()
    first_epoch = state.start_epoch
    for epoch in range(state.start_epoch, args.epochs):
        start_step = state.start_step if epoch == state.start_epoch else 0
        run.sampler_train.set_epoch(epoch)
        run.sampler_train.set_start_index(start_step * args.batch_size)
        hooks.on_epoch_start(model_without_ddp, epoch)
        if parts.model_ema is not None:
            hooks.on_epoch_start(parts.model_ema.module, epoch)
        if hasattr(run.criterion, "on_epoch_start"):
            with preserved_rng():  # e.g. LTM re-clustering must not shift the training RNG streams
                run.criterion.on_epoch_start(model_without_ddp, run.train_loader, epoch, device)
        # Worker base seeds from (seed, epoch, rank), never from the training RNG stream.
        run.train_loader.generator.manual_seed(mix_seed(args.seed, epoch, dist_utils.get_rank()))

        def save_mid_epoch(next_step: int, epoch=epoch) -> None:
            if ckpt_path:
                save_training_checkpoint(args, parts, ckpt_path, epoch, next_step, False)
                _logger.info(f"mid-epoch checkpoint: epoch {epoch}, step {next_step} -> {ckpt_path}")

        try:
            train_stats = train_one_epoch(
                run.model, run.criterion, run.train_loader, parts.optimizer, device, epoch, parts.loss_scaler,
                args.clip_grad, parts.model_ema, run.mixup_fn, hooks, args,
                model_without_ddp=model_without_ddp, lr_scheduler=parts.lr_scheduler, run_state=parts.run_state,
                start_step=start_step, stop_request=stop_request, save_mid_epoch=save_mid_epoch,
                set_training_mode=run.set_training_mode)
        except TrainingInterrupted as stop:
            stop_request.finish()
            _mark_preempted(output_dir, str(stop))
            _logger.warning(f"{stop}; checkpoint written to {ckpt_path or '(no --output_dir: nothing saved)'}; "
                            f"exiting with status 0 (resume with --auto-resume)")
            return 0
        if args.sched_step == "epoch":
            parts.lr_scheduler.step(epoch)

        method_state = hooks.log_state(model_without_ddp)
        test_stats = {}
        if _should_evaluate(args, epoch):
            test_stats = evaluate(run.val_loader, model_without_ddp, device, args)
            _log_eval(test_stats, len(run.dataset_val))
            if parts.model_ema is not None:
                ema_stats = evaluate(run.val_loader, parts.model_ema.module, device, args, header="Test (EMA):",
                                     summary_prefix="* EMA")
                _logger.info(f"EMA accuracy on the {len(run.dataset_val)} test images: {ema_stats['acc1']:.1f}%")
                test_stats.update({f"ema_{k}": v for k, v in ema_stats.items()})
            best_allowed = hooks.best_checkpoint_allowed(model_without_ddp)
            if test_stats["acc1"] > state.max_accuracy and best_allowed:
                state.max_accuracy = test_stats["acc1"]
                if output_dir:
                    save_training_checkpoint(args, parts, os.path.join(output_dir, "best_checkpoint.pth"),
                                             epoch, 0, True)
            why = "" if best_allowed else (f" (no best checkpoint yet: the model is not in its final form "
                                           f"({_format_state(method_state)}); best is tracked once it is)")
            _logger.info(f"Max accuracy: {state.max_accuracy:.2f}%{why}")
        if ckpt_path:
            if save_training_checkpoint(args, parts, ckpt_path, epoch, 0, True) \
                    and dist_utils.is_main_process() and args.checkpoint_hist > 0:
                try:
                    keep_epoch_copy(ckpt_path, epoch, args.checkpoint_hist)
                except OSError as err:
                    _logger.error(f"could not keep the epoch copy of {ckpt_path}: {err}")

        # DeiT's keys in DeiT's order first (machines parse them); this project's extras after.
        deit_test = {k: v for k, v in test_stats.items() if k in ("loss", "acc1", "acc5")}
        extra_test = {k: v for k, v in test_stats.items() if k not in deit_test}
        log_stats = {**{f"train_{k}": v for k, v in train_stats.items()},
                     **{f"test_{k}": v for k, v in deit_test.items()},
                     "epoch": epoch, "n_parameters": run.n_parameters,
                     **{f"test_{k}": v for k, v in extra_test.items()},
                     **({"method": method_state} if method_state else {})}
        if test_stats:
            log_stats.update(run_record(args, device, "model"))
        elif getattr(args, "target_gmacs_result", None):
            log_stats["target_gmacs"] = args.target_gmacs_result
        last_stats = log_stats
        if log_path and dist_utils.is_main_process():
            try:
                append_json_line(log_path, log_stats)
            except OSError as err:
                _logger.error(f"could not append to {log_path} ({err.strerror or err}); training continues")
        if tb_writer is not None:
            for key, value in log_stats.items():
                if isinstance(value, (int, float)) and key not in ("epoch", "n_parameters"):
                    tb_writer.add_scalar(key.replace("_", "/", 1), value, epoch)
            tb_writer.flush()
        elapsed = time.time() - start_time
        done = epoch + 1 - first_epoch
        left = datetime.timedelta(seconds=int(elapsed / done * (args.epochs - epoch - 1)))
        _logger.info(f"epoch {epoch + 1}/{args.epochs} done; run time left about {left}"
                     + (f"; {_format_state(method_state)}" if method_state else ""))
        if dist_utils.any_rank(stop_request.is_set(), device) and epoch + 1 < args.epochs:
            reason = stop_request.signal_name or "a stop request on another rank"
            stop_request.finish()
            _mark_preempted(output_dir, f"stopped by {reason} after epoch {epoch}")
            _logger.warning(f"stopped by {reason}: epoch {epoch} checkpoint written; exiting with status 0 "
                            f"(resume with --auto-resume)")
            return 0

    total = str(datetime.timedelta(seconds=int(time.time() - start_time)))
    _logger.info(f"Training time {total}")
    if tb_writer is not None:
        tb_writer.close()
    report_families(args, run, device, log_path)
    if output_dir:
        _logger.info(f"checkpoint: {ckpt_path}; metrics: {log_path}; "
                     f"logs: {os.path.join(output_dir, 'log_rank*.txt')}; arguments: {os.path.join(output_dir, 'args.yaml')}")
    if "test_acc1" in last_stats:
        _logger.info(f"final accuracy: {last_stats['test_acc1']:.2f}% top-1, {last_stats['test_acc5']:.2f}% top-5 "
                     f"(best {state.max_accuracy:.2f}%)")
    return 0


def report_families(args, run: Run, device, log_path: str) -> None:
    """End-of-training reports of the active families (e.g. a realised FLOPs ratio), logged and in log.txt."""
    if not dist_utils.is_main_process():
        return
    hooks = run.parts.hooks
    context = SimpleNamespace(data_loader=run.val_loader, device=device, input_size=args.input_size,
                              batch_size=args.batch_size, output_dir=args.output_dir)
    for name, hook in zip(hooks.names, hooks.hooks):
        with preserved_rng():
            report = hook.report(run.model_without_ddp, context)
        if not report:  # the family had nothing to report for these options
            continue
        _logger.info(f"{name} report: {json.dumps(report, default=str)}")
        if log_path:
            append_json_line(log_path, {"report": name, **report})


def one_line(err: BaseException) -> str:
    """The error's own message; an error re-raised from a DataLoader worker carries the
    worker's traceback, whose last line holds the original message."""
    text = str(err).strip()
    if "Original Traceback" in text:
        last = text.splitlines()[-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return text.splitlines()[0] if text else type(err).__name__


def cli(argv=None, accuracy_decimals: int = 1) -> int:
    """Command-line wrapper: bad input -> one logged line and exit status 2; Ctrl-C -> 130.

    `accuracy_decimals`: of the final "Accuracy of the network" line (lambda_vit's script prints 2).
    """
    setup_logging(None, int(os.environ.get("RANK", 0)))
    try:
        args = parse_args(argv)
        args.accuracy_decimals = accuracy_decimals
        return main(args)
    except (UserError, ModelConfigError) as err:
        _logger.error(one_line(err))
        return 2
    except NonFiniteLossError as err:
        _logger.error(one_line(err))
        return 1
    except RuntimeError as err:  # a collective whose peer died: one line naming the lost rank
        line = dist_utils.lost_peer_message(err)
        if line is None:
            raise
        _logger.error(line)
        return 1
    except KeyboardInterrupt:
        _logger.error("interrupted by Ctrl-C before a checkpoint could be written; checkpoints already on disk "
                      "are intact (Ctrl-C during training saves and exits cleanly; pressing it twice aborts)")
        return 130
    finally:
        dist_utils.destroy_process_group()


if __name__ == "__main__":
    sys.exit(cli())
