"""ToMe: "Token Merging: Your ViT but Faster" (Bolya et al., ICLR 2023, arXiv 2210.09461).

An in-place patch for timm `VisionTransformer`s (DeiT, distilled DeiT, ViTs with or
without a class token, LayerScale), for the attention-shrink models of
`models/shrink.py`, and for the hybrid backbones MobileViT (`mobilevit_*`) and
EfficientViT-MIT (`efficientvit_b*`). The patch swaps the classes of the model and of its
blocks that have attention; parameters and state dict are untouched and `unpatch`
restores the original classes.

Modifications of a patched block (relative to timm's `Block`):

* attention runs through fused SDPA with the additive bias `ln(size)` per key
  (proportional attention) once a merge has happened in this forward, and also
  returns the head-mean keys as the merge metric;
* between the attention residual and the MLP, `r` tokens are merged by bipartite
  soft matching (`models.token_ops`), size-weighted, with the class (and
  distillation) tokens protected;
* LayerScale (`ls1`, `ls2`) is applied (the official patch ignores it).

The fusion step is pluggable (`ToMeConfig.fusion`): ToMe's is the size-weighted average;
`models/tofu.py` plugs in ToFu's prune / MLERP rules and reuses everything else here.

Blocks without attention (deployed `ShrinkBlock`: `has_attention = False`, and lambda
blocks whose `attention_weight()` is 0 at call time) run unchanged and never take an
`r` from the schedule. `start_idx` counts only blocks that have attention at call
time: the attention block with ordinal k (0-based) merges iff `k >= start_idx`. The
schedule (`parse_r(number of transformer blocks, model.r)`) is consumed front to back by
the merging blocks. A lambda block with 0 < lambda merges after its diluted residual
`(2 - lam) x + lam attn`, with proportional attention inside `attn`.

Hybrid backbones (docs/hybrid_merging.md): merging runs inside each transformer stage
(MobileViT: the `transformer` sequence of a `MobileVitBlock`; EfficientViT: the
`EfficientVitBlock`s of a stage), compounding from block to block, and the stage's tokens
are unmerged through the group map (the index form of the source map) before the next
operation that needs the full grid. Inside an EfficientViT block every convolution with a
spatial kernel (LiteMLA's aggregation, MBConv's depthwise conv) runs on the unmerged grid
and its output is re-merged by the group mean; 1x1 convolutions and the linear attention
run on the merged tokens (with proportional attention: keys weighted by size).

Per-forward state (schedule, sizes, sources) lives in a `ToMeState` made by the
patched model's forward and dropped when it returns. With `trace_source=True` the
final source map `[B, T_final, T0]` and sizes `[B, T_final, 1]` are stored after
each forward in `model._tome_info["source"]` / `["size"]` (and, in `["r_applied"]`,
the number of tokens each block actually merged, after clamping; zeros left out);
on hybrid backbones `["groups"]` holds each stage's group map `[B, T0]` instead.

EViT and LTM models are not supported (their blocks change or merge tokens themselves).
Gradient checkpointing of the blocks is not supported while patched, and blocks
called with an attention mask run unpatched. One deliberate deviation: when the clamp
turns a block's r into 0 before any merge, sizes stay None instead of becoming ones
(the official `ln(1) = 0` bias is a numerical no-op).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from numbers import Integral
from typing import Callable, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from timm.models.efficientvit_mit import EfficientVit, EfficientVitBlock, EfficientVitStage
from timm.models.mobilevit import MobileVitBlock

from .errors import ModelConfigError
from .token_ops import (
    BipartiteMatch, RSchedule, StateSlot, attention_residual, attention_with_keys, bipartite_soft_matching,
    compose_groups, has_attention_now, merge_groups, merge_source, merge_wavg, merged_index, parse_r, patched_class,
    pointwise,
    restore_classes, unmerge_groups)

__all__ = ["patch", "unpatch", "is_patched", "merging_block_indices", "transformer_blocks", "model_family",
           "SUPPORTED_FAMILIES", "ToMeState", "ToMeConfig"]

SUPPORTED_FAMILIES = (
    "timm VisionTransformer (DeiT, distilled DeiT, ViT) and the attention-shrink models",
    "MobileViT (mobilevit_xs, mobilevit_s, ...)",
    "EfficientViT-MIT (efficientvit_b0..b3)",
)

# fusion(block_index, match, x, size) -> (x_merged, size_merged)
Fusion = Callable[[int, BipartiteMatch, torch.Tensor, Optional[torch.Tensor]],
                  Tuple[torch.Tensor, Optional[torch.Tensor]]]


def tome_fusion(block_index: int, match: BipartiteMatch, x: torch.Tensor, size: Optional[torch.Tensor]):
    """ToMe's fusion: size-weighted average (`merge_wavg`), sizes updated."""
    return merge_wavg(match, x, size)


@dataclass
class ToMeConfig:
    """Settings shared by a patched model and its blocks; `slot.state` is set only during a forward."""
    r: RSchedule
    prop_attn: bool
    start_idx: int
    trace_source: bool
    class_token: bool
    distill_token: bool
    num_layers: int = 0
    family: str = "vit"
    method: str = "tome"
    fusion: Fusion = tome_fusion
    slot: StateSlot = field(default_factory=StateSlot)  # holds the ToMeState of the forward in progress


@dataclass
class ToMeState:
    """One forward's state: remaining schedule, token sizes and sources.

    On hybrid backbones `size`, `group` and `grid` belong to the current transformer stage
    (reset when a stage begins and ends); `group` `[B, T0]` maps each of the stage's T0
    input tokens to its current token.
    """
    r_list: List[int]
    size: Optional[torch.Tensor] = None
    source: Optional[torch.Tensor] = None
    group: Optional[torch.Tensor] = None
    grid: Optional[Tuple[int, int]] = None
    attention_blocks_seen: int = 0
    merges: List[int] = field(default_factory=list)
    stage_groups: List[Optional[torch.Tensor]] = field(default_factory=list)

    def begin_stage(self, grid: Optional[Tuple[int, int]] = None) -> None:
        self.size, self.group, self.grid = None, None, grid

    def end_stage(self, trace: bool) -> None:
        if trace:
            self.stage_groups.append(self.group)
        self.size, self.group, self.grid = None, None, None


def _reduce(cfg: ToMeConfig, state: ToMeState, block_index: int, match: Optional[BipartiteMatch],
            x: torch.Tensor) -> torch.Tensor:
    """Bookkeeping (sources or group map, applied r) then the configured fusion of `x` `[B, T, C]`."""
    if match is None:
        return x
    if cfg.family != "vit":
        state.group = compose_groups(state.group, merged_index(match, x.shape[1]))
    elif cfg.trace_source:
        state.source = merge_source(match, x, state.source)
    x, state.size = cfg.fusion(block_index, match, x, state.size)
    state.merges.append(match.r)
    return x


def _attention_with_metric(attn: nn.Module, x: torch.Tensor, size: Optional[torch.Tensor]):
    """timm `Attention` with proportional attention; x `[B, N, C]`, size `[B, N, 1]` or None.

    Returns (output `[B, N, C]`, metric `[B, N, head_dim]` float32 = keys averaged over heads;
    averaged in float32 so bf16 runs match like fp32 runs, a no-op for fp32 keys).
    """
    out = attention_with_keys(attn, x, size)
    return out.out, out.k.mean(dim=1, dtype=torch.float32)


class ToMeBlockMixin:
    """Placed before the block's own class; see the module docstring for what changes."""

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False) -> torch.Tensor:
        cfg: ToMeConfig = self._tome_cfg
        state = cfg.slot.state
        if attn_mask is not None or is_causal:  # masks do not survive merging: run the block unchanged
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        if state is None or not has_attention_now(self):
            return super().forward(x)
        ordinal = state.attention_blocks_seen
        state.attention_blocks_seen += 1
        if ordinal < cfg.start_idx:
            return super().forward(x)

        attn_out, metric = _attention_with_metric(self.attn, self.norm1(x), state.size if cfg.prop_attn else None)
        x = attention_residual(self, x, self.drop_path1(self.ls1(attn_out)))

        r = state.r_list.pop(0)
        if r > 0:
            match = bipartite_soft_matching(metric, r, cfg.class_token, cfg.distill_token)
            x = _reduce(cfg, state, self._tome_index, match, x)
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


class ToMeModelMixin:
    """Creates the per-forward `ToMeState`; `model.r` is validated when set."""

    @property
    def r(self) -> RSchedule:
        return self._tome_cfg.r

    @r.setter
    def r(self, value: RSchedule) -> None:
        _parse_r(self._tome_cfg.num_layers, value)
        self._tome_cfg.r = value

    def _tome_run(self, fn, *args, **kwargs):
        cfg: ToMeConfig = self._tome_cfg
        if cfg.slot.state is not None:  # nested call (forward -> forward_features)
            return fn(*args, **kwargs)
        if self.training and getattr(self, "grad_checkpointing", False):
            raise ModelConfigError("ToMe cannot train with gradient checkpointing (blocks re-run after the forward); "
                                   "disable it.")
        state = ToMeState(r_list=parse_r(cfg.num_layers, cfg.r))
        cfg.slot.state = state
        try:
            return fn(*args, **kwargs)
        finally:
            cfg.slot.state = None
            if cfg.trace_source:
                self._tome_info = {"source": state.source, "size": state.size, "r_applied": state.merges}
                if cfg.family != "vit":
                    self._tome_info["groups"] = state.stage_groups

    def forward(self, *args, **kwargs):
        return self._tome_run(super().forward, *args, **kwargs)

    def forward_features(self, *args, **kwargs):
        return self._tome_run(super().forward_features, *args, **kwargs)

    def forward_intermediates(self, *args, **kwargs):
        return self._tome_run(super().forward_intermediates, *args, **kwargs)


# ---------------------------------------------------------------------------
# Hybrid backbones: MobileViT transformer sequences, EfficientViT attention stages
# ---------------------------------------------------------------------------

class ToMeSequenceStageMixin:
    """MobileViT's `transformer` (an `nn.Sequential` of timm `Block`s on `[B * P, N, C]`).

    The blocks merge as in a ViT (no class token); the sequence leaves the stage unmerged
    to its N input tokens, so timm's norm, fold and convolutions see the full grid.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cfg: ToMeConfig = self._tome_cfg
        state = cfg.slot.state
        if state is None:
            return super().forward(x)
        state.begin_stage()
        x = unmerge_groups(super().forward(x), state.group)
        state.end_stage(cfg.trace_source)
        return x


def _on_grid(module: nn.Module, tokens: torch.Tensor, state: ToMeState) -> torch.Tensor:
    """A spatial module on merged tokens `[B, G, C]`: unmerge to the stage grid, run, re-merge by group mean."""
    full = unmerge_groups(tokens, state.group)
    batch, _, channels = full.shape
    height, width = state.grid
    out = module(full.transpose(1, 2).reshape(batch, channels, height, width)).flatten(2).transpose(1, 2)
    return merge_groups(out, state.group, tokens.shape[1])


def _lite_mla_tokens(mla: nn.Module, x: torch.Tensor, state: ToMeState, size: Optional[torch.Tensor]):
    """timm `LiteMLA` on merged tokens x `[B, G, C]` with proportional attention (keys weighted by size).

    Returns (output `[B, G, C_out]`, metric `[B, G, dim]` = pre-kernel keys averaged over the heads
    of all scales).
    """
    batch, groups, _ = x.shape
    qkv = pointwise(mla.qkv, x)
    multi_scale = torch.cat([qkv] + [_on_grid(op, qkv, state) for op in mla.aggreg], dim=-1)
    # channel order as timm's reshape(B, -1, 3 * dim, H * W): head-major, then q | k | v
    multi_scale = multi_scale.reshape(batch, groups, -1, 3 * mla.dim).transpose(1, 2)
    q, k, v = multi_scale.chunk(3, dim=-1)
    metric = k.float().mean(dim=1)  # float32 merge metric, as in the ViT blocks
    q, k = mla.kernel_func(q), mla.kernel_func(k)
    if size is not None:
        k = k * size[:, None].to(k.dtype)  # [B, 1, G, 1]: a group of s tokens counts s times in k^T v
    v = F.pad(v, (0, 1), mode="constant", value=1.0)
    with torch.autocast(device_type=v.device.type, enabled=False):
        out = mla._attn(q, k, v)
    out = out.transpose(1, 2).reshape(batch, groups, -1)
    return pointwise(mla.proj, out), metric


class ToMeEfficientVitBlockMixin:
    """timm `EfficientVitBlock` on merged tokens `[B, G, C]` (see the module docstring).

    Z = x + LiteMLA(x), merge (r from the schedule, metric from LiteMLA's keys), then
    Z + MBConv(Z) with the depthwise conv on the unmerged grid. Called with an NCHW tensor
    (or outside a patched forward) it is timm's block.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cfg: ToMeConfig = self._tome_cfg
        state = cfg.slot.state
        if state is None or x.dim() != 3:
            return super().forward(x)
        ordinal = state.attention_blocks_seen
        state.attention_blocks_seen += 1
        context, local = self.context_module, self.local_module
        attn_out, metric = _lite_mla_tokens(context.main, pointwise(context.pre_norm, x), state,
                                            state.size if cfg.prop_attn else None)
        x = x + attn_out
        if ordinal >= cfg.start_idx:
            r = state.r_list.pop(0)
            if r > 0:
                x = _reduce(cfg, state, self._tome_index, bipartite_soft_matching(metric, r), x)
        mbconv = local.main
        h = pointwise(mbconv.inverted_conv, pointwise(local.pre_norm, x))
        h = pointwise(mbconv.point_conv, _on_grid(mbconv.depth_conv, h, state))
        return x + h


class ToMeEfficientVitStageMixin:
    """timm `EfficientVitStage`: the attention blocks run on tokens, unmerged at the stage's end."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cfg: ToMeConfig = self._tome_cfg
        state = cfg.slot.state
        if state is None:
            return super().forward(x)
        tokens = None
        for block in self.blocks:
            if isinstance(block, ToMeEfficientVitBlockMixin):
                if tokens is None:
                    state.begin_stage(tuple(x.shape[-2:]))
                    tokens = x.flatten(2).transpose(1, 2)
                tokens = block(tokens)
            else:
                if tokens is not None:
                    x, tokens = self._tome_to_grid(tokens, x.shape[1], cfg), None
                x = block(x)
        if tokens is not None:
            x = self._tome_to_grid(tokens, tokens.shape[-1], cfg)
        return x

    @staticmethod
    def _tome_to_grid(tokens: torch.Tensor, channels: int, cfg: ToMeConfig) -> torch.Tensor:
        state = cfg.slot.state
        full = unmerge_groups(tokens, state.group)
        height, width = state.grid
        state.end_stage(cfg.trace_source)
        return full.transpose(1, 2).reshape(full.shape[0], channels, height, width)


# ---------------------------------------------------------------------------
# Patching
# ---------------------------------------------------------------------------

def _swap(module: nn.Module, mixin: type, cfg: ToMeConfig) -> None:
    module.__class__ = patched_class(mixin, type(module), "ToMe")
    module._tome_cfg = cfg


def is_patched(model: nn.Module) -> bool:
    """Whether `model` carries the ToMe patch (not ToFu's, which reuses the same classes)."""
    return isinstance(model, ToMeModelMixin) and model._tome_cfg.method == "tome"


def _unsupported(model: nn.Module, why: str = "") -> ModelConfigError:
    return ModelConfigError(f"ToMe/ToFu do not support {type(model).__name__}{why}; supported families: "
                            f"{'; '.join(SUPPORTED_FAMILIES)}.")


def model_family(model: nn.Module) -> str:
    """'vit', 'mobilevit' or 'efficientvit'; a one-line ModelConfigError naming the supported families otherwise."""
    if any(hasattr(m, "mask_module") for m in model.modules()):
        raise _unsupported(model, " (an LTM model: its blocks merge tokens themselves)")
    blocks = getattr(model, "blocks", None)
    if blocks is not None and not isinstance(model, EfficientVit):
        if any(hasattr(b, "forward_prune") for b in blocks):
            raise _unsupported(model, " (an EViT model: its blocks already change the token count)")
        if not any(getattr(b, "attn", None) is not None or hasattr(b, "has_attention") for b in blocks):
            raise _unsupported(model, " (its blocks have no timm attention)")
        return "vit"
    if any(isinstance(m, MobileVitBlock) for m in model.modules()):
        return "mobilevit"
    if isinstance(model, EfficientVit) and any(
            isinstance(stage, EfficientVitStage) and any(isinstance(b, EfficientVitBlock) for b in stage.blocks)
            for stage in model.stages):
        return "efficientvit"
    raise _unsupported(model)


def transformer_blocks(model: nn.Module, family: Optional[str] = None) -> List[nn.Module]:
    """The blocks the r schedule is indexed by, in forward order (ViT: `model.blocks`)."""
    family = family or getattr(getattr(model, "_tome_cfg", None), "family", None) or model_family(model)
    if family == "vit":
        return list(model.blocks)
    if family == "mobilevit":
        return [block for m in model.modules() if isinstance(m, MobileVitBlock) for block in m.transformer]
    return [block for stage in model.stages for block in stage.blocks if isinstance(block, EfficientVitBlock)]


def _parse_r(num_layers: int, r: RSchedule) -> list:
    try:
        return parse_r(num_layers, r)
    except ValueError as err:
        raise ModelConfigError(str(err)) from None


def patch(model: nn.Module, r: RSchedule = 0, prop_attn: bool = True, start_idx: int = 0,
          trace_source: bool = False) -> nn.Module:
    """Apply ToMe to `model` in place (re-patching replaces the settings); returns the model."""
    return apply_patch(model, r=r, prop_attn=prop_attn, start_idx=start_idx, trace_source=trace_source)


def apply_patch(model: nn.Module, r: RSchedule, prop_attn: bool, start_idx: int, trace_source: bool,
                method: str = "tome", fusion: Fusion = tome_fusion) -> nn.Module:
    """The patch shared by ToMe and ToFu: `fusion` decides what happens to matched tokens."""
    name = "ToMe" if method == "tome" else "ToFu"
    if isinstance(model, ToMeModelMixin):
        unpatch(model)
    family = model_family(model)
    if family == "vit" and getattr(model, "reg_token", None) is not None:
        raise ModelConfigError(f"{name} does not support register tokens; use a ViT without reg_tokens.")
    if isinstance(start_idx, bool) or not isinstance(start_idx, Integral) or start_idx < 0:
        raise ModelConfigError(f"{name} start_idx must be an int >= 0 (attention blocks left unpatched), "
                               f"got {start_idx!r}.")
    blocks = transformer_blocks(model, family)
    _parse_r(len(blocks), r)

    cfg = ToMeConfig(
        r=r, prop_attn=prop_attn, start_idx=int(start_idx), trace_source=trace_source,
        class_token=getattr(model, "cls_token", None) is not None,
        distill_token=getattr(model, "dist_token", None) is not None,
        num_layers=len(blocks), family=family, method=method, fusion=fusion,
    )
    if family == "vit":
        for index, block in enumerate(blocks):
            if getattr(block, "has_attention", True) and getattr(block, "attn", None) is not None:
                _check_attention(block.attn)
        for index, block in enumerate(blocks):
            if getattr(block, "has_attention", True) and getattr(block, "attn", None) is not None:
                _swap(block, ToMeBlockMixin, cfg)
                block._tome_index = index
    elif family == "mobilevit":
        for block in blocks:
            _check_attention(block.attn)
        for m in [m for m in model.modules() if isinstance(m, MobileVitBlock)]:
            _swap(m.transformer, ToMeSequenceStageMixin, cfg)
        for index, block in enumerate(blocks):
            _swap(block, ToMeBlockMixin, cfg)
            block._tome_index = index
    else:
        for block in blocks:
            for residual in (block.context_module, block.local_module):
                if not isinstance(residual.shortcut, nn.Identity):
                    raise _unsupported(model, " (an EfficientViT block without identity shortcuts)")
        for stage in model.stages:
            if any(isinstance(b, EfficientVitBlock) for b in stage.blocks):
                _swap(stage, ToMeEfficientVitStageMixin, cfg)
        for index, block in enumerate(blocks):
            _swap(block, ToMeEfficientVitBlockMixin, cfg)
            block._tome_index = index
    _swap(model, ToMeModelMixin, cfg)
    model._tome_info = {"source": None, "size": None}
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Undo `patch` (ToMe's or ToFu's): original classes back, patch attributes removed. No-op if not patched."""
    return restore_classes(model, "ToMe", attributes=("_tome_cfg", "_tome_info", "_tome_index"))


def merging_block_indices(model: nn.Module) -> List[int]:
    """Indices (into `transformer_blocks`) of the blocks that merge in the next forward (current lambdas)."""
    cfg: ToMeConfig = model._tome_cfg
    blocks = transformer_blocks(model)
    if cfg.family != "vit":
        return list(range(cfg.start_idx, len(blocks)))
    attention_blocks = [i for i, block in enumerate(blocks) if has_attention_now(block)]
    return attention_blocks[cfg.start_idx:]


def _check_attention(attn: nn.Module) -> None:
    needed = ("qkv", "num_heads", "head_dim", "attn_dim", "proj", "q_norm", "k_norm")
    missing = [name for name in needed if not hasattr(attn, name)]
    if missing:
        raise ModelConfigError(f"ToMe needs timm's Attention layout; {type(attn).__name__} lacks {', '.join(missing)}.")


# ---------------------------------------------------------------------------
# Method family: ToMe is a patch family, applied after any supported model is built
# ---------------------------------------------------------------------------

from . import family as _family  # noqa: E402  (the declaration below is the module's public contract)
from .hooks import MethodHooks  # noqa: E402


def _family_active(options) -> bool:
    return options.tome_r is not None


def _family_check(options) -> None:
    if options.tome_r is None and (options.tome_start_idx or options.no_tome_prop_attn):
        raise ModelConfigError("--tome-start-idx / --no-tome-prop-attn need --tome-r R")


def _family_patch(model: nn.Module, options) -> None:
    patch(model, r=options.tome_r, start_idx=int(options.tome_start_idx or 0),
          prop_attn=not options.no_tome_prop_attn)


class MergeScheduleHooks(MethodHooks):
    """The patch's r (its mean over blocks for a per-block list) in progress lines and log.txt,
    under the name `<method>_r` of the patch applied (ToMe or ToFu)."""

    def log_state(self, model: nn.Module) -> dict:
        if not isinstance(model, ToMeModelMixin):
            return {}
        cfg = model._tome_cfg
        r = cfg.r
        return {f"{cfg.method}_r": r if isinstance(r, int) else float(sum(r)) / max(len(r), 1)}


def _search_r(build, target, gmacs_of):
    model = build(0)
    depth = len(transformer_blocks(model))
    num_patches = getattr(getattr(model, "patch_embed", None), "num_patches", None)
    if num_patches is None:  # hybrids: the grid follows the input size; the clamp makes larger r equivalent
        return _family.search_merge_schedule(build, target, gmacs_of, depth, _HYBRID_MAX_R)
    tokens = num_patches + getattr(model, "num_prefix_tokens", 1)
    return _family.search_merge_schedule(build, target, gmacs_of, depth, max(tokens // 2, 1))


_HYBRID_MAX_R = 1024  # half of MobileViT's largest stage grid at 512 px (32 x 32 patches)


def schedule_flags(prefix: str, method: str, verb: str) -> tuple:
    """`--<prefix>-r` and `--<prefix>-start-idx`: the schedule flags of a patch family built on `apply_patch`
    (ToMe, ToFu)."""
    return (
        _family.Flag(f"--{prefix}-r", type=_family.r_schedule, metavar="R",
                     help=f"patch the model with {method}, {verb} R tokens per block (an int, a per-block list "
                          f"\"[8,8,6]\", or 'auto' with --target-gmacs); default: no {method}"),
        _family.Flag(f"--{prefix}-start-idx", type=int, default=0,
                     help="attention blocks left unpatched at the start"),
    )


FAMILY = _family.register_family(_family.MethodFamily(
    name="tome",
    title="ToMe: token merging (a patch applied to supported models)",
    flags=(
        *schedule_flags("tome", "ToMe", "merging"),
        _family.Flag("--no-tome-prop-attn", action="store_true", default=False,
                     help="ToMe without proportional attention"),
    ),
    patch=_family_patch,
    active=_family_active,
    check_options=_family_check,
    hooks=MergeScheduleHooks,
    reduction=_family.Reduction("tome_r", _search_r),
    examples=(
        _family.Example("tome", model="deit_tiny_patch16_224", kwargs=dict(depth=3, embed_dim=32, num_heads=2,
                                                                          patch_size=8), flags=("--tome-r", "3"),
                        invalid=dict(tome_r=-1)),
        _family.Example("tome_mobilevit", model="mobilevit_xs", input_size=64, flags=("--tome-r", "2"), train=False),
    ),
))
