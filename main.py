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
import contextlib
import datetime
import glob
import io
import json
import logging
import math
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
from engine import (NonFiniteLossError, RunState, TrainingInterrupted, amp_dtype, cast_for_inference, evaluate,
                    train_one_epoch)
from losses import build_criterion, build_teacher
from models import family as families
from models.compiling import compile_model
from models.errors import ModelConfigError
from models.hooks import MethodHooks
from samplers import ExactDistributedEvalSampler, PerSampleSeeded, RASampler, ShardedShuffleSampler, mix_seed
from utils import distributed as dist_utils
from utils.checkpoint import (capture_rng_state, close_matches, extract_state_dict, keep_epoch_copy,
                              load_checkpoint_file, restore_rng_state, save_checkpoint)
from utils.errors import UserError
from utils.logger import append_json_line, attach_log_file, make_tensorboard_writer, setup_logging

_logger = logging.getLogger("main")

DATA_SETS = ("IMNET", "IMAGEFOLDER", "CIFAR10", "CIFAR100", "CIFAR", "FLOWERS102", "CARS",
             "INAT18", "INAT", "INAT19", "SYNTHETIC")
RECIPE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
USAGE = "python main.py [--cfg FILE.yaml] [--model NAME] [options] [DATA_DIR]   (all options: --help)"


# ============================================================================ arguments

literal = families.literal


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad option is one line naming the problem and where to look (no usage dump)."""

    def error(self, message):
        raise UserError(f"{message} (see python {os.path.basename(sys.argv[0]) or 'main.py'} --help)")


def _bool_pair(group, on: str, off: str, dest: str, default, help_on: str, help_off: str = "") -> None:
    group.add_argument(on, action="store_true", dest=dest, help=help_on)
    group.add_argument(off, action="store_false", dest=dest, help=help_off or f"undo {on}")
    group.set_defaults(**{dest: default})


def _add_spelling_aliases(parser: argparse.ArgumentParser) -> None:
    """Every long option also under its other spelling ('--output-dir' and '--output_dir')."""
    for action in parser._actions:  # argparse has no public action list
        for option in list(action.option_strings):
            if not option.startswith("--"):
                continue
            for variant in (option[:2] + option[2:].replace("_", "-"), option[:2] + option[2:].replace("-", "_")):
                if variant not in parser._option_string_actions:
                    action.option_strings.append(variant)
                    parser._option_string_actions[variant] = action


def add_method_args(parser: argparse.ArgumentParser, unset_defaults: bool = False,
                    kwargs_only: bool = False) -> argparse.ArgumentParser:
    """The flags of every registered method family (one argument group each); shared with benchmark.py."""
    return families.add_family_args(parser, kwargs_only=kwargs_only, unset_defaults=unset_defaults)


def get_args_parser(add_help: bool = False) -> argparse.ArgumentParser:
    parser = OneLineParser("main.py", add_help=add_help, usage=USAGE,
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--cfg", default=None, metavar="FILE.yaml",
                        help="YAML file whose keys (option names, '-' or '_') become defaults; the command line wins")
    parser.add_argument("--defaults", choices=("deit", "timm"), default="deit",
                        help="deit: DeiT's main.py defaults; timm: timm train.py's defaults plus the recipe "
                             "configs/<model>.yaml when it exists (what ./distributed_train.sh uses)")
    parser.add_argument("--plugin", action="append", default=[], metavar="MODULE",
                        help="import MODULE first (a researcher's own method family); may be repeated")

    g = parser.add_argument_group("basics")
    g.add_argument("-b", "--batch-size", dest="batch_size", default=64, type=int, help="per-process batch size")
    g.add_argument("--epochs", default=300, type=int, help="training epochs")
    g.add_argument("--accum-iter", dest="accum_iter", default=1, type=int,
                   help="accumulate gradients over this many batches per optimizer step")
    g.add_argument("--bce-loss", dest="bce_loss", action="store_true", help="binary cross-entropy (DeiT-III)")
    g.add_argument("--unscale-lr", dest="unscale_lr", action="store_true",
                   help="do not scale --lr by batch_size * world_size * accum_iter / 512")

    g = parser.add_argument_group("model")
    g.add_argument("--model", default="deit_base_patch16_224", type=str, metavar="MODEL", help="registered model name")
    g.add_argument("--input-size", dest="input_size", default=224, type=int, help="image size in pixels")
    g.add_argument("--drop", type=float, default=0.0, metavar="PCT", help="dropout rate")
    g.add_argument("--drop-path", dest="drop_path", type=float, default=0.1, metavar="PCT", help="drop path rate")
    g.add_argument("--model-kwargs", dest="model_kwargs", type=literal("dict"), default=None,
                   help="extra constructor kwargs as a Python dict literal, e.g. \"{'depth': 2}\"")
    g.add_argument("--channels-last", dest="channels_last", action="store_true", help="channels-last memory format")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--pretrained", action="store_true",
                   help="start from timm's pretrained weights of the model (needs them in the local "
                        "Hugging Face / torch hub cache: nothing is downloaded here); or use --finetune FILE")
    g.add_argument("--target-gmacs", dest="target_gmacs", type=float, default=None, metavar="G",
                   help="choose the method's reduction flag given as 'auto' so the model has G GMACs")

    g = parser.add_argument_group("model EMA")
    _bool_pair(g, "--model-ema", "--no-model-ema", "model_ema", True, "keep an EMA of the weights")
    g.add_argument("--model-ema-decay", dest="model_ema_decay", type=float, default=0.99996, help="EMA decay")
    g.add_argument("--model-ema-force-cpu", dest="model_ema_force_cpu", action="store_true", default=False,
                   help="keep the EMA on the CPU")
    g.add_argument("--use-ema", "--eval-ema", dest="use_ema", action="store_true",
                   help="--eval: evaluate the checkpoint's EMA weights (model_ema) instead of the model weights")

    g = parser.add_argument_group("optimizer")
    g.add_argument("--opt", default="adamw", type=str, metavar="OPTIMIZER", help="timm optimizer name")
    g.add_argument("--opt-eps", dest="opt_eps", default=1e-8, type=float, metavar="EPSILON", help="optimizer epsilon")
    g.add_argument("--opt-betas", dest="opt_betas", default=None, type=float, nargs="+", metavar="BETA",
                   help="optimizer betas (default: the optimizer's)")
    g.add_argument("--clip-grad", dest="clip_grad", type=float, default=None, metavar="NORM",
                   help="clip the gradient norm (default: no clipping)")
    g.add_argument("--momentum", type=float, default=0.9, metavar="M", help="SGD momentum")
    g.add_argument("--weight-decay", dest="weight_decay", type=float, default=0.05, help="weight decay")
    g.add_argument("--decay-norm-and-bias", dest="decay_norm_and_bias", action="store_true",
                   help="weight decay on every parameter (RaftMLP recipe); default: none on 1-D params and no_weight_decay()")

    g = parser.add_argument_group("learning-rate schedule")
    g.add_argument("--sched", default="cosine", type=str, metavar="SCHEDULER", help="timm scheduler name")
    g.add_argument("--lr", type=float, nargs="+", default=[5e-4], metavar="LR",
                   help="peak lr before linear scaling; some families take several (their help says which)")
    g.add_argument("--lr-noise", dest="lr_noise", type=float, nargs="+", default=None, metavar="pct, pct",
                   help="lr noise on/off epoch percentages")
    g.add_argument("--lr-noise-pct", dest="lr_noise_pct", type=float, default=0.67, help="lr noise limit percent")
    g.add_argument("--lr-noise-std", dest="lr_noise_std", type=float, default=1.0, help="lr noise std-dev")
    g.add_argument("--warmup-lr", dest="warmup_lr", type=float, default=1e-6, help="lr at the start of warm-up")
    g.add_argument("--min-lr", dest="min_lr", type=float, default=1e-5, help="lower bound of cyclic schedules")
    g.add_argument("--decay-epochs", dest="decay_epochs", type=float, default=30, help="epochs between lr decays (step)")
    g.add_argument("--warmup-epochs", dest="warmup_epochs", type=int, default=5, help="lr warm-up epochs")
    g.add_argument("--cooldown-epochs", dest="cooldown_epochs", type=int, default=10,
                   help="epochs at min lr after a cyclic schedule")
    g.add_argument("--patience-epochs", dest="patience_epochs", type=int, default=10, help="plateau scheduler patience")
    g.add_argument("--decay-rate", "--dr", dest="decay_rate", type=float, default=0.1, help="lr decay rate")
    g.add_argument("--sched-step", dest="sched_step", choices=("epoch", "iter"), default="epoch",
                   help="epoch: scheduler.step(epoch) after each epoch (DeiT); iter: step_update per optimizer step (Swin)")
    g.add_argument("--warmup-prefix", dest="warmup_prefix", action="store_true",
                   help="the decay spans the epochs after warm-up (RaftMLP) instead of all --epochs (DeiT)")
    g.add_argument("--resume-lr-quirk", dest="resume_lr_quirk", action="store_true",
                   help="reproduce DeiT's extra scheduler.step(start_epoch) on resume (breaks exact continuation)")

    g = parser.add_argument_group("augmentation")
    g.add_argument("--color-jitter", dest="color_jitter", type=float, default=0.3, metavar="PCT", help="color jitter")
    g.add_argument("--aa", type=str, default="rand-m9-mstd0.5-inc1", metavar="NAME",
                   help="AutoAugment policy ('none' for off)")
    g.add_argument("--smoothing", type=float, default=0.1, help="label smoothing")
    g.add_argument("--train-interpolation", dest="train_interpolation", type=str, default="bicubic",
                   help="training resize interpolation")
    g.add_argument("--eval-interpolation", dest="eval_interpolation", type=str, default="bicubic",
                   help="evaluation resize interpolation")
    g.add_argument("--train-crop", dest="train_crop", choices=("rrc", "resize_random_crop"), default="rrc",
                   help="random-resized crop, or resize then random crop")
    _bool_pair(g, "--repeated-aug", "--no-repeated-aug", "repeated_aug", True,
               "repeated augmentation (RASampler, distributed runs only, as DeiT)")
    _bool_pair(g, "--train-mode", "--no-train-mode", "train_mode", True, "model.train() during training")
    g.add_argument("--ThreeAugment", action="store_true", help="DeiT-III 3-Augment")
    g.add_argument("--src", action="store_true", help="simple random crop (DeiT-III)")
    g.add_argument("--reprob", type=float, default=0.25, metavar="PCT", help="random erasing probability")
    g.add_argument("--remode", type=str, default="pixel", help="random erasing mode")
    g.add_argument("--recount", type=int, default=1, help="random erasing count")
    g.add_argument("--resplit", action="store_true", default=False, help="no random erasing on the first split")

    g = parser.add_argument_group("mixup / cutmix")
    g.add_argument("--mixup", type=float, default=0.8, help="mixup alpha (0: off)")
    g.add_argument("--cutmix", type=float, default=1.0, help="cutmix alpha (0: off)")
    g.add_argument("--cutmix-minmax", dest="cutmix_minmax", type=float, nargs="+", default=None,
                   help="cutmix min/max ratio (overrides alpha)")
    g.add_argument("--mixup-prob", dest="mixup_prob", type=float, default=1.0, help="probability of mixup or cutmix")
    g.add_argument("--mixup-switch-prob", dest="mixup_switch_prob", type=float, default=0.5,
                   help="probability of cutmix instead of mixup when both are on")
    g.add_argument("--mixup-mode", dest="mixup_mode", type=str, default="batch", help="batch, pair or elem")
    g.add_argument("--mix-mode", dest="mix_mode", choices=("timm", "sequential"), default="timm",
                   help="timm Mixup, or RaftMLP's sequential mixup then cutmix")

    g = parser.add_argument_group("distillation")
    g.add_argument("--teacher-model", dest="teacher_model", default="regnety_160", type=str, help="teacher model name")
    g.add_argument("--teacher-path", dest="teacher_path", type=str, default="", help="teacher checkpoint file")
    g.add_argument("--distillation-type", dest="distillation_type", default="none", choices=("none", "soft", "hard"),
                   help="distillation type")
    g.add_argument("--distillation-alpha", dest="distillation_alpha", default=0.5, type=float,
                   help="weight of the distillation loss")
    g.add_argument("--distillation-tau", dest="distillation_tau", default=1.0, type=float, help="soft distillation temperature")
    g.add_argument("--cosub", action="store_true", help="(DeiT-III) not implemented")

    g = parser.add_argument_group("fine-tuning and resuming")
    g.add_argument("--finetune", default="",
                   help="initialise from a checkpoint: everything but the classifier must fit (position embeddings "
                        "are resized); the classifier is dropped when the class count differs")
    g.add_argument("--finetune-partial", dest="finetune_partial", action="store_true",
                   help="with --finetune: load whatever fits and list the rest instead of stopping")
    g.add_argument("--attn-only", dest="attn_only", action="store_true", help="train only attention, head and pos_embed")
    g.add_argument("--resume", "--checkpoint", dest="resume", default="",
                   help="resume from (or with --eval: evaluate) a checkpoint; every key must fit")
    g.add_argument("--auto-resume", dest="auto_resume", action="store_true",
                   help="resume from output_dir/checkpoint.pth when it exists (also mid-epoch)")
    g.add_argument("--start_epoch", default=0, type=int, metavar="N", help="first epoch (when not resuming)")

    g = parser.add_argument_group("data")
    g.add_argument("data_dir", nargs="?", default=None, help="(timm style) same as --data-path")
    g.add_argument("--data-path", dest="data_path", default=None, type=str,
                   help="dataset root (DeiT's default was a site path; here none = SYNTHETIC)")
    g.add_argument("--data-set", dest="data_set", default=None, choices=DATA_SETS,
                   help="default: IMNET when a data path is given, else SYNTHETIC")
    g.add_argument("--download", action="store_true", help="let torchvision download CIFAR / Flowers / Cars")
    g.add_argument("--strict-data", dest="strict_data", action="store_true",
                   help="fail on the first unreadable or broken image instead of skipping it")
    g.add_argument("--synthetic-train-size", dest="synthetic_train_size", type=int, default=5000,
                   help="SYNTHETIC: training images")
    g.add_argument("--synthetic-val-size", dest="synthetic_val_size", type=int, default=1000,
                   help="SYNTHETIC: validation images")
    g.add_argument("--synthetic-classes", dest="synthetic_classes", type=int, default=10, help="SYNTHETIC: classes")
    g.add_argument("--inat-category", dest="inat_category", default="name",
                   choices=("kingdom", "phylum", "class", "order", "supercategory", "family", "genus", "name"),
                   help="iNaturalist label level")
    g.add_argument("--eval-crop-ratio", dest="eval_crop_ratio", default=0.875, type=float, help="evaluation center-crop ratio")
    g.add_argument("--num_workers", "--workers", "-j", dest="num_workers", default=10, type=int,
                   help="DataLoader workers per process (capped at the CPU cores available)")
    _bool_pair(g, "--pin-mem", "--no-pin-mem", "pin_mem", True, "pin CPU memory in the DataLoader")
    g.add_argument("--use-lmdb", dest="use_lmdb", action="store_true", help="(EViT flag) not supported")

    g = parser.add_argument_group("run")
    g.add_argument("--output_dir", "--output", dest="output_dir", default="",
                   help="where to save checkpoints and logs; empty = nothing saved (a warning says so)")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="device")
    g.add_argument("--seed", default=0, type=int, help="random seed (plus the rank)")
    g.add_argument("--eval", action="store_true", help="evaluation only")
    g.add_argument("--eval-every", dest="eval_every", type=int, default=1,
                   help="evaluate when epoch %% N == 0 and after the last epoch (EViT: 30)")
    g.add_argument("--dist-eval", dest="dist_eval", action="store_true", help="shard the evaluation (exact, no padding)")
    _bool_pair(g, "--amp", "--no-amp", "amp", None,
               "mixed precision: fp16 + GradScaler on CUDA, bf16 autocast on CPU (default: on for CUDA, "
               "off on CPU, as DeiT's CUDA-only autocast)", "full fp32")
    g.add_argument("--amp-dtype", dest="amp_dtype", choices=("auto", "float16", "bfloat16"), default="auto",
                   help="autocast dtype of --amp: auto = float16 with a GradScaler on CUDA, bfloat16 on CPU; "
                        "bfloat16 on CUDA trains without a GradScaler")
    g.add_argument("--bf16-weights", dest="bf16_weights", action="store_true",
                   help="--eval with the model cast to bf16 (token-selection scores stay fp32); faster than "
                        "--amp autocast on CPUs with bf16 matmuls")
    g.add_argument("--print-freq", dest="print_freq", type=int, default=10, help="progress line every N steps")
    g.add_argument("--tensorboard", action="store_true", help="write output_dir/tensorboard (tensorboardX)")
    g.add_argument("--checkpoint-hist", dest="checkpoint_hist", type=int, default=0,
                   help="also keep the last K epoch checkpoints checkpoint-EEEE.pth")
    g.add_argument("--deterministic", action="store_true", help="deterministic algorithms (bitwise-reproducible on CPU)")

    g = parser.add_argument_group("distributed")
    g.add_argument("--distributed", action="store_true", default=False, help="(set from the environment)")
    g.add_argument("--world_size", default=1, type=int, help="(set from the environment)")
    g.add_argument("--dist_url", default="env://", help="process-group init URL")
    g.add_argument("--dist-backend", dest="dist_backend", default="auto", choices=("auto", "nccl", "gloo"),
                   help="auto: nccl on CUDA, else gloo")
    g.add_argument("--local_rank", "--local-rank", dest="local_rank", default=0, type=int,
                   help="(torch.distributed.launch) ignored: LOCAL_RANK is read from the environment")

    g = parser.add_argument_group("reliability")
    g.add_argument("--save-every-iters", dest="save_every_iters", type=int, default=0,
                   help="also write checkpoint.pth every N optimizer steps inside an epoch (0: off)")
    g.add_argument("--skip-nonfinite", dest="skip_nonfinite", type=int, default=0,
                   help="skip up to K steps with a NaN/Inf loss in the whole run (default: stop at the first)")
    g.add_argument("--preempt-at-step", dest="preempt_at_step", type=int, default=0,
                   help="testing: act as if SIGUSR1 arrived after optimizer step N of the run")

    add_method_args(parser)
    _add_spelling_aliases(parser)
    return parser


def option_dests(parser: argparse.ArgumentParser) -> dict:
    """Accepted YAML keys (normalised to '_') -> dest. Dest names and store-type long option names."""
    keys = {}
    for action in parser._actions:  # argparse has no public action list
        if action.dest in ("help", "cfg") or action.dest is argparse.SUPPRESS:
            continue
        keys[action.dest.replace("-", "_")] = action.dest
        if isinstance(action, (argparse._StoreAction,)):
            for opt in action.option_strings:
                if opt.startswith("--"):
                    keys.setdefault(opt[2:].replace("-", "_"), action.dest)
    return keys


def _typed_yaml_value(action: argparse.Action, key, value, path: str):
    """A YAML value converted by the option's own type; a wrong type is a UserError naming key and file."""
    if action.type is None or value is None:
        return value
    try:
        if action.nargs in ("+", "*") or isinstance(action.nargs, int):
            values = value if isinstance(value, (list, tuple)) else [value]
            return [action.type(v) if isinstance(v, str) else v for v in values]
        if isinstance(value, str) or action.type in (int, float):
            converted = action.type(value)
            if action.type is int and isinstance(value, float) and value != int(value):
                raise ValueError(value)
            return converted
        return action.type(value) if callable(action.type) and getattr(action.type, "__name__", "") in (
            "int_list", "int_tuple", "dict") else value
    except (TypeError, ValueError, argparse.ArgumentTypeError) as err:
        kind = getattr(action.type, "__name__", "value")
        raise UserError(f"{path}: key {key!r} has value {value!r}, which is not a valid {kind} "
                        f"({str(err) or 'wrong type'})") from None


def load_cfg_defaults(path: str, parser: argparse.ArgumentParser) -> dict:
    """YAML keys -> {dest: value}; an unknown key is a UserError naming it and close matches."""
    if not os.path.isfile(path):
        raise UserError(f"--cfg file not found: {path}")
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except yaml.YAMLError as err:
        raise UserError(f"--cfg {path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UserError(f"--cfg {path} must be a mapping of option names to values")
    known = option_dests(parser)
    actions = {action.dest: action for action in parser._actions}
    defaults = {}
    for key, value in data.items():
        normalised = str(key).replace("-", "_")
        if normalised not in known:
            raise UserError(f"unknown key {key!r} in {path}; close matches: "
                            f"{close_matches(normalised, known)} (keys are main.py option names)")
        dest = known[normalised]
        defaults[dest] = _typed_yaml_value(actions[dest], key, value, path)
    return defaults


def recipe_files(defaults: str, model_name: str) -> list:
    """The YAML files `--defaults timm` applies: timm train.py's defaults, then the model's recipe."""
    if defaults != "timm":
        return []
    files = [os.path.join(RECIPE_DIR, "defaults_timm.yaml")]
    recipe = os.path.join(RECIPE_DIR, f"{model_name}.yaml")
    if model_name and os.path.isfile(recipe):
        files.append(recipe)
    return files


def _pretrained_cfg_sizes(model_name: str) -> dict:
    """timm train.py takes the input size and eval crop from the model's pretrained cfg."""
    import timm
    try:
        cfg = timm.models.get_pretrained_cfg(model_name)
    except (RuntimeError, KeyError):
        cfg = None
    sizes = {}
    if cfg is not None and getattr(cfg, "input_size", None):
        sizes["input_size"] = int(cfg.input_size[-1])
    if cfg is not None and getattr(cfg, "crop_pct", None):
        sizes["eval_crop_ratio"] = float(cfg.crop_pct)
    return sizes


def build_parser(argv=None) -> argparse.ArgumentParser:
    """The full parser with the defaults in force for this command line: parser defaults, then
    the model family's recipe, then `--defaults timm` files, then `--cfg` (the command line wins)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--cfg", default=None)
    pre.add_argument("--defaults", default="deit")
    pre.add_argument("--plugin", action="append", default=[])
    pre.add_argument("--model", default=None)
    known, _ = pre.parse_known_args(argv)
    try:
        families.import_plugins(known.plugin)
    except ModelConfigError as err:
        raise UserError(str(err)) from None
    import models  # noqa: F401  (registers the built-in families before the parser is built)

    parser = OneLineParser("main.py", parents=[get_args_parser()], usage=USAGE,
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    cfg_data = load_cfg_defaults(known.cfg, parser) if known.cfg else {}
    model_name = known.model or cfg_data.get("model") or parser.get_default("model")
    owner = families.family_of_model(model_name)
    if owner is not None and owner.recipe:
        parser.set_defaults(**owner.recipe)
    if known.defaults == "timm":
        parser.set_defaults(**_pretrained_cfg_sizes(model_name))
    for path in recipe_files(known.defaults, model_name):
        parser.set_defaults(**load_cfg_defaults(path, parser))
    if cfg_data:
        parser.set_defaults(**cfg_data)
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    """Full command-line parsing: recipes and --cfg YAML as defaults, then the command line, then checks."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    args.argv = argv
    finalize_args(args)
    return args


def _stray_value_hint(args) -> str:
    """' (... takes no value)' when the positional data dir is really the value of a preceding switch."""
    argv = getattr(args, "argv", None) or []
    if args.data_dir not in argv:
        return ""
    index = argv.index(args.data_dir)
    previous = argv[index - 1] if index > 0 else ""
    if previous.startswith("--"):
        return (f"; {args.data_dir!r} follows {previous}, which takes no value: drop {args.data_dir!r} "
                f"(or give the data with --data-path)")
    return ""


def finalize_args(args: argparse.Namespace) -> None:
    """Resolve aliases and defaults that depend on other flags; reject unsupported combinations."""
    if args.data_dir:
        if not os.path.exists(args.data_dir) and _stray_value_hint(args):
            raise UserError(f"data path {args.data_dir} does not exist{_stray_value_hint(args)}")
        if args.data_path and os.path.abspath(args.data_path) != os.path.abspath(args.data_dir):
            raise UserError(f"two data paths given ({args.data_dir} and --data-path {args.data_path}); pass one")
        args.data_path = args.data_dir
    if args.data_set is None:
        args.data_set = "IMNET" if args.data_path else "SYNTHETIC"
    if args.use_lmdb:
        raise UserError("LMDB is not supported, use an ImageFolder (--data-set IMNET or IMAGEFOLDER)")
    if args.cosub:
        raise UserError("--cosub (DeiT-III) is not implemented; drop the flag")
    if args.distillation_type != "none" and args.finetune and not args.eval:
        raise UserError("distillation together with --finetune is not supported (as in DeiT); drop one of them")
    if args.finetune and args.resume and not args.eval:
        _logger.info("--finetune and --resume given: the --resume checkpoint wins (as DeiT)")
    for name in ("batch_size", "epochs", "accum_iter", "eval_every", "input_size"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if mixing.mixup_active(args) and args.batch_size % 2 and not args.eval:
        raise UserError(f"mixup/cutmix needs an even --batch-size, got {args.batch_size}; change it or pass --mixup 0 --cutmix 0")
    if str(args.device).startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {args.device} but CUDA is not available; pass --device cpu")
    if args.bf16_weights and not args.eval:
        raise UserError("--bf16-weights is for evaluation (--eval); train with --amp")
    if args.bf16_weights and args.amp:
        raise UserError("--bf16-weights and --amp exclude each other: the model already runs in bf16; drop one")
    if args.use_ema and not args.eval:
        raise UserError("--use-ema selects the weights --eval evaluates; during training the EMA is evaluated "
                        "every epoch anyway (drop --use-ema or add --eval)")
    if args.amp is None:  # DeiT's torch.cuda.amp.autocast() is a no-op without CUDA: fp32 on CPU
        args.amp = str(args.device).startswith("cuda")
    args.lr_values = [float(v) for v in (args.lr if isinstance(args.lr, (list, tuple)) else [args.lr])]
    if not 1 <= len(args.lr_values) <= 3:
        raise UserError(f"--lr takes 1 to 3 values, got {len(args.lr_values)}")
    args.lr = args.lr_values[0]
    _check_reduction_flags(args)
    try:
        families.check_all_options(args.model, args)
    except ModelConfigError as err:
        raise UserError(str(err)) from None


def _check_reduction_flags(args) -> None:
    auto = [family for family in families.active_families(args.model, args)
            if family.reduction is not None and getattr(args, family.reduction.dest, None) == families.AUTO]
    if auto and args.target_gmacs is None:
        raise UserError(f"--{auto[0].reduction.dest.replace('_', '-')} auto needs --target-gmacs G")
    if args.target_gmacs is not None:
        if args.target_gmacs <= 0:
            raise UserError(f"--target-gmacs must be > 0, got {args.target_gmacs}")
        if not auto:
            reducible = [f"--{f.reduction.dest.replace('_', '-')}" for f in families.families() if f.reduction]
            raise UserError(f"--target-gmacs needs one reduction flag set to auto ({', '.join(reducible)} auto) "
                            f"that applies to --model {args.model}")
        if len(auto) > 1:
            raise UserError("--target-gmacs: set only one reduction flag to auto")


TRAINING_GROUPS = ("model EMA", "optimizer", "learning-rate schedule", "augmentation", "mixup / cutmix",
                   "distillation", "reliability")
TRAINING_DESTS = ("epochs", "accum_iter", "bce_loss", "unscale_lr", "finetune_partial", "attn_only", "auto_resume",
                  "start_epoch", "synthetic_train_size", "save_every_iters", "checkpoint_hist", "tensorboard",
                  "eval_every", "target_gmacs")


def training_only_dests() -> set:
    """Options that only matter when training (left out of an evaluation's log)."""
    parser = get_args_parser()
    dests = set(TRAINING_DESTS)
    for group in parser._action_groups:  # argparse has no public group list
        if group.title in TRAINING_GROUPS:
            dests |= {action.dest for action in group._group_actions}
    return dests - {"use_ema", "eval_interpolation", "eval_crop_ratio"}


def resolved_options(args: argparse.Namespace) -> dict:
    """The option values to write to args.yaml (loadable again with --cfg)."""
    skip = {"cfg", "data_dir", "local_rank", "distributed", "world_size", "plugin", "defaults"}
    parser_dests = set(option_dests(get_args_parser()).values())
    out = {}
    for key in sorted(parser_dests - skip):
        value = getattr(args, key, None)
        if key == "lr":
            value = args.lr_values if len(getattr(args, "lr_values", [])) > 1 else args.lr
        out[key] = list(value) if isinstance(value, tuple) else value
    return out


# ============================================================================ building blocks

def check_output_dir(path: str) -> None:
    """UserError unless `path` exists as a writable directory or could be created; writes nothing."""
    if not path:
        return
    path = os.path.abspath(path)
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise UserError(f"output dir {path} exists and is not a directory; choose another --output_dir")
        if not os.access(path, os.W_OK | os.X_OK):
            raise UserError(f"output dir {path} is not writable; choose another --output_dir")
        return
    parent = os.path.dirname(path)
    while parent and not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise UserError(f"cannot create output dir {path}: {parent} is not a directory; choose another --output_dir")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"cannot create output dir {path}: {parent} is not writable; choose another --output_dir")


def make_output_dir(path: str) -> None:
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, ".write_test")
        with open(probe, "w") as f:
            f.write("ok")
        os.unlink(probe)
    except OSError as err:
        raise UserError(f"cannot write to output dir {path}: {err.strerror}; choose another --output_dir") from None


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


def _checkpoint_error(err: ModelConfigError, state_dict: dict, args) -> UserError:
    """A checkpoint that does not fit: the factory's key list plus which model (and options) it fits."""
    from utils.model_match import suggest_model_for_keys
    hint = ""
    try:
        hint = suggest_model_for_keys(state_dict, args.model) or ""
    except Exception as suggestion_error:  # the hint is best effort; the key list is the error
        _logger.debug(f"no model suggestion: {suggestion_error}")
    return UserError(f"{err}{'; the weights fit --model ' + hint if hint else ''}")


def build_model(args, num_classes: int):
    """The model with its initial weights: --resume/--auto-resume are loaded later, strictly;
    --finetune and --pretrained go through timm's pretrained machinery here."""
    check_model_name(args.model)
    try:
        if args.pretrained:
            model = _pretrained(args, num_classes)
        elif args.finetune and not args.resume:
            checkpoint = load_checkpoint_file(args.finetune)
            load = "partial" if args.finetune_partial else "finetune"
            try:
                model = create(args, num_classes, checkpoint=checkpoint, load=load,
                               source=f"--finetune {args.finetune}")
            except ModelConfigError as err:
                if hasattr(err, "summary"):
                    raise _checkpoint_error(err, extract_state_dict(checkpoint), args) from None
                raise
            summary = model.load_summary
            _logger.info(f"finetune from {args.finetune}: {summary.line()}")
            if summary.dropped:
                _logger.info(f"finetune: dropped {', '.join(summary.dropped[:12])}"
                             f"{' ...' if len(summary.dropped) > 12 else ''}")
            if summary.missing:
                _logger.info(f"finetune: left at initialisation {', '.join(summary.missing[:12])}"
                             f"{' ...' if len(summary.missing) > 12 else ''}")
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


def check_runs_at_input_size(model, args, device) -> None:
    """One image through the model before any data is read, so a size the architecture cannot take
    fails at start-up, not after 'start training'."""
    size = args.input_size
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), preserved_rng():
            model(torch.zeros(1, 3, size, size, device=device))
    except (RuntimeError, ValueError, AssertionError) as err:
        text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"--model {args.model} cannot run on {size}x{size} images ({text}); "
                        f"pick another --input-size (the model's default is its pretrained size)") from None
    finally:
        model.train(was_training)


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


@contextlib.contextmanager
def preserved_rng():
    """Run code that may draw random numbers without moving the training RNG streams."""
    state = capture_rng_state()
    try:
        yield
    finally:
        restore_rng_state(state)


# ============================================================================ checkpoints

@dataclass
class TrainingParts:
    """What a checkpoint captures and restores."""
    model_without_ddp: torch.nn.Module
    optimizer: torch.optim.Optimizer | None = None
    lr_scheduler: object = None
    loss_scaler: object = None
    model_ema: object = None
    run_state: RunState | None = None
    hooks: object = None


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
                     max_accuracy: float, rng_states: list) -> dict:
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
        "max_accuracy": float(max_accuracy),
        "run_state": parts.run_state.state_dict() if parts.run_state is not None else {},
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
                             epoch_complete: bool, max_accuracy: float) -> bool:
    """Collective: every rank calls it (RNG states are gathered); rank 0 writes."""
    rng_states = gather_rng_states()
    if not dist_utils.is_main_process():
        return True
    state = checkpoint_state(args, parts, epoch, epoch_step, epoch_complete, max_accuracy, rng_states)
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


@dataclass
class ResumePoint:
    start_epoch: int = 0
    start_step: int = 0
    max_accuracy: float = 0.0
    rng_state: dict | None = None
    path: str = ""


def _load_latest_checkpoint(output_dir: str):
    """(checkpoint, path) for --auto-resume: checkpoint.pth, else the newest readable checkpoint-EEEE.pth.

    (None, "") when the directory holds none (a fresh start). If checkpoint.pth exists but
    cannot be read and no epoch copy can either, its UserError is raised.
    """
    main_path = os.path.join(output_dir, "checkpoint.pth")
    history = sorted(glob.glob(os.path.join(output_dir, "checkpoint-[0-9][0-9][0-9][0-9]*.pth")), reverse=True)
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


def resume_if_possible(args, parts: TrainingParts) -> ResumePoint:
    """--resume / --auto-resume: restore model (strict), and unless --eval the full training state."""
    point = ResumePoint(start_epoch=args.start_epoch)
    checkpoint, path = None, args.resume
    if args.auto_resume and args.output_dir:
        checkpoint, auto_path = _load_latest_checkpoint(args.output_dir)
        path = auto_path or path
    if not path:
        return point
    if checkpoint is None:
        checkpoint = load_checkpoint_file(path)
    use_ema = bool(getattr(args, "use_ema", False))
    if use_ema and not isinstance(checkpoint, dict) or use_ema and checkpoint.get("model_ema") is None:
        raise UserError(f"--use-ema: {path} holds no EMA weights (no 'model_ema' entry); drop --use-ema")
    state_dict = extract_state_dict(checkpoint["model_ema"] if use_ema else checkpoint)
    from models.factory import load_weights
    try:
        load_weights(parts.model_without_ddp, state_dict, load="strict", model_name=args.model,
                     source=f"checkpoint {path}")
    except ModelConfigError as err:
        raise _checkpoint_error(err, state_dict, args) from None
    point.path = path
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
    if parts.run_state is not None and checkpoint.get("run_state"):
        parts.run_state.load_state_dict(checkpoint["run_state"])
    epoch = int(checkpoint["epoch"])
    if checkpoint.get("epoch_complete", True):
        point.start_epoch, point.start_step = epoch + 1, 0
    else:
        point.start_epoch, point.start_step = epoch, int(checkpoint.get("epoch_step", 0))
    point.max_accuracy = float(checkpoint.get("max_accuracy", 0.0) or 0.0)
    rng = checkpoint.get("rng")
    rank = dist_utils.get_rank()
    if isinstance(rng, list) and len(rng) == dist_utils.get_world_size():
        point.rng_state = rng[rank]
    elif rng:
        _logger.warning("checkpoint RNG states are for another world size: random streams are re-seeded")
    if args.resume_lr_quirk and parts.lr_scheduler is not None:
        parts.lr_scheduler.step(point.start_epoch)
    _logger.info(f"resuming at epoch {point.start_epoch}" + (f", step {point.start_step}" if point.start_step else ""))
    return point


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

    run = build_run(args, device, world_size, rank)

    if args.output_dir and dist_utils.is_main_process():
        make_output_dir(args.output_dir)
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
        _logger.info(f"evaluating the {weights} weights of {run.resume.path or args.finetune or 'the initialised model'}"
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
    """Everything built before the first epoch."""
    model: torch.nn.Module
    model_without_ddp: torch.nn.Module
    parts: TrainingParts
    train_loader: object
    sampler_train: object
    val_loader: object
    dataset_val: object
    mixup_fn: object
    criterion: object
    n_parameters: int
    resume: ResumePoint
    set_training_mode: bool


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
    resolve_target_gmacs(args, nb_classes)
    _logger.info(f"creating model {args.model}")
    model = build_model(args, nb_classes)
    check_runs_at_input_size(model, args, device)
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
    resume = resume_if_possible(args, parts)
    if args.eval:
        hooks.prepare_eval(model_without_ddp)
        if args.bf16_weights:
            cast_for_inference(model_without_ddp, torch.bfloat16)
    set_training_mode = args.train_mode
    if args.finetune and args.train_mode and hooks.train_mode_when_finetuning is False:
        set_training_mode = False
        _logger.info("fine-tuning with model.train(False) (dropout and drop-path off), as the official code of "
                     f"{', '.join(n for n, h in zip(hooks.names, hooks.hooks) if h.train_mode_when_finetuning is False)} does")
    return Run(model, model_without_ddp, parts, train_loader, sampler_train, val_loader, dataset_val,
               mixup_fn, criterion, n_parameters, resume, set_training_mode)


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
    if log_path and not run.resume.path and os.path.exists(log_path) and dist_utils.is_main_process():
        _logger.warning(f"{log_path} exists from an earlier run: this new run appends to it "
                        f"(pass --auto-resume to continue that run instead)")
    max_accuracy = run.resume.max_accuracy
    last_stats: dict = {}
    if run.resume.rng_state is not None:
        restore_rng_state(run.resume.rng_state)

    _logger.info(f"start training for {args.epochs} epochs")
    start_time = time.time()
    first_epoch = run.resume.start_epoch
    for epoch in range(run.resume.start_epoch, args.epochs):
        start_step = run.resume.start_step if epoch == run.resume.start_epoch else 0
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
                save_training_checkpoint(args, parts, ckpt_path, epoch, next_step, False, max_accuracy)
                _logger.info(f"mid-epoch checkpoint: epoch {epoch}, step {next_step} -> {ckpt_path}")

        try:
            train_stats = train_one_epoch(
                run.model, run.criterion, run.train_loader, parts.optimizer, device, epoch, parts.loss_scaler,
                args.clip_grad, parts.model_ema, run.mixup_fn, hooks, args,
                model_without_ddp=model_without_ddp, lr_scheduler=parts.lr_scheduler, run_state=parts.run_state,
                start_step=start_step, stop_request=stop_request, save_mid_epoch=save_mid_epoch,
                set_training_mode=run.set_training_mode)
        except TrainingInterrupted as stop:
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
            if test_stats["acc1"] > max_accuracy and best_allowed:
                max_accuracy = test_stats["acc1"]
                if output_dir:
                    save_training_checkpoint(args, parts, os.path.join(output_dir, "best_checkpoint.pth"),
                                             epoch, 0, True, max_accuracy)
            why = "" if best_allowed else (f" (no best checkpoint yet: the model is not in its final form "
                                           f"({_format_state(method_state)}); best is tracked once it is)")
            _logger.info(f"Max accuracy: {max_accuracy:.2f}%{why}")
        if ckpt_path:
            if save_training_checkpoint(args, parts, ckpt_path, epoch, 0, True, max_accuracy) \
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
                     f"(best {max_accuracy:.2f}%)")
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
    except KeyboardInterrupt:
        _logger.error("interrupted by Ctrl-C before a checkpoint could be written; checkpoints already on disk "
                      "are intact (Ctrl-C during training saves and exits cleanly; pressing it twice aborts)")
        return 130
    finally:
        dist_utils.destroy_process_group()


if __name__ == "__main__":
    sys.exit(cli())
