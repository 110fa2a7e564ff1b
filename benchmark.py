"""Speed, FLOPs and memory benchmark for the project's models (after timm's benchmark.py).

    python benchmark.py --model deit_small_patch16_224 deit_small_patch16_shrink_base \
        --base_keep_rate 0.7 --fuse_token --precision amp --batch-size 256
    python benchmark.py --model 'deit_*' --flops-only
    python benchmark.py --compare deit_small_patch16_224 \
        "deit_small_patch16_shrink_base --base_keep_rate 0.7 --fuse_token"

Methodology: the model is built (random weights, nothing downloaded), its forward MACs
are counted once (`models/flops.py`, counter named in every record), then `--warmup`
untimed iterations are followed by `--rounds` timed rounds of `--iters-per-round`
iterations. The device is synchronised at the end of warm-up and of each round only
(never per step, and only on CUDA/MPS). Throughput is reported as the median over rounds
with its inter-quartile range and min/max. An out-of-memory error halves the batch
and retries; the failed sizes are recorded. `--compare A B` interleaves rounds of the
two models, alternating which goes first (A B, B A, A B, ...), so that machine noise and
drift hit both alike, and reports the ratio of their median throughputs with the spread
of the per-round ratios (paired rounds).

Precision: `fp32` runs without autocast; `bf16` / `fp16` run the fp32 model under
`torch.autocast` with that dtype; `amp` is autocast with float16 on CUDA and bfloat16
on other devices; `bf16-weights` casts the model to bfloat16 (`engine.cast_for_inference`:
weights, activations and logits in bf16, no autocast, token-selection scores still in
fp32), usually faster than autocast, which re-casts the fp32 weights at every matmul.
Training steps use SGD and, for float16 on CUDA, a GradScaler. `--peak` times square
matmuls in the dtype the benchmarked matmuls run in (bf16 for bf16 / bf16-weights, and
for amp off CUDA), so `%peak` compares like with like.

Compile: with `--compile` each model is timed compiled and eager (the same module,
interleaved rounds after the warm-up, which includes the compilation); the record holds
the compiled numbers, `eager_throughput` and `compile_speedup` = compiled / eager.

Peak memory: on CUDA `torch.cuda.max_memory_allocated` over the timed rounds (stats
reset after warm-up; includes the weights). Elsewhere the process's peak resident set
size (VmHWM) over the timed rounds: it is reset after warm-up through
`/proc/self/clear_refs` (Linux >= 4.0); where that is not possible, the lifetime peak
from `resource.getrusage` is reported and `peak_mem_kind` says so. `peak_mem_delta_mb`
is the peak minus what was resident/allocated just before the timed rounds.

Host malloc: on CPU, freed blocks up to 32 MB stay in the process (`utils.host_memory`,
recorded as `malloc_settings`), so forwards reuse their activation memory instead of
page-faulting on fresh pages every iteration; `--default-malloc` keeps glibc's defaults.
Memory freed after warm-up stays resident, so on CPU `peak_mem_delta_mb` is then small
and `peak_mem_mb` (weights plus the largest working set) is the number to read.
"""
from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import logging
import shlex
import sys
from typing import Sequence

import timm
import torch
from torch import nn

from arguments import add_method_args as trainer_method_args
from engine import cast_for_inference
import models  # noqa: F401  (registers the project's model families)
from models import family as families
from models import flops
from models.compiling import compile_model
from models.errors import ModelConfigError
from utils.bench_records import (append_csv, append_jsonl, check_plot_path, format_compare, format_table, make_record,
                                 plot_throughput_vs_gmacs)
from utils.cli import OneLineParser, close_matches, import_plugins
from utils.errors import UserError
from utils.host_memory import keep_freed_memory
from utils.measure import (PRECISIONS, _release_memory, autocast_dtype, compute_dtype, dtype_name, environment_info,
                           is_out_of_memory, measure_models, measure_peak_gflops, run_with_backoff, summarize,
                           weights_dtype)

_logger = logging.getLogger("benchmark")

MODES = ("infer", "train", "both")


# ---------------------------------------------------------------- argument parsing

def add_method_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The families' flags that shape a model (constructor kwargs and patches), defaults unset
    (None) so a spec's given flags are known."""
    return trainer_method_args(parser, unset_defaults=True, kwargs_only=True)


def method_dests() -> tuple:
    """Dests of every family flag that shapes a model: kwargs of model families, patch flags."""
    return tuple(flag.dest for family in families.families() for flag in family.flags
                 if flag.kwarg or family.is_patch())


def patch_dests() -> tuple:
    return tuple(flag.dest for family in families.patch_families() for flag in family.flags)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        description="Throughput, latency, peak memory and GMACs of registered models.")
    which = parser.add_argument_group("models")
    which.add_argument("--model", "-m", nargs="+", default=[], metavar="NAME",
                       help="model names or glob patterns matched against timm.list_models()")
    which.add_argument("--models-file", default=None, metavar="FILE",
                       help="one model spec per line: NAME [method flags]; # starts a comment")
    which.add_argument("--compare", nargs=2, default=None, metavar=("A", "B"),
                       help='two specs measured alternately, e.g. "NAME --base_keep_rate 0.7"; '
                            "reports throughput(B) / throughput(A)")
    which.add_argument("--compare-baseline", default=None, metavar="SPEC",
                       help="compare every --model against this spec, alternately")
    which.add_argument("--num-classes", type=int, default=1000, help="classifier size of the built models")
    which.add_argument("--plugin", action="append", default=[], metavar="MODULE",
                       help="import a module that registers a method family (its models and flags), as main.py's")
    which.add_argument("--model-kwargs", dest="model_kwargs", type=families.literal("dict"), default=None,
                       metavar="DICT", help="constructor kwargs for every model, as main.py's, e.g. "
                                            "\"{'depth': 6}\" (a model-file line may carry its own)")
    which.add_argument("--target-gmacs", type=float, nargs="+", default=None, metavar="G",
                       help="set the reduction flag given as 'auto' (e.g. --tome-r auto) so each model has G GMACs; "
                            "several values: each 'auto' spec runs once per value (a model-file line may carry "
                            "its own --target-gmacs G and --img-size N)")

    setting = parser.add_argument_group("settings")
    setting.add_argument("--batch-size", "-b", type=int, default=None,
                         help="default 256 on CUDA, 16 elsewhere; halved on out-of-memory")
    setting.add_argument("--img-size", type=int, default=None, help="default: the model's pretrained_cfg")
    setting.add_argument("--precision", choices=PRECISIONS, default="fp32",
                         help="fp32; bf16 / fp16: autocast of the fp32 model; amp: fp16 autocast on CUDA, bf16 "
                              "elsewhere; bf16-weights: the model cast to bf16 (no autocast; token-selection "
                              "scores stay fp32)")
    setting.add_argument("--channels-last", action="store_true")
    setting.add_argument("--compile", action="store_true",
                         help="torch.compile the model; the eager model is timed alongside (compile_speedup)")
    setting.add_argument("--compile-mode", default=None,
                         choices=("default", "reduce-overhead", "max-autotune"))
    setting.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    setting.add_argument("--mode", choices=MODES, default="infer")
    setting.add_argument("--warmup", type=int, default=10, help="untimed iterations per model")
    setting.add_argument("--rounds", type=int, default=7, help="timed rounds (median and spread over them)")
    setting.add_argument("--iters-per-round", type=int, default=10)
    setting.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    setting.add_argument("--default-malloc", action="store_true",
                         help="on CPU, keep glibc's malloc defaults; by default freed blocks up to 32 MB stay "
                              "in the process for reuse (utils.host_memory), so forwards do not page-fault")
    setting.add_argument("--no-backoff", action="store_true", help="fail instead of halving the batch on OOM")

    counting = parser.add_argument_group("counting")
    counting.add_argument("--counter", choices=flops.COUNTERS, default="both",
                          help="FLOP counter; 'both' reports fvcore (primary) and torchprofile")
    counting.add_argument("--flops-only", "--no-speed", dest="flops_only", action="store_true",
                          help="count parameters, GMACs and tokens per block; no timing")
    counting.add_argument("--no-flops", action="store_true", help="skip FLOP counting")
    counting.add_argument("--peak", action="store_true",
                          help="measure the matmul peak in the benchmarked precision (bf16 for bf16 runs) "
                               "and report achieved GFLOP/s against it")
    counting.add_argument("--peak-size", type=int, default=None, help="matmul size (default 4096 CUDA, 2048 CPU)")

    output = parser.add_argument_group("output")
    output.add_argument("--output", default=None, metavar="FILE.jsonl", help="append one JSON record per run")
    output.add_argument("--csv", default=None, metavar="FILE.csv", help="append one CSV row per run")
    output.add_argument("--plot", default=None, metavar="FILE.png",
                        help="throughput against GMACs (with --flops-only: GMACs against parameters)")
    output.add_argument("--log-level", default="INFO")
    data = parser.add_argument_group("data loading (data_bench.py)")
    data.add_argument("--data-loading", default=None, metavar="DIR",
                      help="measure the training input pipeline on a folder of images (or an ImageFolder root "
                           "with train/) instead of models: decode, decode + augmentation per worker, DataLoader")
    data.add_argument("--workers", type=int, nargs="+", default=None, metavar="N",
                      help="--data-loading: DataLoader worker counts (0: main process); default 1 and the core count")
    data.add_argument("--images", type=int, default=256,
                      help="--data-loading: images per timed round (--rounds rounds, after --warmup images)")
    data.add_argument("--recipe", default="", metavar='"FLAGS"',
                      help='--data-loading: main.py flags that shape the pipeline, e.g. --recipe="--cfg '
                           'configs/deit_small_patch16_224.yaml --input-size 224" (batch size: the recipe\'s)')
    add_method_args(parser)
    return parser


# ---------------------------------------------------------------- model specs

@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A registered model name and the method flags for it (argparse dest -> value)."""

    name: str
    method: dict
    explicit: tuple = ()  # flags written in this spec itself (not inherited)
    img_size: int | None = None  # a spec's own --img-size (models-file lines); None: the run's
    target_gmacs: float | None = None  # the target its 'auto' reduction flag is searched for
    model_kwargs: dict | None = None  # constructor kwargs (--model-kwargs), e.g. {"depth": 6}

    @property
    def label(self) -> str:
        """The name and the flags that reach this model (flags its family ignores are left out)."""
        try:
            kwargs, _ = families.model_kwargs(self.name, self.method)
            owner = families.family_of_model(self.name)
            accepted = {f.dest for f in owner.flags} if owner is not None else set()
            accepted |= set(patch_dests())
        except (RuntimeError, KeyError, ImportError):  # a name not in the registry (tests, fakes)
            accepted = set(self.method)
        defaults = {flag.dest: flag.default for family in families.families() for flag in family.flags}
        given = [f"{k}={v}" for k, v in self.method.items()
                 if v is not None and v != defaults.get(k, False) and k in accepted]
        if self.img_size is not None:
            given.append(f"img_size={self.img_size}")
        given.extend(f"{k}={v}" for k, v in (self.model_kwargs or {}).items())
        return " ".join([self.name] + given)


def _method_parser() -> argparse.ArgumentParser:
    """The method flags with no defaults at all, so the namespace holds exactly the flags a spec gives
    (a switch given as off, e.g. `--no-x`, is given too)."""
    parser = add_method_args(argparse.ArgumentParser(prog="model spec", add_help=False, exit_on_error=False,
                                                     allow_abbrev=False))
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return parser


def _method_defaults(args: argparse.Namespace) -> dict:
    return {dest: getattr(args, dest, None) for dest in method_dests()}


# Settings a model spec may carry besides method flags (models-file lines): flag -> (field, type).
SPEC_SETTINGS = {"--img-size": ("img_size", int), "--target-gmacs": ("target_gmacs", float),
                 "--model-kwargs": ("model_kwargs", families.literal("dict"))}


def _spec_settings(text: str, tokens: Sequence[str]) -> tuple[dict, list[str]]:
    """(the spec's own --img-size / --target-gmacs, the remaining tokens)."""
    settings: dict = {}
    rest: list[str] = []
    position = 0
    while position < len(tokens):
        name, has_value, value = tokens[position].partition("=")
        key = name[:2] + name[2:].replace("_", "-")
        if key not in SPEC_SETTINGS:
            rest.append(tokens[position])
            position += 1
            continue
        if not has_value:
            if position + 1 == len(tokens):
                raise UserError(f"model spec {text!r}: {key} needs a value")
            value, position = tokens[position + 1], position + 1
        field_name, kind = SPEC_SETTINGS[key]
        try:
            settings[field_name] = kind(value)
        except (ValueError, argparse.ArgumentTypeError):
            raise UserError(f"model spec {text!r}: {key} {value!r} is not a {kind.__name__}") from None
        if kind in (int, float) and not settings[field_name] > 0:
            raise UserError(f"model spec {text!r}: {key} must be > 0, got {value}")
        position += 1
    return settings, rest


def parse_spec(text: str, defaults: dict | None = None) -> list[ModelSpec]:
    """`"NAME [method flags] [--img-size N] [--target-gmacs G]"` -> specs (several when NAME is a
    glob); flags override `defaults`."""
    tokens = shlex.split(text)
    if not tokens or tokens[0].startswith("-"):
        raise UserError(f"model spec {text!r} must start with a model name, e.g. \"deit_small_patch16_224 --tome-r 13\"")
    settings, flags = _spec_settings(text, tokens[1:])
    dests = method_dests()
    base = argparse.Namespace(**(defaults or {dest: None for dest in dests}))
    given = argparse.Namespace()
    try:
        _, unknown = _method_parser().parse_known_args(flags, namespace=given)
    except argparse.ArgumentError as error:
        raise UserError(f"model spec {text!r}: {error}") from None
    if unknown:
        raise UserError(f"model spec {text!r}: unknown flag(s) {' '.join(unknown)}; "
                        f"allowed: {', '.join('--' + d for d in dests)}")
    explicit = tuple(d for d in dests if getattr(given, d, None) is not None)
    method = {d: getattr(given, d) if d in explicit else getattr(base, d, None) for d in dests}
    return [ModelSpec(name, method, explicit, **settings) for name in expand_model_names([tokens[0]])]


def expand_model_names(patterns: Sequence[str], available: Sequence[str] | None = None) -> list[str]:
    """Names and glob patterns -> registered names (order kept, duplicates dropped).

    An unknown plain name raises UserError listing close matches.
    """
    available = list(timm.list_models()) if available is None else list(available)
    known = set(available)
    names: list[str] = []
    for pattern in patterns:
        if any(ch in pattern for ch in "*?["):
            matches = fnmatch.filter(available, pattern)
            if not matches:
                raise UserError(f"no registered model matches {pattern!r}; list names with timm.list_models('*part*')")
        elif pattern in known:
            matches = [pattern]
        else:
            close = close_matches(pattern, available, n=3, cutoff=0.6)
            hint = f"did you mean {', '.join(close)}?" if close else "list names with timm.list_models('*part*')"
            raise UserError(f"unknown model {pattern!r}; {hint}")
        names.extend(m for m in matches if m not in names)
    return names


def read_models_file(path: str, defaults: dict) -> list[ModelSpec]:
    try:
        with open(path) as handle:
            lines = handle.read().splitlines()
    except OSError as error:
        raise UserError(f"cannot read --models-file {path}: {error.strerror}") from None
    specs = []
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if line:
            specs.extend(parse_spec(line, defaults))
    if not specs:
        raise UserError(f"--models-file {path} names no model; write one NAME [flags] per line")
    return specs


def family_flag_dests(name: str) -> tuple:
    """The flags of the family that owns `name` (empty for timm's own models)."""
    owner = families.family_of_model(name)
    return tuple(flag.dest for flag in owner.flags) if owner is not None else ()


def split_method_args(spec: ModelSpec) -> tuple[dict, list[str]]:
    """(constructor kwargs for this model, given flags that this model's family does not take)."""
    kwargs, unused = families.model_kwargs(spec.name, spec.method)
    return kwargs, unused


def check_method_flags(specs: Sequence[ModelSpec]) -> None:
    """Flags written for one model must apply to it; shared flags must apply to some model."""
    for spec in specs:
        try:
            families.check_all_options(spec.name, spec.method)
        except ModelConfigError as error:
            raise UserError(f"{spec.name}: {error}") from None
    unused_by = [split_method_args(spec)[1] for spec in specs]
    for spec, unused in zip(specs, unused_by):
        wrong = [k for k in unused if k in spec.explicit]
        if wrong:
            raise UserError(f"{spec.name} does not take --{wrong[0]} (its family's flags: "
                            f"{', '.join(family_flag_dests(spec.name)) or 'none'}); remove the flag")
    shared = {k for spec, unused in zip(specs, unused_by) for k in unused if k not in spec.explicit}
    for flag in sorted(shared):
        if all(flag in unused for unused in unused_by):
            raise UserError(f"--{flag} applies to none of the selected models; remove it or pick a model that takes it")
        skipped = [spec.name for spec, unused in zip(specs, unused_by) if flag in unused]
        _logger.warning("--%s ignored for %s (not a kwarg of their family)", flag, ", ".join(skipped))


def _auto_reduction(spec: ModelSpec):
    for family in families.active_families(spec.name, spec.method):
        if family.reduction is not None and spec.method.get(family.reduction.dest) == families.AUTO:
            return family
    return None


def _resolve_auto(spec: ModelSpec, target_gmacs: float | None, num_classes: int,
                  img_size: int | None) -> tuple[ModelSpec, dict | None]:
    """(resolved spec, {"target", "dest", "value", "gmacs"} of the search or None without 'auto')."""
    family = _auto_reduction(spec)
    if family is None:
        return spec, None
    if target_gmacs is None:
        raise UserError(f"{spec.name}: --{family.reduction.dest.replace('_', '-')} auto needs --target-gmacs G")
    dest = family.reduction.dest

    def build(value):
        return build_model(dataclasses.replace(spec, method=dict(spec.method, **{dest: value})),
                           num_classes, img_size)[0].eval()

    def gmacs_of(model):
        return flops.count_flops(model, model_img_size(model, img_size), counter="fvcore")["gmacs"]

    try:
        value, gmacs = family.reduction.search(build, target_gmacs, gmacs_of)
    except ModelConfigError as error:
        raise UserError(f"{spec.name}: {error}") from None
    _logger.info("%s: --target-gmacs %g -> --%s %s (%.3f GMACs, %+.2f%%)", spec.name, target_gmacs,
                 dest.replace("_", "-"), value, gmacs, 100 * (gmacs - target_gmacs) / target_gmacs)
    result = {"target": target_gmacs, "dest": dest, "value": value, "gmacs": gmacs, "counter": "fvcore",
              "rel_diff": (gmacs - target_gmacs) / target_gmacs}
    return dataclasses.replace(spec, method=dict(spec.method, **{dest: value})), result


def expand_targets(specs: Sequence[ModelSpec], targets: Sequence[float] | None) -> list[ModelSpec]:
    """Each spec with a reduction flag set to 'auto' and no target of its own once per value of
    --target-gmacs; the others once. A target that no spec can use is refused."""
    expanded: list[ModelSpec] = []
    for value in targets or ():
        if not value > 0:
            raise UserError(f"--target-gmacs must be > 0, got {value:g}")
    for spec in specs:
        auto = _auto_reduction(spec) is not None
        if spec.target_gmacs is not None and not auto:
            raise UserError(f"{spec.label}: --target-gmacs needs a reduction flag set to auto in the same spec "
                            "(e.g. --tome-r auto)")
        if auto and spec.target_gmacs is None and targets:
            expanded.extend(dataclasses.replace(spec, target_gmacs=value) for value in targets)
        else:
            expanded.append(spec)
    if targets and not any(_auto_reduction(spec) is not None for spec in expanded):
        reducible = [f"--{f.reduction.dest.replace('_', '-')}" for f in families.families() if f.reduction]
        raise UserError(f"--target-gmacs needs a model spec with a reduction flag set to auto "
                        f"({', '.join(reducible)} auto)")
    return _unique(expanded)


def _run_target(spec: ModelSpec, args) -> float | None:
    """The target a spec's 'auto' flag is searched for: its own, else the run's single value."""
    if spec.target_gmacs is not None:
        return spec.target_gmacs
    targets = getattr(args, "target_gmacs", None)
    if targets is None or isinstance(targets, (int, float)):
        return targets
    if len(targets) > 1 and _auto_reduction(spec) is not None:
        raise UserError(f"{spec.name}: --compare takes one --target-gmacs value per side; "
                        "write it into the spec (\"NAME --tome-r auto --target-gmacs G\")")
    return targets[0] if targets else None


def series_label(spec: ModelSpec) -> str:
    """The plot line a spec belongs to: its label before 'auto' is resolved (one line per method)."""
    return spec.label


def build_model(spec: ModelSpec, num_classes: int = 1000, img_size: int | None = None) -> tuple[nn.Module, dict]:
    """`spec`'s model (random weights, patches applied) through the project's one factory;
    returns (model, the method settings used)."""
    from models.factory import create_model
    try:
        model = create_model(spec.name, options=spec.method, num_classes=num_classes, img_size=img_size,
                             model_kwargs=spec.model_kwargs)
    except ModelConfigError as error:
        raise UserError(f"{spec.name}: {error}") from None
    kwargs, _ = split_method_args(spec)
    kwargs.update(spec.model_kwargs or {})
    for family in families.active_families(spec.name, spec.method):
        if family.is_patch():
            kwargs.update({flag.dest: spec.method.get(flag.dest) for flag in family.flags
                           if spec.method.get(flag.dest) not in (None, False)})
    return model, kwargs


def model_img_size(model: nn.Module, img_size: int | None) -> tuple[int, int]:
    if img_size is not None:
        return (img_size, img_size)
    config = timm.data.resolve_model_data_config(model)
    return tuple(config["input_size"][1:])


# ---------------------------------------------------------------- runs

def resolve_device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown --device {name!r}; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda requested but CUDA is not available; use --device cpu")
    return device


def _settings(args: argparse.Namespace, device: torch.device, img_size) -> dict:
    return {
        "img_size": list(img_size), "precision": args.precision,
        "autocast_dtype": dtype_name(autocast_dtype(args.precision, device)),
        "weights_dtype": dtype_name(weights_dtype(args.precision)) or "float32",
        "channels_last": args.channels_last, "compile": args.compile, "compile_mode": args.compile_mode,
        "warmup": args.warmup, "rounds": args.rounds, "iters_per_round": args.iters_per_round,
        "batch_size_requested": args.batch_size, "backoff_enabled": not args.no_backoff,
        "num_classes": args.num_classes,
    }


def _modes(args) -> list[str]:
    return ["infer", "train"] if args.mode == "both" else [args.mode]


@dataclasses.dataclass
class Prepared:
    spec: ModelSpec
    model: nn.Module
    kwargs: dict
    img_size: tuple
    flop_info: dict | None
    tokens: list | None
    target_gmacs: dict | None = None  # the --target-gmacs search result (record field)
    series: str | None = None  # the plot line: the spec's label before 'auto' was resolved


def prepare(spec: ModelSpec, args, device: torch.device) -> Prepared:
    """Build, count (on CPU in fp32, before compile), then move / convert / compile for timing."""
    size = spec.img_size if spec.img_size is not None else args.img_size
    series = series_label(spec)
    spec, search = _resolve_auto(spec, _run_target(spec, args), args.num_classes, size)
    model, kwargs = build_model(spec, args.num_classes, size)
    if search is not None:
        kwargs["target_gmacs"] = search["target"]
    img_size = model_img_size(model, size)
    flop_info = tokens = None
    if not args.no_flops:
        flop_info = flops.count_flops(model, img_size, counter=args.counter)
        tokens = flops.tokens_per_block(model, img_size)
        official = {}
        for family in families.active_families(spec.name, spec.method):
            if family.official_flops is not None:
                official.update(family.official_flops(model, tuple(img_size)))
        flop_info["official"] = official or None
        if flop_info.get("counters_disagree"):
            _logger.warning("%s: fvcore %.4f vs torchprofile %.4f GMACs (%.1f%% apart)", spec.label,
                            flop_info["gmacs_fvcore"], flop_info["gmacs_torchprofile"],
                            100 * flop_info["counters_rel_diff"])
    if not args.flops_only:
        model.to(device)
        if args.channels_last:
            model.to(memory_format=torch.channels_last)
        cast_for_inference(model, weights_dtype(args.precision))  # before compile: one graph, in bf16
        if args.compile:
            model = compile_model(model, mode=args.compile_mode)
    return Prepared(spec, model, kwargs, img_size, flop_info, tokens, search, series)


def _emit(record: dict, args, records: list, prepared: Prepared | None = None) -> None:
    if prepared is not None:
        record["target_gmacs"] = prepared.target_gmacs
        record["series"] = prepared.series
    records.append(record)
    if args.output:
        append_jsonl(args.output, record)
    if args.csv:
        append_csv(args.csv, record)


def _measure_kwargs(args, device, img_size) -> dict:
    return dict(img_size=img_size, device=device, precision=args.precision, channels_last=args.channels_last,
                warmup=args.warmup, rounds=args.rounds, iters_per_round=args.iters_per_round)


def _measure_one(model: nn.Module, mode: str, batch: int, **kwargs) -> dict:
    """One model's result; a compiled model is timed against its eager self (interleaved rounds), and
    the result gets `eager_throughput` and `compile_speedup` = compiled / eager median throughput."""
    eager = getattr(model, "_orig_mod", None)
    if eager is None:
        return measure_models([model], mode, batch, **kwargs)[0]
    eager_result, result = measure_models([eager, model], mode, batch, **kwargs)
    result["eager_throughput"] = eager_result["throughput"]
    result["compile_speedup"] = result["throughput"]["median"] / eager_result["throughput"]["median"]
    return result


def run_sweep(args, specs: Sequence[ModelSpec], device: torch.device, env: dict, peak: dict | None) -> list[dict]:
    records: list[dict] = []
    for spec in specs:
        _logger.info("%s: building", spec.label)
        prepared = prepare(spec, args, device)
        spec = prepared.spec  # with the value --target-gmacs chose
        settings = _settings(args, device, prepared.img_size)
        if args.flops_only:
            _emit(make_record("flops", spec, prepared.kwargs, settings, env, prepared.flop_info,
                              prepared.tokens, {"mode": "flops"}), args, records, prepared)
            continue
        for mode in _modes(args):
            _logger.info("%s: timing %s", spec.label, mode)
            measure = lambda batch: _measure_one(prepared.model, mode, batch,  # noqa: E731
                                                 **_measure_kwargs(args, device, prepared.img_size))
            error = None
            try:
                result, used, failed = run_with_backoff(measure, args.batch_size, not args.no_backoff)
            except Exception as exc:  # one model failing must not end a sweep; recorded and reported
                if len(specs) == 1 and not is_out_of_memory(exc):
                    raise
                _logger.error("%s (%s) failed: %s", spec.label, mode, exc)
                result, used, failed = {"mode": mode}, None, []
                error = f"{type(exc).__name__}: {exc}".splitlines()[0]
            result.update(batch_size=used, oom_backoff=failed)
            _emit(make_record("speed", spec, prepared.kwargs, settings, env, prepared.flop_info,
                              prepared.tokens, result, peak, error=error), args, records, prepared)
        del prepared
        _release_memory()
    return records


def run_compare(args, spec_a: ModelSpec, spec_b: ModelSpec, device: torch.device, env: dict) -> list[dict]:
    """Interleaved rounds of A and B; ratio = median throughput(B) / median throughput(A)."""
    side_a, side_b = prepare(spec_a, args, device), prepare(spec_b, args, device)
    spec_a, spec_b = side_a.spec, side_b.spec  # with the values --target-gmacs chose
    if side_a.img_size != side_b.img_size:
        raise UserError(f"--compare needs one input size, got {side_a.img_size} and {side_b.img_size}; pass --img-size")
    settings = _settings(args, device, side_a.img_size)
    records = []
    for mode in _modes(args):
        measure = lambda batch: measure_models([side_a.model, side_b.model], mode, batch,  # noqa: E731
                                               **_measure_kwargs(args, device, side_a.img_size))
        (res_a, res_b), used, failed = run_with_backoff(measure, args.batch_size, not args.no_backoff)
        per_round = [ta / tb for ta, tb in zip(res_a["round_times_s"], res_b["round_times_s"])]
        ratio = dict(summarize(per_round), of_medians=res_b["throughput"]["median"] / res_a["throughput"]["median"])
        sides = {}
        for key, side, res in (("a", side_a, res_a), ("b", side_b, res_b)):
            sides[key] = {"label": side.spec.label, "model": side.spec.name, "model_kwargs": side.kwargs,
                          "params": (side.flop_info or {}).get("params"), "gmacs": (side.flop_info or {}).get("gmacs"),
                          "gmacs_torchprofile": (side.flop_info or {}).get("gmacs_torchprofile"),
                          "tokens_per_block": side.tokens, "throughput": res["throughput"],
                          "latency_ms": res["latency_ms"], "round_times_s": res["round_times_s"]}
        record = make_record(
            "compare", spec_b, side_b.kwargs, settings, env, side_b.flop_info, side_b.tokens,
            {"mode": mode, "batch_size": used, "oom_backoff": failed, "throughput": res_b["throughput"],
             "latency_ms": res_b["latency_ms"]},
            label_a=spec_a.label, label_b=spec_b.label, a=sides["a"], b=sides["b"], ratio=ratio,
            ratio_definition="throughput(B) / throughput(A); per-round ratios from interleaved rounds")
        _emit(record, args, records, side_b)
        print(format_compare(record), flush=True)
    return records


def collect_specs(args) -> list[ModelSpec]:
    defaults = _method_defaults(args)
    specs: list[ModelSpec] = []
    for pattern in args.model:
        specs.extend(ModelSpec(name, dict(defaults)) for name in expand_model_names([pattern]))
    if args.models_file:
        specs.extend(read_models_file(args.models_file, defaults))
    return _unique(with_run_model_kwargs(specs, args))


def with_run_model_kwargs(specs: Sequence[ModelSpec], args) -> list[ModelSpec]:
    """The run's --model-kwargs on every spec that has none of its own."""
    run_kwargs = getattr(args, "model_kwargs", None)
    if not run_kwargs:
        return list(specs)
    return [spec if spec.model_kwargs is not None else dataclasses.replace(spec, model_kwargs=dict(run_kwargs))
            for spec in specs]


def _unique(specs: Sequence[ModelSpec]) -> list[ModelSpec]:
    unique: list[ModelSpec] = []
    for spec in specs:
        if spec not in unique:  # specs hold dicts, so not hashable
            unique.append(spec)
    return unique


def run(args: argparse.Namespace) -> list[dict]:
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.data_loading is not None:
        return run_data_loading(args)
    device = resolve_device(args.device)
    args.malloc_settings = {} if args.default_malloc or device.type != "cpu" else keep_freed_memory()
    if args.malloc_settings:
        _logger.info("host malloc: freed memory kept for reuse (%s; --default-malloc to keep glibc's defaults)",
                     ", ".join(f"{k}={v}" for k, v in args.malloc_settings.items()))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as timm's benchmark; recorded in every record
    if args.batch_size is None:
        args.batch_size = 256 if device.type == "cuda" else 16
    if args.batch_size < 1:
        raise UserError("--batch-size must be >= 1")
    if args.flops_only and args.no_flops:
        raise UserError("--flops-only and --no-flops exclude each other; drop one")
    check_plot_path(args)
    defaults = _method_defaults(args)
    if args.compare:
        pairs = [tuple(with_run_model_kwargs(parse_spec(text, defaults), args) for text in args.compare)]
        if args.model or args.models_file or args.compare_baseline:
            raise UserError("--compare takes its two specs alone; drop --model / --models-file / --compare-baseline")
    elif args.compare_baseline:
        baseline = with_run_model_kwargs(parse_spec(args.compare_baseline, defaults), args)
        pairs = [(baseline, [spec]) for spec in expand_targets(collect_specs(args), args.target_gmacs)]
        if not pairs:
            raise UserError("--compare-baseline needs --model or --models-file for the models to compare")
    else:
        pairs = None
    if pairs is not None:
        for side_a, side_b in pairs:
            if len(side_a) != 1 or len(side_b) != 1:
                raise UserError("each --compare side must name exactly one model (no glob matching several)")
        check_method_flags(_unique([spec for pair in pairs for side in pair for spec in side]))
        if args.flops_only:
            raise UserError("--compare measures speed; drop --flops-only")
        env = environment_info(device, args.malloc_settings)
        records = []
        for side_a, side_b in pairs:
            records.extend(run_compare(args, side_a[0], side_b[0], device, env))
        if args.plot:  # B's throughput against B's GMACs, one line per --models-file line
            _logger.info("wrote %s (%d points)", args.plot, plot_throughput_vs_gmacs(records, args.plot))
        return records

    specs = expand_targets(collect_specs(args), args.target_gmacs)
    if not specs:
        raise UserError("name at least one model: --model NAME [NAME ...], --models-file FILE or --compare A B")
    check_method_flags(specs)
    env = environment_info(device, args.malloc_settings)
    peak = None
    if args.peak and not args.flops_only:
        peak = measure_peak_gflops(device, args.peak_size, dtype=compute_dtype(args.precision, device))
        _logger.info("%s matmul peak: %.1f GFLOP/s (n=%d)", peak["peak_dtype"], peak["peak_gflops"],
                     peak["peak_matmul_size"])
    records = run_sweep(args, specs, device, env, peak)
    print(format_table(records), flush=True)
    if peak:
        print(f"{peak['peak_dtype']} matmul peak {peak['peak_gflops']:.1f} GFLOP/s (n={peak['peak_matmul_size']}); "
              f"achieved = 2 * GMACs * images/s", flush=True)
    if args.plot:
        count = plot_throughput_vs_gmacs(records, args.plot)
        _logger.info("wrote %s (%d points)", args.plot, count)
    return records


def run_data_loading(args: argparse.Namespace) -> list[dict]:
    """--data-loading DIR: data_bench's records, written like the model records, and its table."""
    import data_bench

    if args.model or args.models_file or args.compare or args.compare_baseline or args.batch_size is not None:
        raise UserError("--data-loading measures the input pipeline alone: drop --model / --models-file / --compare "
                        '/ --batch-size (the batch size is the recipe\'s: --recipe="--batch-size N")')
    records: list[dict] = []
    for record in data_bench.run(args.data_loading, args.recipe, args.workers, args.images, args.warmup,
                                 args.rounds, env=environment_info(torch.device("cpu"))):
        _emit(record, args, records)
    print(data_bench.format_table(records), flush=True)
    return records


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    try:
        import_plugins(argv)
        args = build_parser().parse_args(argv)
        logging.getLogger().setLevel(getattr(logging, str(args.log_level).upper(), logging.INFO))
        records = run(args)
    except UserError as error:
        _logger.error("%s", error)
        return 2
    return 1 if any(r.get("error") for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
