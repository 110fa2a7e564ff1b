"""The one model factory: name + method options (+ checkpoint) -> a ready model.

Used by main.py, benchmark.py, every tool and the tests:

    from models.factory import create_model
    model = create_model("deit_small_patch16_shrink_base", options={"base_keep_rate": 0.7},
                         num_classes=10, checkpoint=ckpt, load="finetune")

* `options`: method flag values by dest (an argparse Namespace or a dict); the model's
  family turns its `kwarg=` flags into constructor kwargs, and active patch families
  (ToMe, ToFu) are applied after the weights are loaded.
* `checkpoint`: an already-read checkpoint dict (`utils.checkpoint.load_checkpoint_file`).
  When it holds the `args` a training run saved, `num_classes` and the model kwargs not
  given explicitly are taken from it.
* `load`: "strict" (resume / evaluate: every key and shape must match), "finetune"
  (everything but the classifier must match; resized position embeddings are adapted by
  the family's filter function; the classifier is dropped when its shape differs) or
  "partial" (load what fits, report the rest). Weights go through timm's pretrained
  machinery (`load_pretrained` with the state dict as the source and the family's
  `checkpoint_filter_fn`), so fine-tuning and `--pretrained` share one path.

Errors are `ModelConfigError` with one line: an unknown name lists close matches, a
checkpoint that does not fit lists the keys.
"""
from __future__ import annotations

import difflib
import importlib
import inspect
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import nn

from . import family as family_registry
from .errors import ModelConfigError

__all__ = ["create_model", "check_model_name", "load_weights", "LoadSummary", "CheckpointMismatchError",
           "saved_args", "state_dict_of", "head_keys_of", "default_input_size", "build_example"]

_logger = logging.getLogger(__name__)

_DEFAULT_HEAD_KEYS = ("head.weight", "head.bias", "head.fc.weight", "head.fc.bias", "head_dist.weight",
                      "head_dist.bias", "fc.weight", "fc.bias", "classifier.weight", "classifier.bias")


class CheckpointMismatchError(ModelConfigError):
    """The checkpoint's tensors do not fit the model; `summary` says which."""

    def __init__(self, message: str, summary: "LoadSummary"):
        super().__init__(message)
        self.summary = summary


@dataclass
class LoadSummary:
    loaded: List[str] = field(default_factory=list)
    resized: List[str] = field(default_factory=list)
    dropped: List[str] = field(default_factory=list)     # checkpoint keys not loaded (head, unexpected, mismatched)
    missing: List[str] = field(default_factory=list)     # model keys left at their initialisation
    mismatched: List[str] = field(default_factory=list)  # same key, other shape (not resized)
    unexpected: List[str] = field(default_factory=list)  # checkpoint keys the model lacks

    def line(self) -> str:
        return (f"{len(self.loaded)} loaded, {len(self.resized)} resized, {len(self.dropped)} dropped, "
                f"{len(self.missing)} missing")


def _close(name: str, options, n: int = 5) -> str:
    matches = difflib.get_close_matches(name, list(options), n=n, cutoff=0.5)
    return ", ".join(matches) if matches else "none"


def check_model_name(name: str) -> None:
    import timm

    import models  # noqa: F401  (registers the project's families)

    if not timm.is_model(name):
        raise ModelConfigError(f"unknown model {name!r}; close matches: {_close(name, timm.list_models())} "
                               f"(list names with timm.list_models('*part*'))")


def default_input_size(model_name: str) -> int:
    import timm
    cfg = timm.models.get_pretrained_cfg(model_name)
    size = getattr(cfg, "input_size", None) if cfg is not None else None
    return int(size[-1]) if size else 224


def saved_args(checkpoint) -> Dict[str, Any]:
    """The `args` a training run stored in its checkpoint (a dict), or {}."""
    if isinstance(checkpoint, dict):
        args = checkpoint.get("args")
        if isinstance(args, dict):
            return args
        if args is not None and hasattr(args, "__dict__"):
            return dict(vars(args))
    return {}


# Where checkpoints keep their weights, in the order they are looked for: this project's and
# DeiT's `model`, timm train.py's `state_dict`, `net` and `module` of other trainers, then an
# EMA copy for a file that holds only that.
STATE_DICT_KEYS = ("model", "state_dict", "net", "module", "model_ema", "state_dict_ema")
# Prefixes of wrapped models: DataParallel / DDP (`module.`), torch.compile (`_orig_mod.`).
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def state_dict_of(checkpoint) -> Dict[str, torch.Tensor]:
    """The model weights of a checkpoint: the one reader used by resume, finetune, evaluation,
    the benchmark and the tools.

    The first of `STATE_DICT_KEYS` that holds tensors, else the dict itself; only tensor
    entries are kept, and a prefix that every key carries (`module.`, `_orig_mod.`, also nested)
    is stripped. ModelConfigError when there are no weights.
    """
    if not isinstance(checkpoint, dict):
        raise ModelConfigError(f"checkpoint holds a {type(checkpoint).__name__}, expected a dict of tensors")
    tensors = {}
    for key in STATE_DICT_KEYS:
        inner = checkpoint.get(key)
        if isinstance(inner, dict):
            tensors = {k: v for k, v in inner.items() if isinstance(v, torch.Tensor)}
            if tensors:
                break
    if not tensors:
        tensors = {k: v for k, v in checkpoint.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise ModelConfigError(f"checkpoint has no weights: expected one of {', '.join(STATE_DICT_KEYS)} or a "
                               f"state dict; its top-level keys are {', '.join(sorted(map(str, checkpoint))[:8])}")
    stripped = True
    while stripped:
        stripped = False
        for prefix in WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in tensors):
                tensors = {k[len(prefix):]: v for k, v in tensors.items()}
                stripped = True
    return tensors


def _timm_module(model_name: str) -> str:
    import timm
    return timm.models.model_entrypoint(model_name).__module__


def _init_accepts(cls: type, name: str) -> bool:
    """Whether `cls(...)` takes keyword `name`: an explicit parameter somewhere along the MRO
    before an __init__ without **kwargs ends the chain."""
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        try:
            params = inspect.signature(init).parameters
        except (TypeError, ValueError):
            return True
        if name in params:
            return True
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            return False
    return False


def _accepted(model_name: str, names, model_kwargs: Dict[str, Any]) -> set:
    """Which of the trainer's generic kwargs (img_size, drop rates) this model's class takes,
    read from its constructor's signature (a meta-device build finds the class)."""
    import timm
    with torch.device("meta"):
        probe = timm.create_model(model_name, pretrained=False, **model_kwargs)
    return {name for name in names if _init_accepts(type(probe), name)}


def head_keys_of(model: nn.Module, model_name: Optional[str] = None) -> tuple:
    """Classifier keys: the model's pretrained_cfg `classifier` (timm's convention) and timm's usual names."""
    keys = list(_DEFAULT_HEAD_KEYS)
    classifier = (getattr(model, "pretrained_cfg", None) or {}).get("classifier")
    for name in ([classifier] if isinstance(classifier, str) else list(classifier or ())):
        keys += [f"{name}.weight", f"{name}.bias"]
    return tuple(dict.fromkeys(keys))


def _filter_fn(model_name: str, owner) -> Optional[Callable]:
    if owner is not None and owner.checkpoint_filter_fn is not None:
        return owner.checkpoint_filter_fn
    module = importlib.import_module(_timm_module(model_name))
    for name in ("checkpoint_filter_fn", "_checkpoint_filter_fn"):
        fn = getattr(module, name, None)
        if callable(fn):
            return fn
    return None


def _group_keys(keys, shown: int = 6) -> str:
    keys = list(keys)
    text = ", ".join(keys[:shown])
    return text + (f" (+{len(keys) - shown} more)" if len(keys) > shown else "")


def resize_pos_embed(pos_embed_checkpoint: torch.Tensor, model) -> torch.Tensor:
    """DeiT's pos-embed adaptation (what DeiT's --finetune does; timm's filters then see matching shapes): keep the model's leading (class/dist) tokens, bicubic-resize the grid.

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


def _adapt_pos_embed(state_dict: dict, model: nn.Module) -> dict:
    pos = state_dict.get("pos_embed")
    model_pos = getattr(model, "pos_embed", None)
    if (isinstance(pos, torch.Tensor) and isinstance(model_pos, torch.Tensor) and pos.dim() == 3
            and pos.shape != model_pos.shape and getattr(getattr(model, "patch_embed", None), "num_patches", None)):
        state_dict = dict(state_dict, pos_embed=resize_pos_embed(pos, model))
    return state_dict


def load_weights(model: nn.Module, state_dict: Dict[str, torch.Tensor], load: str = "strict",
                 model_name: Optional[str] = None, source: str = "checkpoint") -> LoadSummary:
    """Load `state_dict` into `model` (see the module docstring for `load`); returns what happened."""
    if load not in ("strict", "finetune", "partial"):
        raise ValueError(f"load must be 'strict', 'finetune' or 'partial', got {load!r}")
    model_state = model.state_dict()
    summary = LoadSummary()
    if load == "strict":
        summary.missing = [k for k in model_state if k not in state_dict]
        summary.unexpected = [k for k in state_dict if k not in model_state]
        summary.mismatched = [k for k in state_dict if k in model_state and state_dict[k].shape != model_state[k].shape]
        if summary.missing or summary.unexpected or summary.mismatched:
            raise CheckpointMismatchError(_mismatch_message(source, model_name, summary), summary)
        model.load_state_dict(state_dict, strict=True)
        summary.loaded = list(state_dict)
        return summary

    from timm.models import load_pretrained

    owner = family_registry.family_of_model(model_name) if model_name else None
    base_filter = _filter_fn(model_name, owner) if model_name else None
    heads = set(head_keys_of(model, model_name))
    original_shapes = {k: tuple(v.shape) for k, v in state_dict.items() if isinstance(v, torch.Tensor)}

    def checked_filter(sd, target):
        sd = _adapt_pos_embed(sd, target)
        if base_filter is not None:
            try:
                sd = base_filter(sd, target)
            except TypeError:
                sd = base_filter(sd)
        sd = dict(sd)
        # Keys the family's filter removed on purpose (e.g. attention of blocks the model lacks).
        summary.dropped += [k for k in original_shapes if k not in sd and k not in model_state]
        for key in list(sd):
            if key in heads and key in model_state and sd[key].shape != model_state[key].shape:
                summary.dropped.append(key)
                del sd[key]
        # A distillation token and head the model lacks go with the classifier (DeiT distilled -> plain).
        for key in [k for k in sd if k not in model_state and (k in heads or k == "dist_token")]:
            summary.dropped.append(key)
            del sd[key]
        summary.unexpected = [k for k in sd if k not in model_state]
        summary.mismatched = [k for k in sd if k in model_state and sd[k].shape != model_state[k].shape]
        summary.missing = [k for k in model_state if k not in sd]
        summary.resized = [k for k in sd if k in model_state and k not in summary.mismatched
                           and k in original_shapes and original_shapes[k] != tuple(sd[k].shape)]
        non_head_missing = [k for k in summary.missing if k not in heads]
        if load == "finetune" and (summary.unexpected or summary.mismatched or non_head_missing):
            raise CheckpointMismatchError(_mismatch_message(source, model_name, summary, finetune=True), summary)
        for key in summary.unexpected + summary.mismatched:
            del sd[key]
        summary.dropped += summary.unexpected + summary.mismatched
        summary.loaded = list(sd)
        return sd

    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    # The state dict is the source; timm must neither download nor drop the head itself.
    cfg.update(state_dict=dict(state_dict), source="", file=None, url=None, hf_hub_id=None,
               num_classes=getattr(model, "num_classes", cfg.get("num_classes", 0)))
    load_pretrained(model, pretrained_cfg=cfg, num_classes=cfg["num_classes"],
                    in_chans=_in_chans(model, cfg), filter_fn=checked_filter, strict=False)
    return summary


def _in_chans(model: nn.Module, cfg: dict) -> int:
    size = cfg.get("input_size") or (3,)
    return int(getattr(getattr(model, "patch_embed", None), "in_chans", None) or size[0])


def _mismatch_message(source: str, model_name: Optional[str], summary: LoadSummary, finetune: bool = False) -> str:
    parts = []
    if summary.missing:
        parts.append(f"{len(summary.missing)} model keys missing ({_group_keys(summary.missing)})")
    if summary.unexpected:
        parts.append(f"{len(summary.unexpected)} unexpected keys ({_group_keys(summary.unexpected)})")
    if summary.mismatched:
        parts.append(f"{len(summary.mismatched)} keys with other shapes ({_group_keys(summary.mismatched)})")
    target = f" {model_name}" if model_name else ""
    fix = ("pass --finetune-partial to load only what fits" if finetune
           else "check --model and its options (e.g. --done_layer)")
    return f"{source} does not fit the model{target}: {'; '.join(parts)}; {fix}"


def create_model(name: str, *, options=None, num_classes: Optional[int] = None, img_size: Optional[int] = None,
                 drop_rate: Optional[float] = None, drop_path_rate: Optional[float] = None,
                 model_kwargs: Optional[Dict[str, Any]] = None, checkpoint=None, load: str = "strict",
                 apply_patches: bool = True, source: str = "checkpoint",
                 on_ignored: Optional[Callable[[List[str]], None]] = None) -> nn.Module:
    """Build `name` with its family's kwargs from `options`, load `checkpoint`, apply patches.

    Returns the model; after loading, `model.load_summary` (a LoadSummary) says what was loaded.
    """
    import timm

    check_model_name(name)
    options = options if options is not None else {}
    saved = saved_args(checkpoint) if checkpoint is not None else {}
    family_registry.check_all_options(name, options)

    kwargs, ignored = family_registry.model_kwargs(name, options)
    if saved and saved.get("model") == name:
        saved_kwargs, _ = family_registry.model_kwargs(name, saved)
        for key, value in saved_kwargs.items():
            kwargs.setdefault(key, value)
        for key, value in dict(saved.get("model_kwargs") or {}).items():
            kwargs.setdefault(key, value)
    if ignored and on_ignored is not None:
        on_ignored(ignored)
    if num_classes is None and saved.get("model") == name:
        num_classes = _saved_num_classes(checkpoint)
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    kwargs.update(model_kwargs or {})
    generic = {"drop_rate": drop_rate, "drop_path_rate": drop_path_rate,
               "img_size": img_size if img_size is not None and img_size != default_input_size(name) else None}
    generic = {k: v for k, v in generic.items() if v is not None and k not in kwargs}
    if generic:
        try:
            accepted = _accepted(name, list(generic), kwargs)
        except TypeError as err:
            raise ModelConfigError(f"model {name} rejected its arguments ({err}); check --model-kwargs "
                                   f"and the method flags") from None
        for key, value in generic.items():
            if key in accepted:
                kwargs[key] = value
            else:
                _logger.info(f"{name} takes no {key}; built without it ({key}={value} not applied)")

    try:
        model = timm.create_model(name, pretrained=False, **kwargs)
    except TypeError as err:
        if "unexpected keyword argument" in str(err):
            raise ModelConfigError(f"model {name} rejected its arguments ({err}); check --model-kwargs "
                                   f"and the method flags") from None
        raise
    if checkpoint is not None:
        model.load_summary = load_weights(model, state_dict_of(checkpoint), load=load, model_name=name,
                                          source=source)
    if apply_patches:
        family_registry.apply_patches(model, name, options)
    return model


def build_example(example: "family_registry.Example", num_classes: int = 10, overrides: Optional[dict] = None,
                  **kwargs) -> nn.Module:
    """The model an `Example` describes, built as main.py builds it (flags -> options, kwargs,
    patches), with random weights; how the parametrized tests get every family's models.
    `overrides`: option values (flag dests) or constructor kwargs replacing the Example's."""
    options = family_registry.example_options(example)
    model_kwargs = dict(example.kwargs)
    for key, value in (overrides or {}).items():
        (options if key in options else model_kwargs)[key] = value
    return create_model(example.model, options=options, num_classes=num_classes, img_size=example.input_size,
                        model_kwargs=model_kwargs, **kwargs)


def _saved_num_classes(checkpoint) -> Optional[int]:
    state = state_dict_of(checkpoint)
    for key in ("head.weight", "head.fc.weight", "classifier.weight", "fc.weight"):
        value = state.get(key)
        if isinstance(value, torch.Tensor) and value.dim() == 2:
            return int(value.shape[0])
    return None
