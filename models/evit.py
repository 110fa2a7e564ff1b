"""EViT: "Not All Patches are What You Need" (Liang et al., ICLR 2022, arXiv 2202.07800).

A timm DeiT whose blocks at the drop locations (`drop_loc`) keep only the patch
tokens the class token attends to most, between their attention and their MLP;
with `fuse_token` the dropped tokens are fused into one extra token weighted by
their class attention. Changes relative to timm's `VisionTransformer`:

* blocks are `EViTBlock` (a timm `Block` with a keep rate; no new parameters, so the
  state dict is timm DeiT's and DeiT checkpoints load strictly);
* `forward(x, keep_rate=None, tokens=None, get_idx=False)` as in the official code,
  plus `set_keep_rate(v)` for the training warm-up (section 4 of the spec);
* pruning blocks compute the full attention with fused SDPA and the class-token
  attention row separately, so no `[B, H, N, N]` matrix is materialised (the row is
  taken before attention dropout; the official code takes it after, which only
  differs when `attn_drop_rate > 0`).

Distilled variants (new semantics; the official distilled path cannot run): the class
and distillation tokens are both protected and never pruned, the class-token
attention over the remaining tokens decides what is kept, and the fused token is
appended after the kept tokens (last), exactly as without a distillation token.
"""
from __future__ import annotations

import math
from functools import partial
from numbers import Integral, Real
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import Block, VisionTransformer, checkpoint_filter_fn

from .hooks import TrainingHooks
from .token_ops import class_attention, keep_count, keep_topk_tokens

__all__ = ["EViT", "EViTDistilled", "EViTBlock", "keep_rate_schedule", "training_hooks", "CLI_KWARGS"]

CLI_KWARGS = ("base_keep_rate", "drop_loc", "fuse_token")

PerBlock = Union[None, float, int, Sequence[Optional[float]]]


class EViTBlock(Block):
    """timm `Block` that may prune tokens between attention and MLP.

    `keep_rate` is this block's configured rate (1 = never prunes). Prunes iff
    (configured < 1 and call-time rate < 1) or a token count is given, as the
    official code does.
    """

    def __init__(self, *args, keep_rates: Sequence[float] = (), fuse_token: bool = False,
                 num_prefix_tokens: int = 1, depth: int = 0, **kwargs):
        super().__init__(*args, depth=depth, **kwargs)
        self.keep_rate = float(keep_rates[depth]) if keep_rates else 1.0
        self.fuse_token = fuse_token
        self.num_prefix_tokens = num_prefix_tokens

    def forward_prune(
            self,
            x: torch.Tensor,
            keep_rate: Optional[float] = None,
            tokens: Optional[int] = None,
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """x `[B, N, C]` -> (x `[B, N', C]`, idx `[B, K]` or None if nothing was pruned)."""
        rate = self.keep_rate if keep_rate is None else keep_rate
        candidates = x.shape[1] - self.num_prefix_tokens
        if not ((self.keep_rate < 1 and rate < 1) or tokens is not None):
            return super().forward(x), None
        keep = tokens if tokens is not None else keep_count(rate, candidates)
        if keep == candidates:
            return super().forward(x), None
        if not 1 <= keep < candidates:
            raise ValueError(f"EViT block keeps {keep} of {candidates} tokens; pass a keep rate/tokens giving 1..{candidates}.")
        attn_out, cls_attn = _attention_with_class_row(self.attn, self.norm1(x))
        x = x + self.drop_path1(self.ls1(attn_out))
        x, idx = keep_topk_tokens(x, cls_attn[:, self.num_prefix_tokens:], keep,
                                  num_prefix=self.num_prefix_tokens, fuse=self.fuse_token)
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x, idx

    def forward(self, x: torch.Tensor, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        return self.forward_prune(x)[0]


def _attention_with_class_row(attn, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """timm `Attention` forward that also returns the class token's attention row.

    x `[B, N, C]` -> (output `[B, N, C]`, head-mean class attention `[B, N]`,
    pre-dropout probabilities).
    """
    batch, n, _ = x.shape
    qkv = attn.qkv(x).reshape(batch, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    cls_attn = class_attention(q[:, :, :1], k, attn.scale)
    out = F.scaled_dot_product_attention(q, k, v, dropout_p=attn.attn_drop.p if attn.training else 0.0)
    out = attn.norm(out.transpose(1, 2).reshape(batch, n, attn.attn_dim))
    if getattr(attn, "gate", None) is not None:
        out = out * attn.gate(x).sigmoid()
    return attn.proj_drop(attn.proj(out)), cls_attn


def _per_block_rates(depth: int, base_keep_rate: float, drop_loc: Sequence[int],
                     keep_rate: Optional[Sequence[float]]) -> Tuple[float, ...]:
    """Validated per-block configured keep rates (length `depth`)."""
    if keep_rate is not None:
        rates = [keep_rate] if isinstance(keep_rate, Real) else list(keep_rate)
        if len(rates) == 1:
            rates = rates * depth
        if len(rates) != depth:
            raise ValueError(f"EViT keep_rate has {len(rates)} entries for {depth} blocks; give 1 or {depth} values.")
    else:
        _check_keep_rate(base_keep_rate, "base_keep_rate")
        if isinstance(drop_loc, Integral):
            drop_loc = (drop_loc,)
        rates = [1.0] * depth
        for loc in drop_loc:
            if isinstance(loc, bool) or not isinstance(loc, Integral) or not 0 <= loc < depth:
                raise ValueError(f"EViT drop_loc entry {loc!r} is outside blocks 0..{depth - 1}; e.g. drop_loc=(3, 6, 9).")
            rates[int(loc)] = float(base_keep_rate)
    for rate in rates:
        _check_keep_rate(rate, "keep_rate")
    return tuple(float(r) for r in rates)


def _check_keep_rate(value, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, Real) or not 0 < value <= 1:
        raise ValueError(f"EViT {name} must be in (0, 1], got {value!r}; e.g. {name}=0.7.")


class EViT(VisionTransformer):
    """DeiT with EViT token reorganisation (see module docstring)."""

    def __init__(self, *args, base_keep_rate: float = 0.7, drop_loc: Sequence[int] = (3, 6, 9),
                 fuse_token: bool = False, keep_rate: Optional[Sequence[float]] = None,
                 depth: int = 12, **kwargs):
        rates = _per_block_rates(depth, base_keep_rate, drop_loc, keep_rate)
        kwargs.setdefault("block_fn", partial(EViTBlock, keep_rates=rates, fuse_token=fuse_token,
                                              num_prefix_tokens=self._num_protected_tokens()))
        super().__init__(*args, depth=depth, **kwargs)
        if self.cls_token is None or self.global_pool != "token":
            raise ValueError("EViT needs a class token and token pooling; drop class_token/global_pool overrides.")
        self.keep_rates = rates
        self.base_keep_rate = float(base_keep_rate)
        self.fuse_token = fuse_token
        self.runtime_keep_rate: Optional[float] = None

    @staticmethod
    def _num_protected_tokens() -> int:
        return 1

    def set_keep_rate(self, value: Optional[float]) -> None:
        """Run-time scalar keep rate used when forward's keep_rate is None (None = configured rates)."""
        if value is not None:
            _check_keep_rate(value, "keep rate")
        self.runtime_keep_rate = None if value is None else float(value)

    def _broadcast(self, value: PerBlock, name: str) -> List[Optional[float]]:
        depth = len(self.blocks)
        if value is None or isinstance(value, Real):
            return [value] * depth
        values = list(value)
        if len(values) == 1:
            values = values * depth
        if len(values) != depth:
            raise ValueError(f"EViT {name} has {len(values)} entries for {depth} blocks; give a scalar or {depth} values.")
        return values

    def forward_features_with_idx(
            self,
            x: torch.Tensor,
            keep_rate: PerBlock = None,
            tokens: PerBlock = None,
    ) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """Features `[B, N', C]` and the kept-index tensors of the blocks that pruned."""
        if keep_rate is None:
            keep_rate = self.runtime_keep_rate
        rates = self._broadcast(keep_rate, "keep_rate")
        counts = self._broadcast(tokens, "tokens")
        x = self.norm_pre(self.patch_drop(self._pos_embed(self.patch_embed(x))))
        idxs = []
        for block, rate, count in zip(self.blocks, rates, counts):
            x, idx = block.forward_prune(x, rate, count)
            if idx is not None:
                idxs.append(idx)
        return self.norm(x), idxs

    def forward_features(self, x: torch.Tensor, keep_rate: PerBlock = None, tokens: PerBlock = None,
                         **unused) -> torch.Tensor:
        return self.forward_features_with_idx(x, keep_rate, tokens)[0]

    def forward(self, x: torch.Tensor, keep_rate: PerBlock = None, tokens: PerBlock = None,
                get_idx: bool = False):
        features, idxs = self.forward_features_with_idx(x, keep_rate, tokens)
        logits = self.forward_head(features)
        return (logits, idxs) if get_idx else logits


class EViTDistilled(EViT, VisionTransformerDistilled):
    """EViT with DeiT's distillation token: cls and dist are both protected (see module docstring)."""

    @staticmethod
    def _num_protected_tokens() -> int:
        return 2


# ---------------------------------------------------------------------------
# Keep-rate warm-up (spec section 4) and the training hook that applies it
# ---------------------------------------------------------------------------

def keep_rate_schedule(epoch: int, step: int, steps_per_epoch: int, base_keep_rate: float,
                       start_epoch: int, shrink_epochs: int) -> float:
    """Keep rate of global iteration `epoch * steps_per_epoch + step` (cosine from 1 to base)."""
    end_epoch = start_epoch + shrink_epochs
    if epoch < start_epoch:
        return 1.0
    if epoch >= end_epoch:
        return base_keep_rate
    total = steps_per_epoch * (end_epoch - start_epoch)
    progress = (epoch * steps_per_epoch + step - steps_per_epoch * start_epoch) / total
    return base_keep_rate + (1 - base_keep_rate) * (math.cos(math.pi * progress) + 1) / 2


class KeepRateWarmup(TrainingHooks):
    """Sets the EViT run-time keep rate before every training step."""

    def __init__(self, base_keep_rate: float, start_epoch: int, shrink_epochs: int):
        self.base_keep_rate = base_keep_rate
        self.start_epoch = start_epoch
        self.shrink_epochs = shrink_epochs

    def on_step_start(self, model, epoch, step, steps_per_epoch):
        model.set_keep_rate(keep_rate_schedule(epoch, step, steps_per_epoch, self.base_keep_rate,
                                               self.start_epoch, self.shrink_epochs))


def training_hooks(model, args) -> Optional[TrainingHooks]:
    """Keep-rate warm-up for EViT models (None for other models)."""
    if not isinstance(model, EViT):
        return None
    base = getattr(args, "base_keep_rate", None)
    base = model.base_keep_rate if base is None else float(base)
    start = getattr(args, "shrink_start_epoch", None)
    epochs = getattr(args, "shrink_epochs", None)
    return KeepRateWarmup(base, 10 if start is None else int(start), 0 if epochs is None else int(epochs))


# ---------------------------------------------------------------------------
# Registration
# ---------------------------------------------------------------------------

def _cfg(hub_model: str, **kwargs) -> dict:
    # Pretrained weights are the DeiT ones EViT fine-tunes from (finetune.sh); the
    # state dicts are identical.
    return {
        "hf_hub_id": f"timm/{hub_model}", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": None,
        "crop_pct": 0.875, "interpolation": "bicubic", "fixed_input_size": True,
        "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.proj", "classifier": "head", **kwargs,
    }


default_cfgs = generate_default_cfgs({
    "deit_tiny_patch16_shrink_base.fb_in1k": _cfg("deit_tiny_patch16_224.fb_in1k"),
    "deit_small_patch16_shrink_base.fb_in1k": _cfg("deit_small_patch16_224.fb_in1k"),
    "deit_base_patch16_shrink_base.fb_in1k": _cfg("deit_base_patch16_224.fb_in1k"),
    "deit_tiny_distilled_patch16_shrink_base.fb_in1k": _cfg(
        "deit_tiny_distilled_patch16_224.fb_in1k", classifier=("head", "head_dist")),
    "deit_small_distilled_patch16_shrink_base.fb_in1k": _cfg(
        "deit_small_distilled_patch16_224.fb_in1k", classifier=("head", "head_dist")),
    "deit_base_distilled_patch16_shrink_base.fb_in1k": _cfg(
        "deit_base_distilled_patch16_224.fb_in1k", classifier=("head", "head_dist")),
})


def _create_evit(variant: str, pretrained: bool = False, distilled: bool = False, **kwargs):
    if "drop_rate" in kwargs:
        # official EViT applies drop_rate in pos-drop, attention projection and MLP,
        # not before the head
        rate = kwargs.pop("drop_rate")
        kwargs.setdefault("pos_drop_rate", rate)
        kwargs.setdefault("proj_drop_rate", rate)
    return build_model_with_cfg(
        EViTDistilled if distilled else EViT,
        variant,
        pretrained,
        pretrained_filter_fn=partial(checkpoint_filter_fn, adapt_layer_scale=True),
        **kwargs,
    )


@register_model
def deit_tiny_patch16_shrink_base(pretrained: bool = False, **kwargs) -> EViT:
    model_args = dict(patch_size=16, embed_dim=192, depth=12, num_heads=3)
    return _create_evit("deit_tiny_patch16_shrink_base", pretrained, **dict(model_args, **kwargs))


@register_model
def deit_small_patch16_shrink_base(pretrained: bool = False, **kwargs) -> EViT:
    model_args = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6)
    return _create_evit("deit_small_patch16_shrink_base", pretrained, **dict(model_args, **kwargs))


@register_model
def deit_base_patch16_shrink_base(pretrained: bool = False, **kwargs) -> EViT:
    model_args = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12)
    return _create_evit("deit_base_patch16_shrink_base", pretrained, **dict(model_args, **kwargs))


@register_model
def deit_tiny_distilled_patch16_shrink_base(pretrained: bool = False, **kwargs) -> EViTDistilled:
    model_args = dict(patch_size=16, embed_dim=192, depth=12, num_heads=3)
    return _create_evit("deit_tiny_distilled_patch16_shrink_base", pretrained, distilled=True, **dict(model_args, **kwargs))


@register_model
def deit_small_distilled_patch16_shrink_base(pretrained: bool = False, **kwargs) -> EViTDistilled:
    model_args = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6)
    return _create_evit("deit_small_distilled_patch16_shrink_base", pretrained, distilled=True, **dict(model_args, **kwargs))


@register_model
def deit_base_distilled_patch16_shrink_base(pretrained: bool = False, **kwargs) -> EViTDistilled:
    model_args = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12)
    return _create_evit("deit_base_distilled_patch16_shrink_base", pretrained, distilled=True, **dict(model_args, **kwargs))
