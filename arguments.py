"""main.py's command line: DeiT's `get_args_parser(add_help=False)`, `--cfg FILE.yaml` and the
recipes applied as parser defaults, and every check of the parsed values that needs no data.

Order of defaults (later wins): the parser's (DeiT's main.py), the model family's `recipe`,
`--defaults timm` (timm train.py's defaults and `configs/<model>.yaml`), `--cfg`, then the
command line. `finalize_args` checks every value before anything is built or written: an
out-of-range number, an unsupported combination or a device that does not exist is one
`UserError` line in the user's own terms (the flag and the value typed). The resolved
options are what `args.yaml` stores (`resolved_options`), loadable again with `--cfg`.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

import torch
import yaml

import mixing
from models import family as families
from models.errors import ModelConfigError
from utils.cli import OneLineParser, add_spelling_aliases, close_matches_text, import_plugins
from utils.errors import UserError

_logger = logging.getLogger("main")

DATA_SETS = ("IMNET", "IMAGEFOLDER", "CIFAR10", "CIFAR100", "CIFAR", "FLOWERS102", "CARS",
             "INAT18", "INAT", "INAT19", "SYNTHETIC")
RECIPE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
USAGE = "python main.py [--cfg FILE.yaml] [--model NAME] [options] [DATA_DIR]   (all options: --help)"
literal = families.literal


def _help_hint() -> str:
    return f"python {os.path.basename(sys.argv[0]) or 'main.py'}"


def _bool_pair(group, on: str, off: str, dest: str, default, help_on: str, help_off: str = "") -> None:
    group.add_argument(on, action="store_true", dest=dest, help=help_on)
    group.add_argument(off, action="store_false", dest=dest, help=help_off or f"undo {on}")
    group.set_defaults(**{dest: default})


def add_method_args(parser: argparse.ArgumentParser, unset_defaults: bool = False,
                    kwargs_only: bool = False) -> argparse.ArgumentParser:
    """The flags of every registered method family (one argument group each); shared with benchmark.py."""
    return families.add_family_args(parser, kwargs_only=kwargs_only, unset_defaults=unset_defaults)


def get_args_parser(add_help: bool = False) -> argparse.ArgumentParser:
    parser = OneLineParser("main.py", add_help=add_help, usage=USAGE, help_hint=_help_hint(),
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
    g.add_argument("--resume-other-model", dest="resume_other_model", action="store_true",
                   help="resume although the checkpoint was saved for another --model or other method options "
                        "(stopped by default; --finetune is the way to start from other weights)")
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
    add_spelling_aliases(parser)
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
    """A YAML value converted by the option's own type; a wrong type is a UserError naming key and file.
    A switch takes a YAML boolean only (`model_ema: "false"`, a string, would be true)."""
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if isinstance(value, bool) or value is None and action.default is None:
            return value
        raise UserError(f"{path}: key {key!r} is a switch and takes true or false (YAML booleans, unquoted), "
                        f"got {value!r}")
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
                            f"{close_matches_text(normalised, known)} (keys are main.py option names)")
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


def translate_official_argv(argv: list) -> list:
    """`argv` with every family's official spellings rewritten (after `--plugin` modules are imported,
    so a plugin's translator applies too); the rewrite is logged when it changes anything."""
    import models  # noqa: F401  (registers the built-in families and their translators)

    import_plugins(argv)
    try:
        translated = families.translate_argv(argv)
    except ModelConfigError as err:
        raise UserError(str(err)) from None
    if translated != argv:
        _logger.info("official launch line translated: %s", " ".join(translated))
    return translated


def build_parser(argv=None) -> argparse.ArgumentParser:
    """The full parser with the defaults in force for this command line: parser defaults, then
    the model family's recipe, then `--defaults timm` files, then `--cfg` (the command line wins)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--cfg", default=None)
    pre.add_argument("--defaults", default="deit")
    pre.add_argument("--plugin", action="append", default=[])
    pre.add_argument("--model", default=None)
    known, _ = pre.parse_known_args(argv)
    import_plugins(argv)
    import models  # noqa: F401  (registers the built-in families before the parser is built)

    parser = OneLineParser("main.py", parents=[get_args_parser()], usage=USAGE, help_hint=_help_hint(),
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
    """Full command-line parsing: an official launch line's flags translated into this project's
    (each family's `translate_argv`), recipes and --cfg YAML as defaults, then the command line,
    then checks."""
    argv = translate_official_argv(list(sys.argv[1:] if argv is None else argv))
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


INF = float("inf")
# Every numeric option of the trainer (method flags are checked by their family's check_options):
# dest -> (low, high, brackets); "[)" means low <= value < high. A list option checks each value.
# Checked in one place, before anything is built or written, against the value the user typed.
RANGES = {
    "batch_size": (1, INF, "[)"), "epochs": (1, INF, "[)"), "accum_iter": (1, INF, "[)"),
    "eval_every": (1, INF, "[)"), "input_size": (1, INF, "[)"),
    "drop": (0, 1, "[)"), "drop_path": (0, 1, "[)"), "target_gmacs": (0, INF, "()"),
    "model_ema_decay": (0, 1, "[]"), "opt_eps": (0, INF, "[)"), "opt_betas": (0, 1, "[)"),
    "clip_grad": (0, INF, "()"), "momentum": (0, INF, "[)"), "weight_decay": (0, INF, "[)"),
    "lr": (0, INF, "[)"), "lr_noise": (0, INF, "[)"), "lr_noise_pct": (0, INF, "[)"), "lr_noise_std": (0, INF, "[)"),
    "warmup_lr": (0, INF, "[)"), "min_lr": (0, INF, "[)"), "decay_epochs": (0, INF, "()"),
    "warmup_epochs": (0, INF, "[)"), "cooldown_epochs": (0, INF, "[)"), "patience_epochs": (0, INF, "[)"),
    "decay_rate": (0, INF, "()"), "color_jitter": (0, INF, "[)"), "smoothing": (0, 1, "[)"),
    "reprob": (0, 1, "[]"), "recount": (1, INF, "[)"), "mixup": (0, INF, "[)"), "cutmix": (0, INF, "[)"),
    "cutmix_minmax": (0, 1, "[]"), "mixup_prob": (0, 1, "[]"), "mixup_switch_prob": (0, 1, "[]"),
    "distillation_alpha": (0, 1, "[]"), "distillation_tau": (0, INF, "()"), "start_epoch": (0, INF, "[)"),
    "synthetic_train_size": (1, INF, "[)"), "synthetic_val_size": (1, INF, "[)"), "synthetic_classes": (2, 12, "[]"),
    "eval_crop_ratio": (0, 1, "(]"), "num_workers": (0, INF, "[)"), "seed": (0, INF, "[)"),
    "print_freq": (0, INF, "[)"), "checkpoint_hist": (0, INF, "[)"), "save_every_iters": (0, INF, "[)"),
    "skip_nonfinite": (0, INF, "[)"), "preempt_at_step": (0, INF, "[)"),
}
# Numbers set from the environment by the launcher, not by the user.
NOT_RANGE_CHECKED = ("world_size", "local_rank")
COUNTS = {"lr": (1, 3), "opt_betas": (2, 3), "cutmix_minmax": (2, 2), "lr_noise": (1, 2)}


def _range_text(low, high, brackets: str) -> str:
    if high == INF:
        return f"{'>=' if brackets[0] == '[' else '>'} {low:g}"
    return f"in {brackets[0]}{low:g}, {high:g}{brackets[1]}"


def check_ranges(args) -> None:
    """UserError naming the first option outside its range in `RANGES`, in the user's own terms."""
    for dest, (low, high, brackets) in RANGES.items():
        value = getattr(args, dest, None)
        if value is None:
            continue
        values = list(value) if isinstance(value, (list, tuple)) else [value]
        flag = "--" + dest.replace("_", "-")
        if dest in COUNTS and not COUNTS[dest][0] <= len(values) <= COUNTS[dest][1]:
            lo, hi = COUNTS[dest]
            raise UserError(f"{flag} takes {lo if lo == hi else f'{lo} to {hi}'} values, got {len(values)}")
        for v in values:
            above = v > low if brackets[0] == "(" else v >= low
            below = v < high if brackets[1] == ")" else v <= high
            if not (above and below):
                shown = " ".join(f"{x:g}" for x in values)
                raise UserError(f"{flag} must be {_range_text(low, high, brackets)}, got {shown}")
    if args.cutmix_minmax is not None and args.cutmix_minmax[0] >= args.cutmix_minmax[1]:
        raise UserError(f"--cutmix-minmax takes MIN MAX with MIN < MAX, got {args.cutmix_minmax[0]:g} "
                        f"{args.cutmix_minmax[1]:g}")
    if getattr(args, "warmup_prefix", False) and not getattr(args, "eval", False) \
            and args.epochs <= args.warmup_epochs:
        # timm's scheduler would assert t_initial > 0 mid-setup (DynamicViT's recipe sets both)
        raise UserError(f"--warmup-prefix runs the schedule after the {args.warmup_epochs} warm-up epochs, so "
                        f"--epochs must be larger (got {args.epochs}); raise --epochs or lower --warmup-epochs")


def check_device(device: str) -> None:
    """`--device` names a device torch knows and this machine has."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise UserError(f"--device {device} is not a device; use cpu, cuda, cuda:N or mps") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {device} but CUDA is not available; pass --device cpu")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise UserError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                            f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    elif parsed.type != "cpu":
        backend = getattr(torch, parsed.type, None) or getattr(torch.backends, parsed.type, None)
        if backend is None or not backend.is_available():
            raise UserError(f"--device {device} but {parsed.type} is not available here; pass --device cpu")


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
    check_ranges(args)
    if mixing.mixup_active(args) and args.batch_size % 2 and not args.eval:
        raise UserError(f"mixup/cutmix needs an even --batch-size, got {args.batch_size}; change it or pass --mixup 0 --cutmix 0")
    check_device(args.device)
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
        if not auto:
            reducible = [f"--{f.reduction.dest.replace('_', '-')}" for f in families.families() if f.reduction]
            raise UserError(f"--target-gmacs needs one reduction flag set to auto ({', '.join(reducible)} auto) "
                            f"that applies to --model {args.model}")
        if len(auto) > 1:
            raise UserError("--target-gmacs: set only one reduction flag to auto")


TRAINING_GROUPS = ("model EMA", "optimizer", "learning-rate schedule", "augmentation", "mixup / cutmix",
                   "distillation", "reliability")
TRAINING_DESTS = ("epochs", "accum_iter", "bce_loss", "unscale_lr", "finetune_partial", "attn_only", "auto_resume",
                  "resume_other_model", "start_epoch", "synthetic_train_size", "save_every_iters", "checkpoint_hist",
                  "tensorboard", "eval_every", "target_gmacs")


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

