"""EViT: "Not All Patches are What You Need" (Liang et al., ICLR 2022, arXiv 2202.07800).

A timm DeiT whose blocks at the drop locations (`drop_loc`) keep only the patch
tokens the class token attends to most, between their attention and their MLP;
with `fuse_token` the dropped tokens are fused into one extra token weighted by
their class attention. Changes relative to timm's `VisionTransformer`:

* blocks are `EViTBlock` (a timm `Block` with a keep rate; no new parameters, so the
  state dict is timm DeiT's and DeiT checkpoints load strictly);
* `forward(x, keep_rate=None, tokens=None, get_idx=False)` as in the official code,
  plus `set_keep_rate(v)` for the training warm-up (section 4 of the spec);
* per-forward settings and kept indices live in one `EViTState` made by the model's
  forward; blocks keep timm's `Tensor -> Tensor` signature and are called through
  `__call__`, so forward hooks fire and timm's `forward_intermediates` works
  (`output_fmt="NLC"`: token counts fall after each drop location);
* pruning blocks compute the full attention with fused SDPA and the class-token
  attention row separately, so no `[B, H, N, N]` matrix is materialised (the row is
  taken before attention dropout; the official code takes it after, which only
  differs when `attn_drop_rate > 0`). Gradient checkpointing is not supported.

Distilled variants (new semantics; the official distilled path cannot run): the class
and distillation tokens are both protected and never pruned, the class-token
attention over the remaining tokens decides what is kept, and the fused token is
appended after the kept tokens (last), exactly as without a distillation token.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from numbers import Integral, Real
from typing import Iterator, List, Optional, Sequence, Tuple, Union

import torch
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import Block, VisionTransformer, checkpoint_filter_fn

from . import family
from .deit_cfgs import deit_cfg
from .hooks import MethodHooks
from .token_ops import StateSlot, attention_with_keys, class_attention, keep_count, keep_topk_tokens
from .errors import ModelConfigError

__all__ = ["EViT", "EViTDistilled", "EViTBlock", "EViTState", "keep_rate_schedule", "KeepRateWarmup", "FAMILY"]


PerBlock = Union[None, float, int, Sequence[Optional[float]]]


@dataclass
class EViTState:
    """One forward's call-time settings and what the pruning blocks kept.

    keep_rates / tokens: one entry per block (by block index), None = the block's own
    configured rate; kept: the `[B, K]` kept-index tensors of the blocks that pruned, in
    call order.
    """
    keep_rates: List[Optional[float]]
    tokens: List[Optional[int]]
    kept: List[torch.Tensor] = field(default_factory=list)


class EViTBlock(Block):
    """timm `Block` that may prune tokens between attention and MLP.

    Modifications relative to timm's Block (its `Tensor -> Tensor` forward is kept):

    * `keep_rate` is this block's configured rate (1 = never prunes); the call-time rate
      and token count come from the model's `EViTState` (none: the configured rate).
      Prunes iff (configured < 1 and call-time rate < 1) or a token count is given, as
      the official code does;
    * a pruning block runs its attention through `token_ops.attention_with_keys` (fused
      SDPA plus the class-attention row) and keeps the top tokens before its MLP.
    """

    prunes_tokens = True

    def __init__(self, *args, keep_rates: Sequence[float] = (), fuse_token: bool = False,
                 num_prefix_tokens: int = 1, depth: int = 0, state_slot: Optional[StateSlot] = None, **kwargs):
        super().__init__(*args, depth=depth, **kwargs)
        self.keep_rate = float(keep_rates[depth]) if keep_rates else 1.0
        self.fuse_token = fuse_token
        self.num_prefix_tokens = num_prefix_tokens
        self.block_index = depth
        self._state_slot = state_slot
        self.runtime_tokens: Optional[int] = None  # set by EViT.set_keep_rate

    def keep_count(self, candidates: int, keep_rate: Optional[float] = None,
                   tokens: Optional[int] = None) -> Optional[int]:
        """Non-prefix tokens this block keeps out of `candidates`, or None when it does not prune."""
        rate = self.keep_rate if keep_rate is None else keep_rate
        if not ((self.keep_rate < 1 and rate < 1) or tokens is not None):
            return None
        keep = tokens if tokens is not None else keep_count(rate, candidates)
        if keep == candidates:
            return None
        if not 1 <= keep < candidates:
            raise ValueError(f"EViT block keeps {keep} of {candidates} tokens; pass a keep rate/tokens giving 1..{candidates}.")
        return keep

    def _prune(self, x: torch.Tensor, keep_rate: Optional[float], tokens: Optional[int]
               ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """x `[B, N, C]` -> (x `[B, N', C]`, idx `[B, K]` or None if nothing was pruned)."""
        keep = self.keep_count(x.shape[1] - self.num_prefix_tokens, keep_rate, tokens)
        if keep is None:
            return super().forward(x), None
        attn_out, q, k = attention_with_keys(self.attn, self.norm1(x))
        x = x + self.drop_path1(self.ls1(attn_out))
        # the class-token row before attention dropout (the official code takes it after)
        cls_attn = class_attention(q[:, :, :1], k, self.attn.scale)
        x, idx = keep_topk_tokens(x, cls_attn[:, self.num_prefix_tokens:], keep,
                                  num_prefix=self.num_prefix_tokens, fuse=self.fuse_token)
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x, idx

    def forward(self, x: torch.Tensor, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        state = self._state_slot.state if self._state_slot is not None else None
        if state is None:
            return self._prune(x, None, None)[0]
        x, idx = self._prune(x, state.keep_rates[self.block_index], state.tokens[self.block_index])
        if idx is not None:
            state.kept.append(idx)
        return x

    def forward_prune(self, x: torch.Tensor, keep_rate: Optional[float] = None, tokens: Optional[int] = None
                      ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Compatibility alias (runs outside `__call__`, so no hooks fire): one block with explicit settings."""
        return self._prune(x, keep_rate, tokens)


def _per_block_rates(depth: int, base_keep_rate: float, drop_loc: Sequence[int],
                     keep_rate: Optional[Sequence[float]]) -> Tuple[float, ...]:
    """Validated per-block configured keep rates (length `depth`)."""
    if keep_rate is not None:
        rates = [keep_rate] if isinstance(keep_rate, Real) else list(keep_rate)
        if len(rates) == 1:
            rates = rates * depth
        if len(rates) != depth:
            raise ModelConfigError(f"EViT keep_rate has {len(rates)} entries for {depth} blocks; give 1 or {depth} values.")
    else:
        _check_keep_rate(base_keep_rate, "base_keep_rate")
        if isinstance(drop_loc, Integral):
            drop_loc = (drop_loc,)
        rates = [1.0] * depth
        for loc in drop_loc:
            if isinstance(loc, bool) or not isinstance(loc, Integral) or not 0 <= loc < depth:
                raise ModelConfigError(
                    f"EViT drop_loc entry {loc!r} is outside blocks 0..{depth - 1}; e.g. drop_loc=(3, 6, 9).")
            rates[int(loc)] = float(base_keep_rate)
    for rate in rates:
        _check_keep_rate(rate, "keep_rate")
    return tuple(float(r) for r in rates)


def _check_keep_rate(value, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, Real) or not 0 < value <= 1:
        raise ModelConfigError(f"EViT {name} must be in (0, 1], got {value!r}; e.g. {name}=0.7.")


class EViT(VisionTransformer):
    """DeiT with EViT token reorganisation (see module docstring).

    `forward`, `forward_features` and `forward_intermediates` make one `EViTState` per
    call from their `keep_rate` / `tokens` arguments (default: the run-time rate of
    `set_keep_rate`, else the configured rates); blocks are called through `__call__`.
    """

    # set_keep_rate stores per-block integer counts on the blocks; with this Dynamo keeps them
    # symbolic after the first change, so a warm-up compiles a few graphs, not one per step
    dynamo_config = {"allow_unspec_int_on_nn_module": True}

    def __init__(self, *args, base_keep_rate: float = 0.7, drop_loc: Sequence[int] = (3, 6, 9),
                 fuse_token: bool = False, keep_rate: Optional[Sequence[float]] = None,
                 depth: int = 12, **kwargs):
        rates = _per_block_rates(depth, base_keep_rate, drop_loc, keep_rate)
        slot = StateSlot()
        kwargs.setdefault("block_fn", partial(EViTBlock, keep_rates=rates, fuse_token=fuse_token,
                                              num_prefix_tokens=self._num_protected_tokens(), state_slot=slot))
        super().__init__(*args, depth=depth, **kwargs)
        if self.cls_token is None or self.global_pool != "token":
            raise ModelConfigError("EViT needs a class token and token pooling; drop class_token/global_pool overrides.")
        self._state_slot = slot
        self.keep_rates = rates
        self.base_keep_rate = float(base_keep_rate)
        self.fuse_token = fuse_token
        self.runtime_keep_rate: Optional[float] = None
        # patch tokens per image that the blocks' `runtime_tokens` (set_keep_rate's counts) are for
        self.runtime_tokens_grid: Optional[int] = None
        # configured per-block token counts (None entries: no count) that a forward given neither
        # keep_rate nor tokens, with no run-time rate set, uses in place of the configured rates
        # (TokenReduction's Top-K: a fixed count per location, models/tokenreduction.py)
        self.fixed_tokens: Optional[Tuple[Optional[int], ...]] = None

    @staticmethod
    def _num_protected_tokens() -> int:
        return 1

    def set_keep_rate(self, value: Optional[float]) -> None:
        """Run-time scalar keep rate used when forward's keep_rate is None (None = configured rates)."""
        if value is not None:
            _check_keep_rate(value, "keep rate")
        self.runtime_keep_rate = None if value is None else float(value)
        counts = None if value is None else self._runtime_token_counts(self.runtime_keep_rate)
        self.runtime_tokens_grid = None if counts is None else self.patch_embed.num_patches
        for index, block in enumerate(self.blocks):
            block.runtime_tokens = None if counts is None else counts[index]

    def _runtime_token_counts(self, rate: float) -> Optional[Tuple[int, ...]]:
        """What every block keeps at the run-time `rate` on the model's own patch grid, worked out
        as the blocks would (a block that does not prune keeps all its candidates). Forward uses
        these integers for images of that grid: a compiled model then sees token counts, which
        Dynamo can keep symbolic (`dynamo_config`), instead of a new float at every warm-up step."""
        candidates = getattr(self.patch_embed, "num_patches", None)
        if not isinstance(candidates, Integral):
            return None
        counts = []
        for block in self.blocks:
            keep = block.keep_count(candidates, rate)
            counts.append(candidates if keep is None else keep)
            if keep is not None:
                candidates = keep + int(block.fuse_token)
        return tuple(counts)

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

    @contextmanager
    def _forward_state(self, keep_rate: PerBlock, tokens: PerBlock, images: Optional[torch.Tensor] = None
                       ) -> Iterator[EViTState]:
        """This call's EViTState, visible to the blocks until the outermost forward returns."""
        slot = self._state_slot
        if slot.state is not None:  # nested call (forward -> forward_features)
            yield slot.state
            return
        if self.grad_checkpointing and torch.is_grad_enabled():
            # re-run blocks would see no state (and hence other rates) after the forward
            raise ValueError("EViT does not support gradient checkpointing; call set_grad_checkpointing(False).")
        if keep_rate is None and tokens is None and self.runtime_tokens_grid is not None and images is not None \
                and self._grid_tokens(images) == self.runtime_tokens_grid:
            tokens = [block.runtime_tokens for block in self.blocks]
        elif keep_rate is None and tokens is None and self.runtime_keep_rate is None and self.fixed_tokens is not None:
            tokens = self.fixed_tokens
        elif keep_rate is None:
            keep_rate = self.runtime_keep_rate
        slot.state = EViTState(self._broadcast(keep_rate, "keep_rate"), self._broadcast(tokens, "tokens"))
        try:
            yield slot.state
        finally:
            slot.state = None

    def forward_features_with_idx(
            self,
            x: torch.Tensor,
            keep_rate: PerBlock = None,
            tokens: PerBlock = None,
    ) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """Features `[B, N', C]` and the kept-index tensors of the blocks that pruned."""
        with self._forward_state(keep_rate, tokens, x) as state:
            return super().forward_features(x), list(state.kept)

    def forward_features(self, x: torch.Tensor, keep_rate: PerBlock = None, tokens: PerBlock = None,
                         **kwargs) -> torch.Tensor:
        with self._forward_state(keep_rate, tokens, x):
            return super().forward_features(x, **kwargs)

    def forward_intermediates(self, x: torch.Tensor, *args, keep_rate: PerBlock = None, tokens: PerBlock = None,
                              output_fmt: str = "NCHW", **kwargs):
        """timm's `forward_intermediates`; once tokens are pruned only `output_fmt="NLC"` can hold them."""
        with self._forward_state(keep_rate, tokens, x) as state:
            if output_fmt == "NCHW" and self._prunes(x, state):
                raise ValueError("EViT prunes tokens, so its intermediates do not fill the patch grid; "
                                 "pass output_fmt='NLC'.")
            return super().forward_intermediates(x, *args, output_fmt=output_fmt, **kwargs)

    def _grid_tokens(self, images: torch.Tensor) -> int:
        """Patch tokens of images `[B, C, H, W]`."""
        return math.prod(self.patch_embed.dynamic_feat_size(images.shape[-2:]))

    def _prunes(self, x: torch.Tensor, state: EViTState) -> bool:
        """Whether any block prunes an input `x` `[B, C, H, W]` under `state`."""
        # blocks up to the first pruning one all see the full patch grid
        candidates = self._grid_tokens(x)
        return any(block.keep_count(candidates, state.keep_rates[block.block_index],
                                    state.tokens[block.block_index]) is not None
                   for block in self.blocks)

    def forward(self, x: torch.Tensor, keep_rate: PerBlock = None, tokens: PerBlock = None,
                get_idx: bool = False):
        with self._forward_state(keep_rate, tokens, x) as state:
            logits = self.forward_head(self.forward_features(x))
            return (logits, list(state.kept)) if get_idx else logits


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


class KeepRateWarmup(MethodHooks):
    """EViT's training hooks: the run-time keep rate before every training step (the cosine
    warm-up), the rate in progress lines, and fine-tuning in eval mode as the official recipe."""

    train_mode_when_finetuning = False

    def __init__(self, base_keep_rate: float, start_epoch: int, shrink_epochs: int):
        super().__init__()
        self.base_keep_rate = base_keep_rate
        self.start_epoch = start_epoch
        self.shrink_epochs = shrink_epochs

    def on_step_start(self, model, epoch, step, steps_per_epoch):
        model.set_keep_rate(keep_rate_schedule(epoch, step, steps_per_epoch, self.base_keep_rate,
                                               self.start_epoch, self.shrink_epochs))

    def log_state(self, model) -> dict:
        rate = model.runtime_keep_rate
        return {"keep_rate": model.base_keep_rate if rate is None else rate}


# ---------------------------------------------------------------------------
# Registration
# ---------------------------------------------------------------------------

# Pretrained weights are the DeiT ones EViT fine-tunes from (finetune.sh); the
# state dicts are identical.
default_cfgs = generate_default_cfgs({
    "deit_tiny_patch16_shrink_base.fb_in1k": deit_cfg("deit_tiny_patch16_224.fb_in1k"),
    "deit_small_patch16_shrink_base.fb_in1k": deit_cfg("deit_small_patch16_224.fb_in1k"),
    "deit_base_patch16_shrink_base.fb_in1k": deit_cfg("deit_base_patch16_224.fb_in1k"),
    "deit_tiny_distilled_patch16_shrink_base.fb_in1k": deit_cfg(
        "deit_tiny_distilled_patch16_224.fb_in1k", classifier=("head", "head_dist")),
    "deit_small_distilled_patch16_shrink_base.fb_in1k": deit_cfg(
        "deit_small_distilled_patch16_224.fb_in1k", classifier=("head", "head_dist")),
    "deit_base_distilled_patch16_shrink_base.fb_in1k": deit_cfg(
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


# ---------------------------------------------------------------------------
# Method family: flags, hooks and commands the trainer, benchmark and tools discover
# ---------------------------------------------------------------------------

def _family_hooks(model, options) -> Optional[KeepRateWarmup]:
    if not isinstance(model, EViT):
        return None
    base = model.base_keep_rate if options.base_keep_rate is None else float(options.base_keep_rate)
    return KeepRateWarmup(base, int(options.shrink_start_epoch), int(options.shrink_epochs))


_COMMANDS = (
    family.Command("only_test_speed", "tools.evit_tools:speed_test_command", exits=True, needs_data=False),
    family.Command("test_speed", "tools.evit_tools:speed_test_command", exits=False, needs_data=False),
    family.Command("visualize_mask", "tools.evit_tools:visualize_mask_command", exits=True, needs_data=True),
)
_TINY = dict(embed_dim=32, num_heads=2, patch_size=8)


def _search_keep_rate(build, target, gmacs_of):
    return family.search_continuous(0.05, 1.0, lambda rate: build(rate), target, gmacs_of, decimals=3)


FAMILY = family.register_family(family.MethodFamily(
    name="evit",
    title="EViT: keep the attentive tokens, fuse the rest",
    owns=family.models_of(__name__),
    flags=(
        family.Flag("--base_keep_rate", type=family.auto_or(float), kwarg="base_keep_rate",
                    metavar="RATE", help="keep rate at the drop locations (model default 0.7; 'auto' with --target-gmacs)"),
        family.Flag("--drop_loc", type=family.literal("int_tuple"), kwarg="drop_loc", metavar="BLOCKS",
                    help='drop locations, e.g. "(3, 6, 9)" (model default)'),
        family.Flag("--fuse_token", action="store_true", default=None, kwarg="fuse_token",
                    help="fuse the dropped tokens into one (inattentive token fusion)"),
        family.Flag("--shrink_start_epoch", type=int, default=10, help="first epoch of the keep-rate warm-up"),
        family.Flag("--shrink_epochs", type=int, default=0,
                    help="epochs of the cosine keep-rate warm-up from 1 to --base_keep_rate (0: none)"),
        family.Flag("--test_speed", action="store_true", default=False,
                    help="log throughput and GMACs (speed_macs.txt in --output_dir) before running"),
        family.Flag("--only_test_speed", action="store_true", default=False,
                    help="only the speed test of --test_speed, then exit"),
        family.Flag("--visualize_mask", action="store_true", default=False,
                    help="save images of the kept tokens of --n_visualization validation images, then exit"),
        family.Flag("--n_visualization", type=int, default=128, help="images for --visualize_mask"),
    ),
    hooks=_family_hooks,
    commands=_COMMANDS,
    reduction=family.Reduction("base_keep_rate", _search_keep_rate),
    examples=(
        family.Example("evit_fuse", model="deit_tiny_patch16_shrink_base",
                       kwargs=dict(_TINY, depth=4, drop_loc=(1, 2)), flags=("--base_keep_rate", "0.7", "--fuse_token"),
                       invalid=dict(base_keep_rate=1.5)),
        family.Example("evit_distilled", model="deit_tiny_distilled_patch16_shrink_base",
                       kwargs=dict(_TINY, depth=2, drop_loc=(1,)), flags=("--base_keep_rate", "0.5"), compile=()),
    ) + tuple(  # every other registered size trains one epoch too
        family.Example(name, model=name, kwargs=dict(_TINY, depth=2, drop_loc=(1,)), flags=("--base_keep_rate", "0.5"),
                       compile=())
        for name in ("deit_small_patch16_shrink_base", "deit_base_patch16_shrink_base",
                     "deit_small_distilled_patch16_shrink_base", "deit_base_distilled_patch16_shrink_base")
    ),
))
