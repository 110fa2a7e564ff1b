"""Training and evaluation entry point: DeiT's recipe (Touvron et al., ICML 2021) on timm 1.0.

Every flag and default of DeiT's main.py is kept (see shared/methods/deit_recipe.md),
plus the flags of the official EViT, attention-shrink (lambda_vit), ToMe and LTM
launch lines, timm-style aliases, `--cfg FILE.yaml`, and reliability features:
atomic checkpoints, `--auto-resume` (also mid-epoch), Slurm preemption handling,
`--save-every-iters`, `--skip-nonfinite`, and bitwise-reproducible resumption.

    python main.py --model deit_small_patch16_224 --data-path /imagenet --output_dir out
    torchrun --nproc_per_node=8 main.py --model ... --dist-eval

Deliberate deviations from DeiT (documented in the flag help): no site-specific
default --data-path (without one the SYNTHETIC data set is used); `--resume`
continues with the learning rate the interrupted run would have used (DeiT steps
the scheduler once more; `--resume-lr-quirk` reproduces that); the distributed
evaluation counts every sample exactly once; checkpoints store `args` as a dict.
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import datetime
import glob
import importlib
import io
import json
import logging
import math
import os
import random
import re
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.backends.cudnn as cudnn
import yaml

import datasets
import mixing
from engine import NonFiniteLossError, RunState, TrainingInterrupted, evaluate, train_one_epoch
from losses import build_criterion, build_teacher
from samplers import ExactDistributedEvalSampler, PerSampleSeeded, RASampler, ShardedShuffleSampler, mix_seed
from utils import distributed as dist_utils
from utils.checkpoint import (capture_rng_state, close_matches, extract_state_dict, keep_epoch_copy,
                              load_checkpoint_file, load_model_weights, restore_rng_state, save_checkpoint)
from utils.errors import UserError
from utils.logger import append_json_line, attach_log_file, make_tensorboard_writer, setup_logging

_logger = logging.getLogger("main")

DATA_SETS = ("IMNET", "IMAGEFOLDER", "CIFAR10", "CIFAR100", "CIFAR", "FLOWERS102", "CARS",
             "INAT18", "INAT", "INAT19", "SYNTHETIC")
HEAD_KEYS = ("head.weight", "head.bias", "head_dist.weight", "head_dist.bias", "head_cls.weight", "head_cls.bias",
             "classifier.weight", "classifier.bias")
EVIT_MODULE = "models.evit"


# ============================================================================ arguments

def literal(kind: str):
    """argparse type: a Python literal parsed with ast.literal_eval (never eval), checked for `kind`.

    kind: 'int_list' -> list of ints, 'int_tuple' -> tuple of ints, 'dict' -> dict.
    """
    def parse(text):
        if isinstance(text, str):
            try:
                value = ast.literal_eval(text.strip())
            except (ValueError, SyntaxError):
                raise argparse.ArgumentTypeError(f"{text!r} is not a Python literal (expected {_KIND_HELP[kind]})")
        else:
            value = text
        return _check_literal(value, kind, text)
    parse.__name__ = kind
    return parse


_KIND_HELP = {"int_list": "a list such as [0,2,4]", "int_tuple": "a tuple such as (3, 6, 9)",
              "dict": "a dict such as \"{'depth': 2}\""}


def _check_literal(value, kind: str, text):
    if kind == "dict":
        if not isinstance(value, dict):
            raise argparse.ArgumentTypeError(f"{text!r} is not {_KIND_HELP[kind]}")
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise argparse.ArgumentTypeError(f"{text!r} is not {_KIND_HELP[kind]} of integers")
    return list(value) if kind == "int_list" else tuple(value)


def _bool_pair(group, on: str, off: str, dest: str, default: bool, help_on: str, help_off: str = "") -> None:
    group.add_argument(on, action="store_true", dest=dest, help=help_on)
    group.add_argument(off, action="store_false", dest=dest, help=help_off or f"undo {on}")
    group.set_defaults(**{dest: default})


def add_method_args(parser: argparse.ArgumentParser, unset_defaults: bool = False) -> argparse.ArgumentParser:
    """Flags that shape the model: constructor kwargs (via the family's CLI_KWARGS) and the ToMe patch.

    Shared with benchmark.py. With `unset_defaults` every default is None, so a caller can
    tell a given flag from a default one.
    """
    def default(value):
        return None if unset_defaults else value

    g = parser.add_argument_group("method options (model kwargs and ToMe; also in benchmark.py)")
    g.add_argument("--base_keep_rate", "--base-keep-rate", dest="base_keep_rate", type=float, default=None,
                   help="EViT keep rate at the drop locations")
    g.add_argument("--drop_loc", "--drop-loc", dest="drop_loc", type=literal("int_tuple"), default=None,
                   help='EViT drop locations, e.g. "(3, 6, 9)"')
    g.add_argument("--fuse_token", "--fuse-token", dest="fuse_token", action="store_true", default=None,
                   help="EViT: fuse the dropped tokens into one")
    g.add_argument("--prune_layer", "--prune-layer", dest="prune_layer", type=literal("int_list"), default=None,
                   help='attention shrink: blocks being diluted, e.g. "[0,2,4,6]"')
    g.add_argument("--done_layer", "--done-layer", dest="done_layer", type=literal("int_list"), default=None,
                   help='attention shrink: blocks without attention, e.g. "[]"')
    g.add_argument("--compression-ratio", "--compression_ratio", dest="compression_ratio", type=float,
                   default=None, help="LTM: fraction of tokens each LTM block's FFN processes")
    g.add_argument("--tome-r", "--tome_r", dest="tome_r", type=int, default=None,
                   help="ToMe: patch the model, merging r tokens per block")
    g.add_argument("--tome-start-idx", "--tome_start_idx", dest="tome_start_idx", type=int, default=default(0),
                   help="ToMe: attention blocks left unpatched at the start")
    g.add_argument("--no-tome-prop-attn", dest="no_tome_prop_attn", action="store_true", default=default(False),
                   help="ToMe without proportional attention")
    return parser


def get_args_parser(add_help: bool = False) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("DeiT-style training and evaluation", add_help=add_help)
    parser.add_argument("--cfg", default=None, metavar="FILE.yaml",
                        help="YAML file whose keys (option names, '-' or '_') become defaults; the command line wins")

    g = parser.add_argument_group("basics")
    g.add_argument("-b", "--batch-size", dest="batch_size", default=64, type=int, help="per-process batch size")
    g.add_argument("--epochs", default=300, type=int)
    g.add_argument("--accum-iter", dest="accum_iter", default=1, type=int,
                   help="accumulate gradients over this many batches per optimizer step")
    g.add_argument("--bce-loss", dest="bce_loss", action="store_true")
    g.add_argument("--unscale-lr", dest="unscale_lr", action="store_true",
                   help="do not scale --lr by batch_size * world_size * accum_iter / 512")

    g = parser.add_argument_group("model")
    g.add_argument("--model", default="deit_base_patch16_224", type=str, metavar="MODEL")
    g.add_argument("--input-size", dest="input_size", default=224, type=int, help="images input size")
    g.add_argument("--drop", type=float, default=0.0, metavar="PCT", help="dropout rate")
    g.add_argument("--drop-path", dest="drop_path", type=float, default=0.1, metavar="PCT", help="drop path rate")
    g.add_argument("--model-kwargs", dest="model_kwargs", type=literal("dict"), default=None,
                   help="extra constructor kwargs as a Python dict literal, e.g. \"{'depth': 2}\"")
    g.add_argument("--channels-last", dest="channels_last", action="store_true")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--pretrained", action="store_true",
                   help="(lambda_vit flag) not supported: nothing is downloaded, use --finetune FILE")

    g = parser.add_argument_group("model EMA")
    _bool_pair(g, "--model-ema", "--no-model-ema", "model_ema", True, "keep an EMA of the weights")
    g.add_argument("--model-ema-decay", dest="model_ema_decay", type=float, default=0.99996)
    g.add_argument("--model-ema-force-cpu", dest="model_ema_force_cpu", action="store_true", default=False)

    g = parser.add_argument_group("optimizer")
    g.add_argument("--opt", default="adamw", type=str, metavar="OPTIMIZER")
    g.add_argument("--opt-eps", dest="opt_eps", default=1e-8, type=float, metavar="EPSILON")
    g.add_argument("--opt-betas", dest="opt_betas", default=None, type=float, nargs="+", metavar="BETA")
    g.add_argument("--clip-grad", dest="clip_grad", type=float, default=None, metavar="NORM")
    g.add_argument("--momentum", type=float, default=0.9, metavar="M")
    g.add_argument("--weight-decay", dest="weight_decay", type=float, default=0.05)
    g.add_argument("--decay-norm-and-bias", dest="decay_norm_and_bias", action="store_true",
                   help="weight decay on every parameter (RaftMLP recipe); default: none on 1-D params and no_weight_decay()")

    g = parser.add_argument_group("learning-rate schedule")
    g.add_argument("--sched", default="cosine", type=str, metavar="SCHEDULER")
    g.add_argument("--lr", type=float, default=5e-4, metavar="LR", help="peak lr before linear scaling")
    g.add_argument("--lr-noise", dest="lr_noise", type=float, nargs="+", default=None, metavar="pct, pct")
    g.add_argument("--lr-noise-pct", dest="lr_noise_pct", type=float, default=0.67)
    g.add_argument("--lr-noise-std", dest="lr_noise_std", type=float, default=1.0)
    g.add_argument("--warmup-lr", dest="warmup_lr", type=float, default=1e-6)
    g.add_argument("--min-lr", dest="min_lr", type=float, default=1e-5)
    g.add_argument("--decay-epochs", dest="decay_epochs", type=float, default=30)
    g.add_argument("--warmup-epochs", dest="warmup_epochs", type=int, default=5)
    g.add_argument("--cooldown-epochs", dest="cooldown_epochs", type=int, default=10)
    g.add_argument("--patience-epochs", dest="patience_epochs", type=int, default=10)
    g.add_argument("--decay-rate", "--dr", dest="decay_rate", type=float, default=0.1)
    g.add_argument("--sched-step", dest="sched_step", choices=("epoch", "iter"), default="epoch",
                   help="epoch: scheduler.step(epoch) after each epoch (DeiT); iter: step_update per optimizer step (Swin)")
    g.add_argument("--warmup-prefix", dest="warmup_prefix", action="store_true",
                   help="the decay spans the epochs after warm-up (RaftMLP) instead of all --epochs (DeiT)")
    g.add_argument("--resume-lr-quirk", dest="resume_lr_quirk", action="store_true",
                   help="reproduce DeiT's extra scheduler.step(start_epoch) on resume (breaks exact continuation)")

    g = parser.add_argument_group("augmentation")
    g.add_argument("--color-jitter", dest="color_jitter", type=float, default=0.3, metavar="PCT")
    g.add_argument("--aa", type=str, default="rand-m9-mstd0.5-inc1", metavar="NAME")
    g.add_argument("--smoothing", type=float, default=0.1)
    g.add_argument("--train-interpolation", dest="train_interpolation", type=str, default="bicubic")
    g.add_argument("--eval-interpolation", dest="eval_interpolation", type=str, default="bicubic")
    g.add_argument("--train-crop", dest="train_crop", choices=("rrc", "resize_random_crop"), default="rrc")
    _bool_pair(g, "--repeated-aug", "--no-repeated-aug", "repeated_aug", True,
               "repeated augmentation (RASampler, distributed runs only, as DeiT)")
    _bool_pair(g, "--train-mode", "--no-train-mode", "train_mode", True, "model.train() during training")
    g.add_argument("--ThreeAugment", action="store_true")
    g.add_argument("--src", action="store_true", help="simple random crop (DeiT-III)")
    g.add_argument("--reprob", type=float, default=0.25, metavar="PCT")
    g.add_argument("--remode", type=str, default="pixel")
    g.add_argument("--recount", type=int, default=1)
    g.add_argument("--resplit", action="store_true", default=False)

    g = parser.add_argument_group("mixup / cutmix")
    g.add_argument("--mixup", type=float, default=0.8)
    g.add_argument("--cutmix", type=float, default=1.0)
    g.add_argument("--cutmix-minmax", dest="cutmix_minmax", type=float, nargs="+", default=None)
    g.add_argument("--mixup-prob", dest="mixup_prob", type=float, default=1.0)
    g.add_argument("--mixup-switch-prob", dest="mixup_switch_prob", type=float, default=0.5)
    g.add_argument("--mixup-mode", dest="mixup_mode", type=str, default="batch")
    g.add_argument("--mix-mode", dest="mix_mode", choices=("timm", "sequential"), default="timm",
                   help="timm Mixup, or RaftMLP's sequential mixup then cutmix")

    g = parser.add_argument_group("distillation")
    g.add_argument("--teacher-model", dest="teacher_model", default="regnety_160", type=str)
    g.add_argument("--teacher-path", dest="teacher_path", type=str, default="")
    g.add_argument("--distillation-type", dest="distillation_type", default="none", choices=("none", "soft", "hard"))
    g.add_argument("--distillation-alpha", dest="distillation_alpha", default=0.5, type=float)
    g.add_argument("--distillation-tau", dest="distillation_tau", default=1.0, type=float)
    g.add_argument("--cosub", action="store_true", help="(DeiT-III) not implemented")

    g = parser.add_argument_group("fine-tuning and resuming")
    g.add_argument("--finetune", default="", help="initialise from a checkpoint (head and pos-embed adapted)")
    g.add_argument("--attn-only", dest="attn_only", action="store_true", help="train only attention, head and pos_embed")
    g.add_argument("--resume", default="", help="resume from a checkpoint")
    g.add_argument("--auto-resume", dest="auto_resume", action="store_true",
                   help="resume from output_dir/checkpoint.pth when it exists (also mid-epoch)")
    g.add_argument("--start_epoch", default=0, type=int, metavar="N")

    g = parser.add_argument_group("data")
    g.add_argument("data_dir", nargs="?", default=None, help="(timm style) same as --data-path")
    g.add_argument("--data-path", dest="data_path", default=None, type=str,
                   help="dataset root (DeiT's default was a site path; here none = SYNTHETIC)")
    g.add_argument("--data-set", dest="data_set", default=None, choices=DATA_SETS,
                   help="default: IMNET when a data path is given, else SYNTHETIC")
    g.add_argument("--download", action="store_true", help="let torchvision download CIFAR / Flowers / Cars")
    g.add_argument("--strict-data", dest="strict_data", action="store_true",
                   help="fail on the first unreadable or broken image instead of skipping it")
    g.add_argument("--synthetic-train-size", dest="synthetic_train_size", type=int, default=5000)
    g.add_argument("--synthetic-val-size", dest="synthetic_val_size", type=int, default=1000)
    g.add_argument("--synthetic-classes", dest="synthetic_classes", type=int, default=10)
    g.add_argument("--inat-category", dest="inat_category", default="name",
                   choices=("kingdom", "phylum", "class", "order", "supercategory", "family", "genus", "name"))
    g.add_argument("--eval-crop-ratio", dest="eval_crop_ratio", default=0.875, type=float)
    g.add_argument("--num_workers", "--workers", "-j", dest="num_workers", default=10, type=int)
    _bool_pair(g, "--pin-mem", "--no-pin-mem", "pin_mem", True, "pin CPU memory in the DataLoader")
    g.add_argument("--use-lmdb", dest="use_lmdb", action="store_true", help="(EViT flag) not supported")

    g = parser.add_argument_group("run")
    g.add_argument("--output_dir", "--output", dest="output_dir", default="", help="where to save; empty = nothing saved")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    g.add_argument("--seed", default=0, type=int)
    g.add_argument("--eval", action="store_true", help="evaluation only")
    g.add_argument("--eval-every", dest="eval_every", type=int, default=1,
                   help="evaluate when epoch %% N == 0 and after the last epoch (EViT: 30)")
    g.add_argument("--dist-eval", dest="dist_eval", action="store_true", help="shard the evaluation (exact, no padding)")
    _bool_pair(g, "--amp", "--no-amp", "amp", True, "autocast (fp16 + GradScaler on CUDA, bf16 on CPU)")
    g.add_argument("--print-freq", dest="print_freq", type=int, default=10)
    g.add_argument("--tensorboard", action="store_true", help="write output_dir/tensorboard (tensorboardX)")
    g.add_argument("--checkpoint-hist", dest="checkpoint_hist", type=int, default=0,
                   help="also keep the last K epoch checkpoints checkpoint-EEEE.pth")
    g.add_argument("--deterministic", action="store_true", help="deterministic algorithms (bitwise-reproducible on CPU)")

    g = parser.add_argument_group("distributed")
    g.add_argument("--distributed", action="store_true", default=False, help="(set from the environment)")
    g.add_argument("--world_size", default=1, type=int)
    g.add_argument("--dist_url", default="env://")
    g.add_argument("--dist-backend", dest="dist_backend", default="auto", choices=("auto", "nccl", "gloo"))
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
    g = parser.add_argument_group("EViT training and tools")
    g.add_argument("--shrink_start_epoch", type=int, default=10)
    g.add_argument("--shrink_epochs", type=int, default=0)
    g.add_argument("--test_speed", action="store_true")
    g.add_argument("--only_test_speed", action="store_true")
    g.add_argument("--visualize_mask", action="store_true")
    g.add_argument("--n_visualization", type=int, default=128)

    g = parser.add_argument_group("attention shrink training")
    g.add_argument("--frozen_stages", type=int, default=None)
    g.add_argument("--lambda-decay-epochs", dest="lambda_decay_epochs", type=int, default=299,
                   help="lambda = max(0, 1 - epoch / N) (official hard-coded 299)")

    g = parser.add_argument_group("LTM training")
    g.add_argument("--ib-weight", dest="ib_weight", type=float, default=0.1)
    g.add_argument("--ib-warmup-ratio", dest="ib_warmup_ratio", type=float, default=0.3)
    g.add_argument("--ib-input-clusters", dest="ib_input_clusters", choices=("none", "kmeans"), default="none")
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
    defaults = {}
    for key, value in data.items():
        normalised = str(key).replace("-", "_")
        if normalised not in known:
            raise UserError(f"unknown key {key!r} in {path}; close matches: "
                            f"{close_matches(normalised, known)} (keys are main.py option names)")
        defaults[known[normalised]] = value
    return defaults


def parse_args(argv=None) -> argparse.Namespace:
    """Full command-line parsing: --cfg YAML as defaults, then the command line, then checks."""
    parser = argparse.ArgumentParser("DeiT-style training and evaluation", parents=[get_args_parser()])
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--cfg", default=None)
    known, _ = pre.parse_known_args(argv)
    if known.cfg:
        parser.set_defaults(**load_cfg_defaults(known.cfg, parser))
    args = parser.parse_args(argv)
    finalize_args(args)
    return args


def finalize_args(args: argparse.Namespace) -> None:
    """Resolve aliases and defaults that depend on other flags; reject unsupported combinations."""
    for name, kind in (("drop_loc", "int_tuple"), ("prune_layer", "int_list"), ("done_layer", "int_list"),
                       ("model_kwargs", "dict")):
        value = getattr(args, name, None)
        if value is not None:
            try:
                setattr(args, name, literal(kind)(value))
            except argparse.ArgumentTypeError as err:
                raise UserError(f"--{name}: {err}") from None
    if args.data_dir:
        if args.data_path and os.path.abspath(args.data_path) != os.path.abspath(args.data_dir):
            raise UserError(f"two data paths given ({args.data_dir} and --data-path {args.data_path}); pass one")
        args.data_path = args.data_dir
    if args.data_set is None:
        args.data_set = "IMNET" if args.data_path else "SYNTHETIC"
    if args.use_lmdb:
        raise UserError("LMDB is not supported, use an ImageFolder (--data-set IMNET or IMAGEFOLDER)")
    if args.pretrained:
        raise UserError("--pretrained is not supported: nothing is downloaded; pass a local checkpoint with --finetune FILE")
    if args.cosub:
        raise UserError("--cosub (DeiT-III) is not implemented; drop the flag")
    if args.distillation_type != "none" and args.finetune and not args.eval:
        raise UserError("distillation together with --finetune is not supported (as in DeiT); drop one of them")
    for name in ("batch_size", "epochs", "accum_iter", "eval_every", "input_size"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if mixing.mixup_active(args) and args.batch_size % 2 and not args.eval:
        raise UserError(f"mixup/cutmix needs an even --batch-size, got {args.batch_size}; change it or pass --mixup 0 --cutmix 0")
    if args.tome_r is not None and args.tome_r < 0:
        raise UserError(f"--tome-r must be >= 0, got {args.tome_r}")
    if str(args.device).startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {args.device} but CUDA is not available; pass --device cpu")


def resolved_options(args: argparse.Namespace) -> dict:
    """The option values to write to args.yaml (loadable again with --cfg)."""
    skip = {"cfg", "data_dir", "local_rank", "distributed", "world_size"}
    parser_dests = set(option_dests(get_args_parser()).values())
    out = {}
    for key in sorted(parser_dests - skip):
        value = getattr(args, key, None)
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


def family_module(model_name: str):
    """The module that registered `model_name` in timm's registry (holds CLI_KWARGS, training_hooks)."""
    import timm
    return importlib.import_module(timm.models.model_entrypoint(model_name).__module__)


# Method flags that become constructor kwargs of the family that declares them in CLI_KWARGS.
METHOD_KWARG_FLAGS = ("base_keep_rate", "drop_loc", "fuse_token", "prune_layer", "done_layer", "frozen_stages",
                      "compression_ratio")


def model_kwargs_from_args(args, module) -> dict:
    """The family's CLI_KWARGS that are set (not None) on the command line; warn about the others."""
    accepted = tuple(getattr(module, "CLI_KWARGS", ()))
    ignored = [name for name in METHOD_KWARG_FLAGS if name not in accepted and getattr(args, name, None) is not None]
    if ignored:
        _logger.warning(f"--{', --'.join(ignored)} ha{'s' if len(ignored) == 1 else 've'} no effect on --model "
                        f"{args.model} ({module.__name__} takes {', '.join(accepted) or 'no method options'})")
    return {name: getattr(args, name) for name in accepted if getattr(args, name, None) is not None}


def check_model_name(name: str) -> None:
    import timm

    import models  # noqa: F401  (registers the project's model families)

    if not timm.is_model(name):
        raise UserError(f"unknown --model {name!r}; close matches: {close_matches(name, timm.list_models())}")


def default_input_size(model_name: str) -> int:
    import timm
    cfg = timm.models.get_pretrained_cfg(model_name)
    size = getattr(cfg, "input_size", None) if cfg is not None else None
    return int(size[-1]) if size else 224


def build_model(args, num_classes: int):
    """timm.create_model with num_classes, drop rates, img_size, --model-kwargs and the family's CLI kwargs."""
    import timm

    check_model_name(args.model)
    module = family_module(args.model)
    kwargs = dict(num_classes=num_classes, drop_rate=args.drop, drop_path_rate=args.drop_path)
    kwargs.update(model_kwargs_from_args(args, module))
    extra = dict(args.model_kwargs or {})
    kwargs.update(extra)
    if "img_size" not in extra and args.input_size != default_input_size(args.model):
        kwargs["img_size"] = args.input_size
    # Options main.py adds on its own; a model whose constructor lacks one is built without it.
    optional = {"img_size", "drop_rate", "drop_path_rate"} - set(extra)
    while True:
        try:
            return timm.create_model(args.model, pretrained=False, **kwargs)
        except TypeError as err:
            rejected = re.search(r"unexpected keyword argument '(\w+)'", str(err))
            name = rejected.group(1) if rejected else None
            if name not in optional or name not in kwargs:
                raise UserError(f"--model {args.model} rejected its arguments ({err}); "
                                f"check --model-kwargs and the method flags") from None
            value = kwargs.pop(name)
            optional.discard(name)
            log = _logger.warning if name != "img_size" and value else _logger.info
            log(f"{args.model} takes no {name}; building it without ({name}={value} not applied)")


def is_evit_model(model_name: str) -> bool:
    try:
        return family_module(model_name).__name__ == EVIT_MODULE
    except (RuntimeError, KeyError, ImportError):
        return False


def resize_pos_embed(pos_embed_checkpoint: torch.Tensor, model) -> torch.Tensor:
    """DeiT's pos-embed adaptation: keep the model's leading (class/dist) tokens, bicubic-resize the grid.

    Done even at equal size (identity). Checkpoint and model may have different numbers
    of leading tokens (distilled -> non-distilled): the grid is the largest square that
    fits, leading tokens are taken from the checkpoint as far as it has them.
    """
    num_patches = model.patch_embed.num_patches
    model_extra = model.pos_embed.shape[-2] - num_patches
    ckpt_len, dim = pos_embed_checkpoint.shape[-2], pos_embed_checkpoint.shape[-1]
    orig_size = int(math.sqrt(max(ckpt_len - model_extra, 0)))
    ckpt_extra = ckpt_len - orig_size * orig_size
    new_size = int(math.sqrt(num_patches))
    extra_tokens = pos_embed_checkpoint[:, :min(model_extra, ckpt_extra)]
    if extra_tokens.shape[1] < model_extra:
        extra_tokens = torch.cat([extra_tokens, model.pos_embed.detach()[:, extra_tokens.shape[1]:model_extra].to(extra_tokens)], dim=1)
    pos_tokens = pos_embed_checkpoint[:, ckpt_extra:]
    pos_tokens = pos_tokens.reshape(-1, orig_size, orig_size, dim).permute(0, 3, 1, 2)
    pos_tokens = torch.nn.functional.interpolate(pos_tokens.float(), size=(new_size, new_size), mode="bicubic",
                                                 align_corners=False).to(pos_embed_checkpoint.dtype)
    pos_tokens = pos_tokens.permute(0, 2, 3, 1).flatten(1, 2)
    return torch.cat((extra_tokens, pos_tokens), dim=1)


def _group_keys(keys) -> str:
    """'blocks.0.{norm1.weight,attn.qkv.weight}, head.weight' style summary of key names."""
    groups: dict = {}
    for key in keys:
        parts = key.split(".")
        prefix = ".".join(parts[:2]) if parts[0] == "blocks" and len(parts) > 2 else ""
        groups.setdefault(prefix, []).append(key[len(prefix) + 1:] if prefix else key)
    out = []
    for prefix, names in groups.items():
        out.append(f"{prefix}.{{{','.join(names)}}}" if prefix else ", ".join(names))
    return ", ".join(out)


def load_finetune_weights(model, path: str, args=None) -> tuple[list, list]:
    """DeiT --finetune: drop mismatched head keys, adapt pos_embed, load non-strictly, log the differences."""
    checkpoint = load_checkpoint_file(path)
    state = dict(extract_state_dict(checkpoint))
    model_state = model.state_dict()
    for key in HEAD_KEYS:
        if key in state and key in model_state and state[key].shape != model_state[key].shape:
            _logger.info(f"finetune: removing {key} {list(state[key].shape)} (model has {list(model_state[key].shape)})")
            del state[key]
    if "pos_embed" in state and hasattr(model, "pos_embed") and hasattr(model, "patch_embed") \
            and getattr(model.patch_embed, "num_patches", None):
        state["pos_embed"] = resize_pos_embed(state["pos_embed"], model)
    shape_mismatch = [k for k in state if k in model_state and state[k].shape != model_state[k].shape]
    for key in shape_mismatch:
        _logger.warning(f"finetune: skipping {key}: checkpoint {list(state[key].shape)} vs model {list(model_state[key].shape)}")
        del state[key]
    result = model.load_state_dict(state, strict=False)
    _logger.info(f"finetune: loaded {len(state) - len(result.unexpected_keys)} tensors from {path}")
    if result.missing_keys:
        _logger.info(f"finetune: {len(result.missing_keys)} model keys not in the checkpoint (left at init): "
                     f"{_group_keys(result.missing_keys)}")
    if result.unexpected_keys:
        _logger.info(f"finetune: {len(result.unexpected_keys)} checkpoint keys not in the model (dropped): "
                     f"{_group_keys(result.unexpected_keys)}")
    return list(result.missing_keys), list(result.unexpected_keys)


def apply_attn_only(model) -> None:
    """DeiT --attn-only: train attention weights, the head and pos_embed; freeze the rest."""
    for name, param in model.named_parameters():
        param.requires_grad = ".attn." in name or name.startswith(("head.", "head_dist.", "pos_embed"))


def scaled_lr(args, world_size: int) -> float:
    if args.unscale_lr:
        return args.lr
    return args.lr * args.batch_size * world_size * args.accum_iter / 512.0


def build_optimizer(args, model, lr: float):
    """timm's optimizer factory: no weight decay on 1-D params and no_weight_decay() names, unless --decay-norm-and-bias."""
    from timm.optim import create_optimizer_v2, optimizer_kwargs

    kwargs = optimizer_kwargs(args)
    kwargs["lr"] = lr
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
    bad = first_nonfinite_key(state["model"]) or first_nonfinite_key(state["model_ema"] or {})
    if bad:
        # A step with a finite loss can still leave NaN/Inf weights (an overflowing update);
        # the last good checkpoint must survive that.
        _logger.error(f"not writing {path}: the weights have non-finite values ({bad}); "
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
    load_model_weights(parts.model_without_ddp, extract_state_dict(checkpoint), strict=True, model_name=args.model)
    point.path = path
    _logger.info(f"resumed model weights from {path}")
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

def _log_eval(stats: dict, n: int, label: str = "the network") -> None:
    _logger.info(f"Accuracy of {label} on the {n} test images: {stats['acc1']:.1f}%")


def main(args) -> int:
    check_output_dir(args.output_dir)
    dist_utils.init_distributed_mode(args)
    rank, world_size = dist_utils.get_rank(), dist_utils.get_world_size()
    setup_logging(None, rank)
    options = resolved_options(args)
    _logger.info("arguments: " + json.dumps(options, default=str))
    device = torch.device(args.device)
    seed_everything(args.seed + rank, args.deterministic)

    try:
        run = build_run(args, device, world_size, rank)
    except ValueError as err:  # model constructors and data builders report bad kwargs this way
        raise UserError(str(err).splitlines()[0] if str(err) else type(err).__name__) from err

    if args.output_dir and dist_utils.is_main_process():
        make_output_dir(args.output_dir)
        with open(os.path.join(args.output_dir, "args.yaml"), "w") as f:
            yaml.safe_dump(options, f, sort_keys=True)
    dist_utils.barrier()
    if args.output_dir:
        attach_log_file(args.output_dir, rank)

    if args.eval:
        stats = evaluate(run.val_loader, run.model_without_ddp, device, args)
        _log_eval(stats, len(run.dataset_val))
        return 0
    if args.visualize_mask:
        from tools import evit_tools
        evit_tools.visualize_mask(run.model_without_ddp, run.val_loader, args, device)
        return 0
    # Only training turns SIGTERM/SIGUSR1 into "finish the step, save, exit 0"; before
    # that (data scan, --eval) the default behaviour (terminate) is what a user wants.
    stop_request = dist_utils.StopRequest()
    stop_request.install()
    return train(args, run, device, stop_request)


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


def build_run(args, device, world_size: int, rank: int) -> Run:
    """Data, model, weights, optimizer, criterion and resume state; raises UserError on bad input."""
    import models

    check_model_name(args.model)  # before the (possibly slow) data set scan

    dataset_train = None
    if not args.eval:
        dataset_train, nb_classes = datasets.build_dataset(True, args)
    dataset_val, nb_val_classes = datasets.build_dataset(False, args)
    nb_classes = nb_val_classes if dataset_train is None else nb_classes
    train_loader, sampler_train, val_loader = build_loaders(args, dataset_train, dataset_val, world_size, rank)
    mixup_fn = mixing.build_mixup(args, nb_classes)

    _logger.info(f"creating model {args.model}")
    model = build_model(args, nb_classes)
    if args.finetune:
        load_finetune_weights(model, args.finetune, args)
    if args.attn_only:
        apply_attn_only(model)
    if args.tome_r is not None:
        import models.tome
        models.tome.patch(model, r=args.tome_r, start_idx=args.tome_start_idx, prop_attn=not args.no_tome_prop_attn)
    if args.distillation_type != "none" and hasattr(model, "set_distilled_training"):
        model.set_distilled_training(True)
    model.to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)

    if (args.test_speed or args.only_test_speed) and dist_utils.is_main_process():
        from tools import evit_tools
        if args.output_dir:
            make_output_dir(args.output_dir)  # speed_macs.txt goes there
        evit_tools.run_speed_test(model, args, device)
        if args.only_test_speed:
            raise SystemExit(0)

    model_ema = None
    if args.model_ema and not args.eval:
        from timm.utils import ModelEmaV2
        model_ema = ModelEmaV2(model, decay=args.model_ema_decay, device="cpu" if args.model_ema_force_cpu else None)

    model_without_ddp = model
    if args.distributed:
        find_unused = bool(getattr(model, "ddp_find_unused_parameters", False))
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=find_unused)
    if args.compile:
        model = torch.compile(model)
    n_parameters = sum(p.numel() for p in model_without_ddp.parameters() if p.requires_grad)
    _logger.info(f"number of params: {n_parameters}")

    lr = scaled_lr(args, world_size)
    optimizer = build_optimizer(args, model_without_ddp, lr)
    loss_scaler = None
    if args.amp and device.type == "cuda":
        from timm.utils import NativeScaler
        loss_scaler = NativeScaler()
    updates_per_epoch = max(len(train_loader) // args.accum_iter, 1) if train_loader is not None else 1
    lr_scheduler = build_scheduler(args, optimizer, updates_per_epoch)
    _logger.info(f"lr {args.lr:g} scaled to {lr:g} (batch {args.batch_size} x {world_size} processes x "
                 f"{args.accum_iter} accumulation / 512)" if not args.unscale_lr else f"lr {lr:g} (unscaled)")

    teacher = build_teacher(args, nb_classes, device) if args.distillation_type != "none" else None
    criterion = build_criterion(args, model_without_ddp, mixup_fn, teacher)
    hooks = models.build_training_hooks(model_without_ddp, args)
    parts = TrainingParts(model_without_ddp, optimizer, lr_scheduler, loss_scaler, model_ema, RunState(), hooks)
    resume = resume_if_possible(args, parts)
    if args.eval:
        # lambda_vit evaluates at epoch = epochs - 1 (lambda 0 for the dilution models).
        hooks.on_epoch_start(model_without_ddp, args.epochs - 1)
    set_training_mode = args.train_mode and not (args.finetune and is_evit_model(args.model))
    if not set_training_mode and args.train_mode:
        _logger.info("EViT fine-tuning: training with model.train(False) (dropout and drop-path off), as EViT")
    return Run(model, model_without_ddp, parts, train_loader, sampler_train, val_loader, dataset_val,
               mixup_fn, criterion, n_parameters, resume, set_training_mode)


def _should_evaluate(args, epoch: int) -> bool:
    return epoch % args.eval_every == 0 or epoch == args.epochs - 1


def _mark_preempted(output_dir: str, reason: str) -> None:
    """A marker the Slurm script looks for to requeue the job."""
    if output_dir and dist_utils.is_main_process():
        with open(os.path.join(output_dir, ".preempted"), "w") as f:
            f.write(reason + "\n")


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

        test_stats = {}
        if _should_evaluate(args, epoch):
            test_stats = evaluate(run.val_loader, model_without_ddp, device, args)
            _log_eval(test_stats, len(run.dataset_val))
            if parts.model_ema is not None:
                ema_stats = evaluate(run.val_loader, parts.model_ema.module, device, args, header="Test (EMA):",
                                     summary_prefix="* EMA")
                _logger.info(f"EMA accuracy on the {len(run.dataset_val)} test images: {ema_stats['acc1']:.1f}%")
            if test_stats["acc1"] > max_accuracy and hooks.best_checkpoint_allowed(model_without_ddp):
                max_accuracy = test_stats["acc1"]
                if output_dir:
                    save_training_checkpoint(args, parts, os.path.join(output_dir, "best_checkpoint.pth"),
                                             epoch, 0, True, max_accuracy)
            _logger.info(f"Max accuracy: {max_accuracy:.2f}%")
        if ckpt_path:
            if save_training_checkpoint(args, parts, ckpt_path, epoch, 0, True, max_accuracy) \
                    and dist_utils.is_main_process() and args.checkpoint_hist > 0:
                try:
                    keep_epoch_copy(ckpt_path, epoch, args.checkpoint_hist)
                except OSError as err:
                    _logger.error(f"could not keep the epoch copy of {ckpt_path}: {err}")

        log_stats = {**{f"train_{k}": v for k, v in train_stats.items()},
                     **{f"test_{k}": v for k, v in test_stats.items()},
                     "epoch": epoch, "n_parameters": run.n_parameters}
        last_stats = log_stats
        if log_path and dist_utils.is_main_process():
            try:
                append_json_line(log_path, log_stats)
            except OSError as err:
                _logger.error(f"could not append to {log_path} ({err.strerror or err}); training continues")
        if tb_writer is not None:
            for key, value in log_stats.items():
                if key not in ("epoch", "n_parameters"):
                    tb_writer.add_scalar(key.replace("_", "/", 1), value, epoch)
            tb_writer.flush()
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
    if output_dir:
        _logger.info(f"checkpoint: {ckpt_path}; metrics: {log_path}; "
                     f"logs: {os.path.join(output_dir, 'log_rank*.txt')}; arguments: {os.path.join(output_dir, 'args.yaml')}")
    if "test_acc1" in last_stats:
        _logger.info(f"final accuracy: {last_stats['test_acc1']:.2f}% top-1, {last_stats['test_acc5']:.2f}% top-5 "
                     f"(best {max_accuracy:.2f}%)")
    return 0


def one_line(err: BaseException) -> str:
    """The error's own message; an error re-raised from a DataLoader worker carries the
    worker's traceback, whose last line holds the original message."""
    text = str(err).strip()
    if "Original Traceback" in text:
        last = text.splitlines()[-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return text.splitlines()[0] if text else type(err).__name__


def cli(argv=None) -> int:
    """Command-line wrapper: bad input -> one logged line and exit status 2."""
    setup_logging(None, int(os.environ.get("RANK", 0)))
    try:
        args = parse_args(argv)
        return main(args)
    except UserError as err:
        _logger.error(one_line(err))
        return 2
    except NonFiniteLossError as err:
        _logger.error(one_line(err))
        return 1
    finally:
        dist_utils.destroy_process_group()


if __name__ == "__main__":
    sys.exit(cli())
