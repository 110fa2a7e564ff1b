"""LTMP: "Learned Thresholds Token Merging and Pruning for Vision Transformers"
(Bonnaerens & Dambre, TMLR 2023, arXiv 2307.10780).

Two forwards over the same timm `VisionTransformer` (same modules, same state dict: timm
ViT keys plus `blocks.{i}.merge_masker.threshold` and `blocks.{i}.prune_masker.threshold`,
fp32 parameters of shape [1]):

* `LTMPVisionTransformer` (`ltmp_*`, the masked training model): nothing is removed; every
  block merges and prunes by multiplying a `[B, N]` mask into the attention, with
  straight-through (STE) threshold decisions so the thresholds learn. `model.masks` holds
  one post-block mask per block after each forward (the FLOPs regulariser reads them).
* `InferenceLTMPVisionTransformer` (`inference_ltmp_*`): tokens are really merged and
  removed. Unlike the official code (correct only when every sample keeps the same number
  of tokens, hence its batch size 1), samples that keep different numbers are padded at
  the end of the sequence and the padding is masked out of attention, importance and
  matching, so each sample's logits equal those of the sample run alone.

Changes of a block relative to timm's `Block` (both forwards):

* attention is computed explicitly (the importance score needs the probabilities), with
  the proportional-attention bias `log(size)` per key, `q` scaled before `q k^T`;
* between the attention residual and the MLP, A tokens (even positions) whose best cosine
  match among the B tokens (odd positions; head-mean keys as metric) exceeds the merge
  threshold are merged into it size-weighted (any number per block, several into one B
  token), then tokens whose importance (mean attention received over heads and query rows;
  class token +inf) is not above the prune threshold are dropped;
* LayerScale is applied as in timm.

Per-forward state (sizes, masks, padding) lives in one `LTMPState` made by the model's
forward; blocks keep timm's `Tensor -> Tensor` signature. A block called outside an LTMP
forward runs as a plain timm block. Docs: `docs/methods/ltmp.md`.

Training support used by the trainer: `flops_ratio`, `LTMPCriterion`,
`threshold_param_groups`, `clamp_thresholds`, `inference_twin` and `realised_flops_ratio`.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import math
from functools import partial
from numbers import Real
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from timm.models import build_model_with_cfg, generate_default_cfgs, get_pretrained_cfg, register_model
from timm.models.mobilevit import model_cfgs as mobilevit_cfgs
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn as vit_filter_fn
from torch import nn

from . import family as _family
from .errors import ModelConfigError
from .gmacs_search import rng_state, set_rng_state
from .hooks import MethodHooks
from .ltmp_hybrid import (_INFERENCE_CLASSES, InferenceLTMPByobNet, InferenceLTMPEfficientVit, LTMPByobNet,
                          LTMPEfficientVit, _LTMPHybridMixin)
from .ltmp_layers import (InferenceLTMPBlock, InferenceLTMPVisionTransformer, LTMPBlock, LTMPState,
                          LTMPVisionTransformer, ThresholdMasker, _check_tau, _ThresholdAPI, is_threshold_key,
                          ltmp_attention, masked_merge, merge_prune_compact, softmax_with_mask)

__all__ = [
    "LTMPVisionTransformer", "InferenceLTMPVisionTransformer", "LTMPBlock", "InferenceLTMPBlock",
    "ThresholdMasker", "LTMPState", "softmax_with_mask", "ltmp_attention", "masked_merge", "merge_prune_compact",
    "flops_ratio", "LTMPCriterion", "threshold_param_groups", "clamp_thresholds", "inference_twin",
    "realised_flops_ratio", "checkpoint_filter_fn", "is_threshold_key",
]

_logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# Training: FLOPs regulariser, parameter groups, clamping, realised FLOPs
# ---------------------------------------------------------------------------------------------

def flops_ratio(masks: Sequence[torch.Tensor], num_tokens: int, embed_dim: int) -> torch.Tensor:
    """The FLOPs ratio of spec section 6 (tools/train.py of the official code).

    masks: L post-block masks `[B, N]`; `m_0 = 1`, `m_{i+1} = mean(masks[i])` over batch and
    tokens. Per block: qkv + proj and attention on the tokens entering it, the MLP on the
    tokens leaving it, relative to the unreduced block, averaged over the L blocks.
    """
    if not masks:
        raise ModelConfigError("flops_ratio needs the masks of at least one block (run the masked model first)")
    layers, n, d = len(masks), float(num_tokens), float(embed_dim)
    kept = [torch.ones((), device=masks[0].device, dtype=masks[0].dtype)] + [m.mean() for m in masks]
    total = torch.zeros((), device=masks[0].device, dtype=masks[0].dtype)
    for i in range(layers):
        block = 2 * (kept[i] * n) * d ** 2 + (kept[i] * n) ** 2 * d + 4 * (kept[i + 1] * n) * d ** 2
        total = total + (1 / layers) * block / (6 * n * d ** 2 + n ** 2 * d)
    return total


def model_flops_ratio(model: nn.Module) -> Callable[[Sequence[torch.Tensor]], torch.Tensor]:
    """masks -> FLOPs ratio for `model`: the spec's ViT formula, or the hybrid blocks' costs."""
    own = getattr(model, "ltmp_flops_ratio", None)
    if own is not None:
        return own
    embed_dim = int(model.embed_dim)
    return lambda masks: flops_ratio(masks, masks[0].shape[-1], embed_dim)


def _check_fraction(value, name: str, low_open: bool = True) -> float:
    ok = isinstance(value, Real) and not isinstance(value, bool) and (0 < value <= 1 if low_open else 0 <= value <= 1)
    if not ok:
        raise ModelConfigError(f"LTMP {name} must be in {'(0, 1]' if low_open else '[0, 1]'}, got {value!r}; "
                               f"e.g. --reduction-target 0.75")
    return float(value)


class LTMPCriterion(nn.Module):
    """`cls_scale * base + reg_scale * (flops_ratio - reduction_target) ** 2` (official train.py).

    Called as `criterion(samples, outputs, targets)`. The masks come from the output dict
    (`{"logits", "masks"}`: construction switches the model to returning it in training) or,
    for other output forms, from `model.masks`. With `reg_scale == 0` the loss is the base loss
    alone, as in the official code. `last` holds the detached terms of the latest call
    (`cls_loss`, `reg_loss`, `flops_ratio`) for logging.
    """

    def __init__(self, base_criterion: nn.Module, model: nn.Module, reduction_target: float = 0.75,
                 reg_scale: float = 10.0, cls_scale: float = 1.0):
        super().__init__()
        self.base_criterion = base_criterion
        self.reduction_target = _check_fraction(reduction_target, "reduction_target")
        for name, value in (("reg_scale", reg_scale), ("cls_scale", cls_scale)):
            if isinstance(value, bool) or not isinstance(value, Real) or value < 0 or not math.isfinite(value):
                flag = name.replace("_", "-")
                raise ModelConfigError(f"LTMP {name} must be a number >= 0, got {value!r}; e.g. --{flag} 10")
        self.reg_scale = float(reg_scale)
        self.cls_scale = float(cls_scale)
        if not hasattr(model, "masks"):
            raise ModelConfigError(f"the LTMP loss needs a masked ltmp_* model, got {type(model).__name__}")
        # a plain reference, not a submodule (the criterion must not own the model's parameters)
        self._masks_of = partial(getattr, model, "masks")
        self._ratio_of = model_flops_ratio(model)
        if hasattr(model, "set_return_masks"):
            model.set_return_masks(True)
        self.last: Dict[str, float] = {}

    def forward(self, samples, outputs, targets):
        base_loss = self.base_criterion(samples, outputs, targets)
        if self.reg_scale <= 0:
            return base_loss
        masks = outputs["masks"] if isinstance(outputs, dict) and "masks" in outputs else self._masks_of()
        ratio = self._ratio_of(masks)
        reg_loss = (ratio - self.reduction_target) ** 2
        self.last = {"cls_loss": float(base_loss.detach()), "reg_loss": float(reg_loss.detach()),
                     "flops_ratio": float(ratio.detach())}
        return self.cls_scale * base_loss + self.reg_scale * reg_loss


def threshold_param_groups(model: nn.Module, lrs: Sequence[float], weight_decay: float = 0.0) -> List[dict]:
    """Optimizer groups of the official recipe; sets `requires_grad` accordingly.

    lrs: 1 value (both thresholds), 2 (prune, merge) or 3 (prune, merge, every other
    non-norm weight, which is then trained). Parameters whose name contains "norm" are frozen
    and left out; the backbone is frozen and left out unless 3 values are given.
    """
    lrs = [lrs] if isinstance(lrs, Real) else list(lrs)
    if not 1 <= len(lrs) <= 3 or not all(isinstance(v, Real) and not isinstance(v, bool) and v >= 0 for v in lrs):
        raise ModelConfigError(f"LTMP takes 1-3 learning rates (--lr PRUNE_LR MERGE_LR [REST_LR]), got {lrs!r}; "
                               f"e.g. --lr 0.000005 0.005")
    prune_lr, merge_lr = (lrs[0], lrs[0]) if len(lrs) == 1 else (lrs[0], lrs[1])
    train_rest = len(lrs) == 3
    groups = {"prune": [], "merge": [], "rest": []}
    for name, param in model.named_parameters():
        if "masker" in name:
            param.requires_grad_(True)
            groups["prune" if "prune" in name else "merge"].append(param)
        elif "norm" in name:
            param.requires_grad_(False)
        else:
            param.requires_grad_(train_rest)
            if train_rest:
                groups["rest"].append(param)
    if not groups["prune"] or not groups["merge"]:
        raise ModelConfigError(f"{type(model).__name__} has no LTMP thresholds; use an ltmp_* model")
    result = [dict(params=groups["prune"], lr=float(prune_lr), weight_decay=weight_decay, name="prune_thresholds"),
              dict(params=groups["merge"], lr=float(merge_lr), weight_decay=weight_decay, name="merge_thresholds")]
    if train_rest:
        result.append(dict(params=groups["rest"], lr=float(lrs[2]), weight_decay=weight_decay, name="backbone"))
    return result


@torch.no_grad()
def clamp_thresholds(model: nn.Module) -> None:
    """Clamp every threshold to [0, 1] (after each optimizer step when reg_scale > 0)."""
    for name, param in model.named_parameters():
        if "masker" in name:
            param.clamp_(0.0, 1.0)


def _twin_classes(model: nn.Module):
    for masked_cls, classes in _INFERENCE_CLASSES.items():
        if isinstance(model, masked_cls):
            return classes
    raise ModelConfigError(f"{type(model).__name__} is not an LTMP model; pass an ltmp_* model")


def inference_twin(model: nn.Module) -> nn.Module:
    """The `inference_` model with `model`'s architecture and weights (strict load), in eval mode."""
    kwargs = getattr(model, "ltmp_kwargs", None)
    if kwargs is None:
        raise ModelConfigError(f"{type(model).__name__} is not an LTMP model; pass an ltmp_* model")
    inference_cls, _ = _twin_classes(model)
    twin = inference_cls(**(dict(kwargs, weight_init="skip") if issubclass(inference_cls, VisionTransformer)
                            else kwargs))
    param = next(model.parameters())
    twin.to(device=param.device, dtype=param.dtype)
    twin.load_state_dict(model.state_dict(), strict=True)
    twin.pretrained_cfg = copy.deepcopy(getattr(model, "pretrained_cfg", {}))
    return twin.eval()


def _plain_twin(model: nn.Module) -> nn.Module:
    """The unreduced timm backbone with `model`'s weights (thresholds dropped)."""
    kwargs = {k: v for k, v in model.ltmp_kwargs.items() if k not in ("tau", "merge_threshold", "prune_threshold")}
    _, plain_cls = _twin_classes(model)
    plain = plain_cls(**(dict(kwargs, weight_init="skip") if plain_cls is VisionTransformer else kwargs))
    param = next(model.parameters())
    plain.to(device=param.device, dtype=param.dtype)
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not is_threshold_key(k)}, strict=True)
    return plain.eval()


def _images(source, max_images: int) -> Iterable[torch.Tensor]:
    """One `[1, C, H, W]` image at a time from a tensor `[B, C, H, W]` or a loader of (images, ...)."""
    seen = 0
    batches = [source] if isinstance(source, torch.Tensor) else source
    for batch in batches:
        images = batch if isinstance(batch, torch.Tensor) else batch[0]
        for image in images:
            if seen >= max_images:
                return
            seen += 1
            yield image[None]


@torch.no_grad()
def realised_flops_ratio(model: nn.Module, images, device=None, max_images: int = 1000) -> dict:
    """Realised FLOPs of the inference twin of a (trained) masked LTMP model.

    images: a tensor `[B, C, H, W]` or a loader yielding `(images, targets)`; up to
    `max_images` are counted one at a time (batch 1, as the official end-of-training report).
    MACs are counted with the project's fvcore counter (`flops.py`) on the real images, and
    compared with the unreduced timm ViT of the same weights. Returns `gmacs` (mean over the
    images), `gmacs_unreduced`, `flops_ratio` (their quotient), `images`, `counter` and
    `tokens_after_block` (mean tokens each block keeps).
    """
    from . import flops  # fvcore is imported only when a count is asked for

    device = torch.device(device) if device is not None else next(model.parameters()).device
    twin = inference_twin(model).to(device)
    plain = _plain_twin(model).to(device)
    macs, tokens = [], []
    example = None
    for image in _images(images, max_images):
        image = image.to(device=device, dtype=next(twin.parameters()).dtype)
        example = image if example is None else example
        count, _ = flops.fvcore_macs(twin, image)
        macs.append(count)
        twin(image)
        tokens.append([float(t.float().mean()) for t in twin.ltmp_info["tokens"]])
    if not macs:
        raise ModelConfigError("realised_flops_ratio got no images; pass a non-empty loader or tensor")
    unreduced, _ = flops.fvcore_macs(plain, example)
    mean_macs = sum(macs) / len(macs)
    depth = len(tokens[0])
    return {
        "gmacs": mean_macs / 1e9,
        "gmacs_unreduced": unreduced / 1e9,
        "flops_ratio": mean_macs / unreduced,
        "images": len(macs),
        "counter": "fvcore",
        "tokens_after_block": [sum(t[i] for t in tokens) / len(tokens) for i in range(depth)],
    }


# ---------------------------------------------------------------------------------------------
# Weights and registration
# ---------------------------------------------------------------------------------------------

def checkpoint_filter_fn(state_dict: dict, model: nn.Module) -> dict:
    """timm backbone checkpoints (and LTMP ones) -> this model: for ViTs timm's ViT filter (npz,
    resized position embeddings; the hybrids' timm modules have none), then thresholds the
    checkpoint lacks take the model's init values."""
    thresholds = {k: v for k, v in state_dict.items() if is_threshold_key(k)}
    state_dict = {k: v for k, v in state_dict.items() if not is_threshold_key(k)}
    if isinstance(model, VisionTransformer):
        state_dict = vit_filter_fn(state_dict, model)
    own = model.state_dict()
    for key, value in own.items():
        if is_threshold_key(key):
            state_dict[key] = thresholds.get(key, value.detach().clone())
    return state_dict


_BASES = {
    "vit_tiny_patch16_224": dict(patch_size=16, embed_dim=192, depth=12, num_heads=3),
    "vit_small_patch16_224": dict(patch_size=16, embed_dim=384, depth=12, num_heads=6),
    "vit_base_patch16_224": dict(patch_size=16, embed_dim=768, depth=12, num_heads=12),
    "vit_large_patch16_224": dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16),
    "deit_tiny_patch16_224": dict(patch_size=16, embed_dim=192, depth=12, num_heads=3),
    "deit_small_patch16_224": dict(patch_size=16, embed_dim=384, depth=12, num_heads=6),
    "deit_base_patch16_224": dict(patch_size=16, embed_dim=768, depth=12, num_heads=12),
    "deit_base_patch16_384": dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, img_size=384),
}


def _inherited_cfg(name: str, base: str) -> Tuple[str, dict]:
    """("<name>.<tag>", cfg): the base model's preprocessing and hub weights (`--pretrained`
    starts from the timm ViT/DeiT, thresholds at their init values, as the official code)."""
    cfg = get_pretrained_cfg(base)
    fields = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("architecture", "tag")}
    return f"{name}.{cfg.tag}", fields


_HYBRID_BASES = {
    "mobilevit_xs": dict(model_cfg=mobilevit_cfgs["mobilevit_xs"], feature_cfg=dict(flatten_sequential=True)),
    "mobilevit_s": dict(model_cfg=mobilevit_cfgs["mobilevit_s"], feature_cfg=dict(flatten_sequential=True)),
    "efficientvit_b1": dict(widths=(16, 32, 64, 128, 256), depths=(1, 2, 3, 3, 4), head_dim=16,
                            head_widths=(1536, 1600)),
}

default_cfgs = generate_default_cfgs(dict(
    [_inherited_cfg(f"ltmp_{base}", base) for base in _BASES if base != "deit_base_patch16_384"]
    + [_inherited_cfg(f"inference_ltmp_{base}", base) for base in _BASES]
    + [_inherited_cfg(f"{prefix}ltmp_{base}", base) for prefix in ("", "inference_") for base in _HYBRID_BASES]))


def _create(model_cls, variant: str, pretrained: bool = False, **kwargs):
    return build_model_with_cfg(model_cls, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn, **kwargs)


def _create_hybrid(model_cls, variant: str, base: str, pretrained: bool = False, **kwargs):
    """A hybrid LTMP model as timm builds `base` (its cfg, feature cfg and kwargs)."""
    args = dict(_HYBRID_BASES[base])
    model_cfg, feature_cfg = args.pop("model_cfg", None), dict(args.pop("feature_cfg", {}))
    if base.startswith("efficientvit"):
        feature_cfg = dict(flatten_sequential=True, out_indices=kwargs.pop("out_indices", (0, 1, 2, 3)))
    return build_model_with_cfg(model_cls, variant, pretrained, model_cfg=model_cfg, feature_cfg=feature_cfg,
                                pretrained_filter_fn=checkpoint_filter_fn, **dict(args, **kwargs))


@register_model
def ltmp_mobilevit_xs(pretrained: bool = False, **kwargs) -> LTMPByobNet:
    return _create_hybrid(LTMPByobNet, "ltmp_mobilevit_xs", "mobilevit_xs", pretrained, **kwargs)


@register_model
def ltmp_mobilevit_s(pretrained: bool = False, **kwargs) -> LTMPByobNet:
    return _create_hybrid(LTMPByobNet, "ltmp_mobilevit_s", "mobilevit_s", pretrained, **kwargs)


@register_model
def ltmp_efficientvit_b1(pretrained: bool = False, **kwargs) -> LTMPEfficientVit:
    return _create_hybrid(LTMPEfficientVit, "ltmp_efficientvit_b1", "efficientvit_b1", pretrained, **kwargs)


@register_model
def inference_ltmp_mobilevit_xs(pretrained: bool = False, **kwargs) -> InferenceLTMPByobNet:
    return _create_hybrid(InferenceLTMPByobNet, "inference_ltmp_mobilevit_xs", "mobilevit_xs", pretrained, **kwargs)


@register_model
def inference_ltmp_mobilevit_s(pretrained: bool = False, **kwargs) -> InferenceLTMPByobNet:
    return _create_hybrid(InferenceLTMPByobNet, "inference_ltmp_mobilevit_s", "mobilevit_s", pretrained, **kwargs)


@register_model
def inference_ltmp_efficientvit_b1(pretrained: bool = False, **kwargs) -> InferenceLTMPEfficientVit:
    return _create_hybrid(InferenceLTMPEfficientVit, "inference_ltmp_efficientvit_b1", "efficientvit_b1",
                          pretrained, **kwargs)


@register_model
def ltmp_vit_tiny_patch16_224(pretrained: bool = False, **kwargs) -> LTMPVisionTransformer:
    model_args = dict(_BASES["vit_tiny_patch16_224"])
    return _create(LTMPVisionTransformer, "ltmp_vit_tiny_patch16_224", pretrained, **dict(model_args, **kwargs))


@register_model
def ltmp_vit_small_patch16_224(pretrained: bool = False, **kwargs) -> LTMPVisionTransformer:
    model_args = dict(_BASES["vit_small_patch16_224"])
    return _create(LTMPVisionTransformer, "ltmp_vit_small_patch16_224", pretrained, **dict(model_args, **kwargs))


@register_model
def ltmp_vit_base_patch16_224(pretrained: bool = False, **kwargs) -> LTMPVisionTransformer:
    model_args = dict(_BASES["vit_base_patch16_224"])
    return _create(LTMPVisionTransformer, "ltmp_vit_base_patch16_224", pretrained, **dict(model_args, **kwargs))


@register_model
def ltmp_vit_large_patch16_224(pretrained: bool = False, **kwargs) -> LTMPVisionTransformer:
    model_args = dict(_BASES["vit_large_patch16_224"])
    return _create(LTMPVisionTransformer, "ltmp_vit_large_patch16_224", pretrained, **dict(model_args, **kwargs))


@register_model
def ltmp_deit_tiny_patch16_224(pretrained: bool = False, **kwargs) -> LTMPVisionTransformer:
    model_args = dict(_BASES["deit_tiny_patch16_224"])
    return _create(LTMPVisionTransformer, "ltmp_deit_tiny_patch16_224", pretrained, **dict(model_args, **kwargs))


@register_model
def ltmp_deit_small_patch16_224(pretrained: bool = False, **kwargs) -> LTMPVisionTransformer:
    model_args = dict(_BASES["deit_small_patch16_224"])
    return _create(LTMPVisionTransformer, "ltmp_deit_small_patch16_224", pretrained, **dict(model_args, **kwargs))


@register_model
def ltmp_deit_base_patch16_224(pretrained: bool = False, **kwargs) -> LTMPVisionTransformer:
    model_args = dict(_BASES["deit_base_patch16_224"])
    return _create(LTMPVisionTransformer, "ltmp_deit_base_patch16_224", pretrained, **dict(model_args, **kwargs))


@register_model
def inference_ltmp_vit_tiny_patch16_224(pretrained: bool = False, **kwargs) -> InferenceLTMPVisionTransformer:
    model_args = dict(_BASES["vit_tiny_patch16_224"])
    return _create(InferenceLTMPVisionTransformer, "inference_ltmp_vit_tiny_patch16_224", pretrained,
                   **dict(model_args, **kwargs))


@register_model
def inference_ltmp_vit_small_patch16_224(pretrained: bool = False, **kwargs) -> InferenceLTMPVisionTransformer:
    model_args = dict(_BASES["vit_small_patch16_224"])
    return _create(InferenceLTMPVisionTransformer, "inference_ltmp_vit_small_patch16_224", pretrained,
                   **dict(model_args, **kwargs))


@register_model
def inference_ltmp_vit_base_patch16_224(pretrained: bool = False, **kwargs) -> InferenceLTMPVisionTransformer:
    model_args = dict(_BASES["vit_base_patch16_224"])
    return _create(InferenceLTMPVisionTransformer, "inference_ltmp_vit_base_patch16_224", pretrained,
                   **dict(model_args, **kwargs))


@register_model
def inference_ltmp_vit_large_patch16_224(pretrained: bool = False, **kwargs) -> InferenceLTMPVisionTransformer:
    model_args = dict(_BASES["vit_large_patch16_224"])
    return _create(InferenceLTMPVisionTransformer, "inference_ltmp_vit_large_patch16_224", pretrained,
                   **dict(model_args, **kwargs))


@register_model
def inference_ltmp_deit_tiny_patch16_224(pretrained: bool = False, **kwargs) -> InferenceLTMPVisionTransformer:
    model_args = dict(_BASES["deit_tiny_patch16_224"])
    return _create(InferenceLTMPVisionTransformer, "inference_ltmp_deit_tiny_patch16_224", pretrained,
                   **dict(model_args, **kwargs))


@register_model
def inference_ltmp_deit_small_patch16_224(pretrained: bool = False, **kwargs) -> InferenceLTMPVisionTransformer:
    model_args = dict(_BASES["deit_small_patch16_224"])
    return _create(InferenceLTMPVisionTransformer, "inference_ltmp_deit_small_patch16_224", pretrained,
                   **dict(model_args, **kwargs))


@register_model
def inference_ltmp_deit_base_patch16_224(pretrained: bool = False, **kwargs) -> InferenceLTMPVisionTransformer:
    model_args = dict(_BASES["deit_base_patch16_224"])
    return _create(InferenceLTMPVisionTransformer, "inference_ltmp_deit_base_patch16_224", pretrained,
                   **dict(model_args, **kwargs))


@register_model
def inference_ltmp_deit_base_patch16_384(pretrained: bool = False, **kwargs) -> InferenceLTMPVisionTransformer:
    model_args = dict(_BASES["deit_base_patch16_384"])
    return _create(InferenceLTMPVisionTransformer, "inference_ltmp_deit_base_patch16_384", pretrained,
                   **dict(model_args, **kwargs))


# ---------------------------------------------------------------------------------------------
# Method family: the official recipe's flags, loss, optimizer groups, clamping and FLOPs report
# ---------------------------------------------------------------------------------------------

def _is_masked(model: nn.Module) -> bool:
    return isinstance(model, LTMPVisionTransformer) or (isinstance(model, _LTMPHybridMixin) and model.masked)


def _family_check_options(options) -> None:
    _check_fraction(options.reduction_target, "reduction_target")
    for name in ("reg_scale", "cls_scale"):
        value = getattr(options, name)
        if value is None or value < 0 or not math.isfinite(value):
            raise ModelConfigError(f"--{name.replace('_', '-')} must be a number >= 0, got {value!r}")
    if options.tau is not None:
        _check_tau(options.tau)
    if options.ltmp_flops_images is not None and options.ltmp_flops_images < 0:
        raise ModelConfigError(f"--ltmp-flops-images must be >= 0 (0: no report), got {options.ltmp_flops_images}")


class LTMPHooks(MethodHooks):
    """The masked models' recipe: the FLOPs-regularised loss, threshold-only parameter groups,
    thresholds clamped after each step, the realised FLOPs ratio of the inference twin at the
    end; the thresholds (and the masks' FLOPs ratio) in progress lines for every LTMP model."""

    def wrap_criterion(self, criterion: nn.Module, model: nn.Module) -> nn.Module:
        if not _is_masked(model):
            return criterion
        options = self.options
        return LTMPCriterion(criterion, model, reduction_target=options.reduction_target,
                             reg_scale=options.reg_scale, cls_scale=options.cls_scale)

    def param_groups(self, model: nn.Module, lrs: List[float]) -> Optional[list]:
        if not _is_masked(model):
            return None  # inference models are not trained by the recipe: the trainer's default groups
        return threshold_param_groups(model, lrs, weight_decay=self.options.weight_decay or 0.0)

    def after_optimizer_step(self, model: nn.Module) -> None:
        if _is_masked(model) and (self.options.reg_scale or 0) > 0:
            clamp_thresholds(model)

    def ddp_find_unused_parameters(self, model: nn.Module) -> bool:
        # with --reg-scale 0 the last block's thresholds reach no loss term
        return _is_masked(model)

    def log_state(self, model: nn.Module) -> Dict[str, float]:
        if not isinstance(model, _ThresholdAPI):
            return {}
        thresholds = model.thresholds()
        state = {"merge_thr": sum(thresholds["merge"]) / len(thresholds["merge"]),
                 "prune_thr": sum(thresholds["prune"]) / len(thresholds["prune"])}
        masks = getattr(model, "masks", None)
        if masks:
            state["flops_r"] = float(model_flops_ratio(model)([m.detach() for m in masks]))
        return state

    def report(self, model: nn.Module, context) -> Dict[str, object]:
        return _family_report(model, self.options, context)


def _sampled_images(loader, count: int, seed: int = 0) -> Iterable[torch.Tensor]:
    """`count` images spread over the loader's dataset (seeded), else the loader's first ones."""
    dataset = getattr(loader, "dataset", None)
    try:
        size = len(dataset)
    except TypeError:
        size = None
    if size:
        order = torch.randperm(size, generator=torch.Generator().manual_seed(seed))[:count]
        return (dataset[int(i)][0][None] for i in order)
    return _images(loader, count)


def _family_report(model: nn.Module, options, context) -> Dict[str, object]:
    if not _is_masked(model) or not options.ltmp_flops_images:
        return {}
    result = realised_flops_ratio(model, _sampled_images(context.data_loader, options.ltmp_flops_images),
                                  context.device, max_images=options.ltmp_flops_images)
    result["thresholds"] = model.thresholds()
    _logger.info(f"LTMP inference model with the learned thresholds: {result['gmacs']:.4f} GMACs vs "
                 f"{result['gmacs_unreduced']:.4f} unreduced = FLOPs ratio {result['flops_ratio']:.4f} "
                 f"(fvcore, {result['images']} images, batch 1)")
    return result


# --ltmp-threshold auto: the prune threshold P is searched on u in [0, 1] with P = THRESHOLD_OF(u),
# log-spaced (importances are ~1/T: 0.005 for 196 tokens) and decreasing, so GMACs grow with u.
_SEARCH_DECADES = 5


def threshold_of(u: float) -> float:
    """The prune threshold for search position u in [0, 1]: 1 at u = 0 (strongest), 0 at u = 1 (none)."""
    return round((10 ** (_SEARCH_DECADES * (1.0 - u)) - 1.0) / (10 ** _SEARCH_DECADES - 1.0), 9)


def search_threshold(build, target: float, gmacs_of) -> Tuple[float, float]:
    """`--ltmp-threshold auto --target-gmacs G` for inference_ltmp_* models.

    The rule: every prune threshold P, merge thresholds as built/loaded (`--ltmp-merge-threshold`
    fixes them too); bisection (`family.search_continuous`) on the log-spaced position u of P.
    LTMP's GMACs depend on the input: every candidate is built and counted from one RNG state,
    the one the caller's own next build and count start from (the state is rewound after each
    candidate), so all candidates are compared on the same input image - `flops.count_flops`'
    `torch.randn(1, 3, H, W)`, drawn after `--seed` in main.py - and on the same weights when they
    are random (benchmark.py), and the caller's count of the chosen value reproduces the search's.
    Returns (P, GMACs); targets outside [GMACs(P=1), GMACs(P=0)] raise ModelConfigError.
    """
    saved: List[tuple] = []
    evaluated: List[Tuple[float, float]] = []

    def build_at(u: float):
        saved.append(rng_state())
        evaluated.append((u, math.nan))
        return build(threshold_of(u))

    def count(model) -> float:
        try:
            gmacs = gmacs_of(model)
        finally:
            set_rng_state(saved.pop())
        evaluated[-1] = (evaluated[-1][0], gmacs)
        if len(evaluated) > 2 and abs(gmacs - target) <= _SEARCH_STOP * target:
            raise _CloseEnough()
        return gmacs

    try:
        u, gmacs = _family.search_continuous(0.0, 1.0, build_at, target, count, iterations=24, decimals=7)
    except _CloseEnough:  # within 0.1 %: the remaining bisection steps cannot matter
        u, gmacs = evaluated[-1]
    return threshold_of(u), gmacs


_SEARCH_STOP = 1e-3


class _CloseEnough(Exception):
    """Ends the threshold bisection early (caught in `search_threshold`)."""


def _examples():
    """Every LTMP model: ViTs tiny at 32 px, hybrids at 64 px (EfficientViT narrowed); the masked models
    train their thresholds (official lrs), the inference ones with the trainer's default groups."""
    import timm

    tiny_vit = dict(depth=2, embed_dim=32, num_heads=2, patch_size=8)
    narrow_efficientvit = dict(widths=(8, 8, 16, 16, 32), depths=(1, 1, 1, 2, 2), head_dim=8, head_widths=(32, 32))
    compiled = {"ltmp_deit_tiny_patch16_224": dict(depth=3), "inference_ltmp_deit_tiny_patch16_224": dict(depth=3),
                "ltmp_efficientvit_b1": {}}
    found = []
    for name in timm.list_models(module=__name__.rsplit(".", 1)[-1]):
        base = name.split("ltmp_", 1)[1]
        kwargs, size = (narrow_efficientvit, 64) if base.startswith("efficientvit") else (
            ({}, 64) if base.startswith("mobilevit") else (tiny_vit, 32))
        flags = ("--ltmp-flops-images", "2") + (("--lr", "0.000005", "0.005") if name.startswith("ltmp_") else ())
        modes = () if name not in compiled else (("eval",) if name.startswith("inference_") else ("eval", "train"))
        found.append(_family.Example(name, model=name, kwargs=dict(kwargs, **compiled.get(name, {})), flags=flags,
                                     input_size=size, compile=modes, invalid=dict(tau=-1.0)))
    return tuple(found)


FAMILY = _family.register_family(_family.MethodFamily(
    name="ltmp",
    title="LTMP: learned thresholds token merging and pruning",
    owns=_family.models_of(__name__),
    flags=(
        _family.Flag("--reduction-target", type=float, default=0.75, metavar="RATIO",
                     help="FLOPs ratio the regulariser aims at (official default 0.75)"),
        _family.Flag("--reg-scale", type=float, default=10.0,
                     help="weight of the FLOPs regulariser (0: classification loss alone, no clamping)"),
        _family.Flag("--cls-scale", type=float, default=1.0, help="weight of the classification loss"),
        _family.Flag("--tau", type=float, default=0.5, kwarg="tau",
                     help="sigmoid temperature of the threshold masks (official train.py 0.5; the model's own "
                          "default is 0.1); only gradients depend on it"),
        _family.Flag("--ltmp-threshold", type=_family.auto_or(float), kwarg="ltmp_threshold", metavar="P",
                     help="inference_ltmp_* models: set every prune threshold to P in [0, 1] (merge thresholds as "
                          "built or loaded), also over a loaded checkpoint's learned ones; 'auto' with "
                          "--target-gmacs G searches P (counted on the run's seeded random input image)"),
        _family.Flag("--ltmp-merge-threshold", type=float, kwarg="ltmp_merge_threshold", metavar="M",
                     help="inference_ltmp_* models: set every merge threshold to M in [0, 1] (1: no merging), "
                          "also over a loaded checkpoint's learned ones"),
        _family.Flag("--ltmp-flops-images", type=int, default=1000, metavar="N",
                     help="validation images (batch 1) the end-of-training report counts the inference model's "
                          "FLOPs on (official 1000; 0: no report)"),
    ),
    check_options=_family_check_options,
    hooks=LTMPHooks,
    checkpoint_filter_fn=checkpoint_filter_fn,
    reduction=_family.Reduction("ltmp_threshold", search_threshold),
    # The official trainer is timm's train.py with LTMP's defaults (spec section 6), not DeiT's
    # main.py: these are the defaults for ltmp_* / inference_ltmp_* models (--cfg and the
    # command line still win). The official lrs are used as given (no batch/512 scaling).
    recipe=dict(epochs=1, opt="momentum", momentum=0.0, weight_decay=0.0, sched="cosine", warmup_epochs=0,
                smoothing=0.1, mixup=0.0, cutmix=0.0, aa="none", reprob=0.0, batch_size=128, unscale_lr=True,
                repeated_aug=False, model_ema=False, drop_path=0.0, color_jitter=0.4, cooldown_epochs=0,
                min_lr=0.0, warmup_lr=1e-5, eval_every=1),
    examples=_examples(),
))
