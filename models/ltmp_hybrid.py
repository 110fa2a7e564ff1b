"""LTMP on hybrid backbones (MobileViT's transformer blocks, EfficientViT-MIT's LiteMLA stages).

Design and invariants: `docs/hybrid_merging.md`, section "LTMP". The layers and the
threshold API are `models/ltmp_layers.py`'s; the registered models are in `models/ltmp.py`.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from typing import Callable, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from timm.models.byobnet import ByobNet
from timm.models.efficientvit_mit import EfficientVit, EfficientVitBlock, EfficientVitStage
from timm.models.mobilevit import MobileVitBlock
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from . import token_ops
from .errors import ModelConfigError
from .ltmp_layers import (INFERENCE_MERGE_INIT, MASKED_MERGE_INIT, PRUNE_INIT, InferenceLTMPVisionTransformer,
                          LTMPVisionTransformer, ThresholdMasker, _check_attention, _check_tau, _check_threshold,
                          _ThresholdAPI, ltmp_attention, masked_merge, merge_prune_compact, protect_importance)

_logger = logging.getLogger(__name__)

# (design and invariants: docs/hybrid_merging.md, section "LTMP")
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class LTMPStageState:
    """One transformer stage's state in one forward (hybrid backbones).

    S sequences (MobileViT: B * P pixel offsets, EfficientViT: B), T0 grid positions, T current
    tokens. size `[S, T, 1]`; group `[S, T0]` long: the current token holding each grid
    position, -1 where that token was pruned (inference model; the position's value is then
    in `parked` `[S, T0, C]`, the token's value when it was pruned). Masked model: mask `[S, T]`
    (0/1 with STE gradients; pruned tokens stay in place, frozen). Inference model: valid
    `[S, T]` bool (padding) or None.
    """
    size: torch.Tensor
    group: torch.Tensor
    grid: Optional[Tuple[int, int]] = None
    mask: Optional[torch.Tensor] = None
    valid: Optional[torch.Tensor] = None
    parked: Optional[torch.Tensor] = None
    blocks_run: int = 0


class BlockCost(NamedTuple):
    """MACs of one hybrid transformer block at T0 tokens, split by what scales with the tokens:
    `tokens * (lin_in * m_in + lin_out * m_out + const) + quad * (tokens * m_in) ** 2`
    (m_in / m_out: fraction of the stage's tokens entering / leaving the block)."""
    tokens: int
    lin_in: float
    quad: float
    lin_out: float
    const: float
    first: bool


@dataclasses.dataclass
class _HybridRecords:
    """What a hybrid model's forward collects from its blocks (model-level, per forward)."""
    masks: List[torch.Tensor] = dataclasses.field(default_factory=list)
    costs: List[BlockCost] = dataclasses.field(default_factory=list)
    tokens: List[torch.Tensor] = dataclasses.field(default_factory=list)


class _HybridContext(token_ops.StateSlot):
    """The slot shared by a hybrid model, its stages and blocks: `state` holds the records of the
    model's own forward (stages called alone still merge), `stage` the state of the transformer
    stage that runs."""
    __slots__ = ("masked", "stage")

    def __init__(self):
        super().__init__()
        self.masked = True
        self.stage: Optional[LTMPStageState] = None


def _begin_stage(ctx: _HybridContext, tokens: torch.Tensor, grid: Optional[Tuple[int, int]]) -> LTMPStageState:
    seqs, count, _ = tokens.shape
    group = torch.arange(count, device=tokens.device).expand(seqs, count)
    return LTMPStageState(size=torch.ones_like(tokens[..., :1]), group=group, grid=grid,
                          mask=torch.ones_like(tokens[..., 0]) if ctx.masked else None)


def stage_grid(tokens: torch.Tensor, st: LTMPStageState, pruned: str = "parked") -> torch.Tensor:
    """Unmerge tokens `[S, T, C]` to the stage's grid positions `[S, T0, C]` through the group map.

    Each position gets a copy of its group's token. `pruned="parked"` (stage output): a pruned
    token's positions hold its value at pruning (inference: `parked`; masked: the frozen token
    itself). `pruned="zero"` (spatial convolutions inside a stage): pruned positions are 0 in
    both models, as if absent.
    """
    index = st.group.clamp(min=0)
    full = tokens.gather(1, index[..., None].expand(-1, -1, tokens.shape[-1]))
    if st.mask is not None:
        if pruned == "zero":
            full = full * st.mask.gather(1, index)[..., None].to(full.dtype)
        return full
    gone = st.group < 0
    if bool(gone.any()):
        fill = st.parked.to(full.dtype) if pruned == "parked" else torch.zeros_like(full)
        full = torch.where(gone[..., None], fill, full)
    return full


def regroup(full: torch.Tensor, st: LTMPStageState, num_tokens: int) -> torch.Tensor:
    """Re-merge a grid tensor `[S, T0, C]` into the current tokens `[S, T, C]` by the member mean
    (positions of pruned tokens left out; a token without members - a merged A token of the
    masked model, padding - gets 0)."""
    live = st.group >= 0
    index = st.group.clamp(min=0)
    seqs, _, channels = full.shape
    sums = full.new_zeros(seqs, num_tokens, channels).scatter_add(
        1, index[..., None].expand(-1, -1, channels), full.masked_fill(~live[..., None], 0.0))
    counts = full.new_zeros(seqs, num_tokens).scatter_add(1, index, live.to(full.dtype))
    return sums / counts.clamp(min=1.0)[..., None]


def _on_grid(module: nn.Module, tokens: torch.Tensor, st: LTMPStageState) -> torch.Tensor:
    """A spatial module on tokens `[S, T, C]`: unmerge (pruned positions 0), run on the grid, re-merge."""
    full = stage_grid(tokens, st, pruned="zero")
    seqs, _, channels = full.shape
    height, width = st.grid
    out = module(full.transpose(1, 2).reshape(seqs, channels, height, width)).flatten(2).transpose(1, 2)
    return regroup(out, st, tokens.shape[1])


def ltmp_lite_mla(mla: nn.Module, x: torch.Tensor, st: LTMPStageState):
    """timm `LiteMLA` on tokens `[S, T, C]` with LTMP's importance and merge metric.

    Keys are weighted by size (proportional attention: a token of size s counts s times in
    `k^T [v, 1]`) and by the mask (masked model) or validity (padding). Importance of key j =
    its attention mass `q_i . k_j / z_i` (z_i the normaliser) averaged over the heads of all
    scales and over the query rows (masked model: all rows; inference: valid rows), computed
    without the T x T matrix; the protected token (most important) gets +inf. Metric: the keys
    before the ReLU kernel averaged over heads. Returns (output `[S, T, C_out]`, metric, importance).
    """

    seqs, count, _ = x.shape
    qkv = token_ops.pointwise(mla.qkv, x)
    multi = torch.cat([qkv] + [_on_grid(op, qkv, st) for op in mla.aggreg], dim=-1)
    multi = multi.reshape(seqs, count, -1, 3 * mla.dim).transpose(1, 2)  # timm's channel order
    q, k, v = multi.chunk(3, dim=-1)
    metric = k.mean(dim=1, dtype=torch.float32)  # fp32 like ltmp_attention's
    q, k = mla.kernel_func(q), mla.kernel_func(k)
    weight = st.size[..., 0].to(k.dtype)
    if st.mask is not None:
        weight = weight * st.mask.to(k.dtype)
    elif st.valid is not None:
        weight = weight.masked_fill(~st.valid, 0.0)
    k = k * weight[:, None, :, None]
    v = F.pad(v, (0, 1), mode="constant", value=1.0)
    with torch.autocast(device_type=v.device.type, enabled=False):
        qf, kf, vf = q.float(), k.float(), v.float()
        out = qf @ (kf.transpose(-1, -2) @ vf)
        norm = out[..., -1:] + mla.eps
        out = out[..., :-1] / norm
        rows = qf / norm  # row i of the attention matrix is rows_i . k_j
        if st.valid is not None:
            used = st.valid.to(rows.dtype)[:, None, :, None]
            rows = (rows * used).sum(dim=2) / used.sum(dim=2)
        else:
            rows = rows.mean(dim=2)
        importance = (kf * rows[:, :, None, :]).sum(dim=-1).mean(dim=1)
    if st.valid is not None:
        importance = importance.masked_fill(~st.valid, -math.inf)
    importance = protect_importance(importance, class_token=False)
    out = out.to(v.dtype).transpose(1, 2).reshape(seqs, count, -1)
    return token_ops.pointwise(mla.proj, out), metric, importance


def _hybrid_step(block: nn.Module, st: LTMPStageState, records: Optional[_HybridRecords], x: torch.Tensor,
                 attn_out: torch.Tensor, metric: torch.Tensor, importance: torch.Tensor,
                 feedforward: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Attention residual, merge, prune, feed-forward residual of one hybrid block; updates `st`."""
    st.blocks_run += 1
    if st.mask is not None:
        mask_in = st.mask
        x = x + mask_in[..., None].to(x.dtype) * attn_out  # pruned tokens stay frozen
        x, st.size, mask, importance, _, index = masked_merge(
            x, st.size, st.mask, importance, metric, block.merge_masker, None, class_token=False, with_index=True)
        st.mask = torch.where(mask.bool(), block.prune_masker(importance), mask)
        st.group = index.gather(1, st.group)
        x = x + st.mask[..., None].to(x.dtype) * feedforward(x)
        if records is not None:
            records.masks.append(st.mask)
            records.tokens.append(st.mask.detach().sum(dim=1))
        return x
    x = x + attn_out
    x, st.size, valid, _, _, moved = merge_prune_compact(
        x, st.size, importance, metric, block.merge_masker.threshold, block.prune_masker.threshold, st.valid,
        None, class_token=False, with_index=True)
    live = st.group >= 0
    slot = moved.to_packed.gather(1, st.group.clamp(min=0))
    group = moved.new_index.gather(1, slot)
    parked_now = live & (group < 0)
    if bool(parked_now.any()):
        value = moved.merged_x.gather(1, slot[..., None].expand(-1, -1, x.shape[-1]))
        parked = st.parked if st.parked is not None else torch.zeros_like(value)
        st.parked = torch.where(parked_now[..., None], value, parked)
    st.group = torch.where(live, group, torch.full_like(group, -1))
    st.valid = valid
    x = x + feedforward(x)
    if valid is not None:
        x = x.masked_fill(~valid[..., None], 0.0)
    if records is not None:
        records.tokens.append(torch.full((x.shape[0],), x.shape[1], device=x.device) if valid is None
                              else valid.sum(dim=1))
    return x


class LTMPHybridBlock(Block):
    """MobileViT's transformer block (timm `Block` on `[B * P, N, C]`) with LTMP's two thresholds.

    In a stage run by `LTMPTransformerSequence`: attention with importance (no class token: the
    most important token is protected), merge and prune between the residuals as in the ViT
    block; masked model: tokens stay in place and pruned tokens are frozen. Outside a stage:
    timm's block.
    """

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False) -> torch.Tensor:
        ctx: _HybridContext = self._ltmp_ctx
        st = ctx.stage
        if st is None or attn_mask is not None or is_causal:
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        if ctx.state is not None:
            ctx.state.costs.append(self._ltmp_cost(st))
        attn_out, metric, importance = ltmp_attention(self.attn, self.norm1(x), st.size, mask=st.mask,
                                                      valid=st.valid, class_token=False)
        attn_out = self.drop_path1(self.ls1(attn_out))
        return _hybrid_step(self, st, ctx.state, x, attn_out, metric, importance,
                            lambda t: self.drop_path2(self.ls2(self.mlp(self.norm2(t)))))

    def _ltmp_cost(self, st: LTMPStageState) -> BlockCost:
        attn, mlp = self.attn, self.mlp
        return BlockCost(tokens=st.group.shape[1], lin_in=attn.qkv.weight.numel() + attn.proj.weight.numel(),
                         quad=2 * attn.attn_dim, lin_out=mlp.fc1.weight.numel() + mlp.fc2.weight.numel(),
                         const=0.0, first=st.blocks_run == 0)


class LTMPTransformerSequence(nn.Sequential):
    """MobileViT's `transformer` (`nn.Sequential` of blocks): one `LTMPStageState` per call; the
    output is unmerged to all N patches (pruned ones: their value at pruning), so timm's norm,
    fold and convolutions see the full grid."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ctx: _HybridContext = self._ltmp_ctx
        st = _begin_stage(ctx, x, None)
        outer, ctx.stage = ctx.stage, st
        try:
            for block in self:
                x = block(x)
        finally:
            ctx.stage = outer
        return stage_grid(x, st)


class LTMPEfficientVitBlock(EfficientVitBlock):
    """timm `EfficientVitBlock` on tokens `[B, T, C]` with LTMP's two thresholds.

    Z = x + LiteMLA(x) (`ltmp_lite_mla`), merge and prune, then Z + MBConv(Z) with MBConv's
    depthwise conv on the unmerged grid (pruned positions 0) and re-merged by the member mean.
    Called with an NCHW map (or outside a stage run by `LTMPEfficientVitStage`): timm's block.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ctx: _HybridContext = self._ltmp_ctx
        st = ctx.stage
        if st is None or x.dim() != 3:
            return super().forward(x)

        if ctx.state is not None:
            ctx.state.costs.append(self._ltmp_cost(st))
        context, local = self.context_module, self.local_module
        attn_out, metric, importance = ltmp_lite_mla(context.main, token_ops.pointwise(context.pre_norm, x), st)

        def feedforward(tokens: torch.Tensor) -> torch.Tensor:
            mbconv = local.main
            hidden = token_ops.pointwise(mbconv.inverted_conv, token_ops.pointwise(local.pre_norm, tokens))
            return token_ops.pointwise(mbconv.point_conv, _on_grid(mbconv.depth_conv, hidden, st))

        return _hybrid_step(self, st, ctx.state, x, attn_out, metric, importance, feedforward)

    def _ltmp_cost(self, st: LTMPStageState) -> BlockCost:
        mla, mbconv = self.context_module.main, self.local_module.main
        heads = (1 + len(mla.aggreg)) * (mla.qkv.conv.out_channels // (3 * mla.dim))  # all scales
        aggreg = sum(p.numel() for op in mla.aggreg for p in op.parameters() if p.dim() == 4)
        return BlockCost(tokens=st.group.shape[1],
                         lin_in=mla.qkv.conv.weight.numel() + mla.proj.conv.weight.numel()
                         + 2 * heads * mla.dim * (mla.dim + 1),
                         quad=0.0,
                         lin_out=mbconv.inverted_conv.conv.weight.numel() + mbconv.point_conv.conv.weight.numel(),
                         const=aggreg + mbconv.depth_conv.conv.weight.numel(),
                         first=st.blocks_run == 0)


class LTMPEfficientVitStage(EfficientVitStage):
    """timm `EfficientVitStage`: its LTMP blocks run on tokens (one `LTMPStageState` per run of
    them), unmerged to the grid before any other block and at the stage's end."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ctx: _HybridContext = self._ltmp_ctx
        tokens, st, outer = None, None, ctx.stage
        try:
            for block in self.blocks:
                if isinstance(block, LTMPEfficientVitBlock):
                    if tokens is None:
                        tokens = x.flatten(2).transpose(1, 2)
                        st = _begin_stage(ctx, tokens, tuple(x.shape[-2:]))
                        ctx.stage = st
                    tokens = block(tokens)
                else:
                    if tokens is not None:
                        x, tokens = self._to_map(tokens, st, x.shape[1]), None
                        ctx.stage = outer
                    x = block(x)
            if tokens is not None:
                x = self._to_map(tokens, st, tokens.shape[-1])
        finally:
            ctx.stage = outer
        return x

    @staticmethod
    def _to_map(tokens: torch.Tensor, st: LTMPStageState, channels: int) -> torch.Tensor:
        full = stage_grid(tokens, st)
        height, width = st.grid
        return full.transpose(1, 2).reshape(full.shape[0], channels, height, width)


def hybrid_flops_ratio(masks: Sequence[torch.Tensor], costs: Sequence[BlockCost]) -> torch.Tensor:
    """FLOPs ratio of a hybrid model's transformer blocks (the masked model's regulariser).

    masks: the L post-block masks `[S, T0]` of one forward, costs: the L blocks' `BlockCost`.
    `m_in` = 1 at a stage's first block, else the previous block's mean mask; `m_out` = this
    block's mean mask. Sum of the blocks' MACs at (m_in, m_out) over their sum unreduced: the
    ViT formula (spec section 6) generalised to blocks of different sizes, costs as counted.
    """
    if not masks or len(masks) != len(costs):
        raise ModelConfigError("hybrid_flops_ratio needs one mask and one cost per block (run the masked model first)")
    one = torch.ones((), device=masks[0].device, dtype=masks[0].dtype)
    reduced, full = torch.zeros_like(one), 0.0
    for i, (mask, cost) in enumerate(zip(masks, costs)):
        m_in = one if cost.first else masks[i - 1].mean()
        m_out = mask.mean()
        n = float(cost.tokens)
        reduced = reduced + n * (cost.lin_in * m_in + cost.lin_out * m_out + cost.const) + cost.quad * (n * m_in) ** 2
        full += n * (cost.lin_in + cost.lin_out + cost.const) + cost.quad * n * n
    return reduced / full


def _is_bn_frozen(module: nn.Module) -> bool:
    params = list(module.parameters(recurse=False))
    return isinstance(module, nn.modules.batchnorm._BatchNorm) and bool(params) and not any(
        p.requires_grad for p in params)


class _LTMPHybridMixin(_ThresholdAPI):
    """LTMP on a timm hybrid backbone (MobileViT `ByobNet`, `EfficientVit`); see docs/hybrid_merging.md.

    Masked models record `model.masks` (post-block `[S, T0]` masks) and `model.block_costs`
    after each forward; inference models `model.ltmp_info["tokens"]` (per block, tokens each
    sequence keeps). While training, BatchNorm layers whose parameters are frozen (the
    thresholds-only recipe) stay in eval mode, so the frozen backbone is the one the
    inference model runs.
    """

    masked = True
    return_masks = False

    def _ltmp_attach(self, record: dict) -> None:
        self.ltmp_kwargs = record
        self.tau = record["tau"]
        ctx = _HybridContext()
        ctx.masked = self.masked
        self._ltmp_ctx = ctx
        merge_init = record["merge_threshold"]
        if merge_init is None:
            merge_init = MASKED_MERGE_INIT if self.masked else INFERENCE_MERGE_INIT
        prune_init = PRUNE_INIT if record["prune_threshold"] is None else record["prune_threshold"]
        blocks = self._ltmp_swap_modules(ctx)
        if not blocks:
            raise ModelConfigError(f"{type(self).__name__} has no transformer blocks for LTMP")
        for block in blocks:
            block.merge_masker = ThresholdMasker(merge_init, record["tau"])
            block.prune_masker = ThresholdMasker(prune_init, record["tau"])
            block._ltmp_ctx = ctx
        self.masks: List[torch.Tensor] = []
        self.block_costs: List[BlockCost] = []
        self.ltmp_info: dict = {}

    def _ltmp_swap_modules(self, ctx: _HybridContext) -> List[nn.Module]:
        raise NotImplementedError

    def set_return_masks(self, enabled: bool) -> None:
        self.return_masks = bool(enabled)

    def ltmp_flops_ratio(self, masks: Sequence[torch.Tensor]) -> torch.Tensor:
        return hybrid_flops_ratio(masks, self.block_costs)

    def train(self, mode: bool = True):
        super().train(mode)
        if mode:
            for module in self.modules():
                if _is_bn_frozen(module):
                    module.eval()
        return self

    def _ltmp_run(self, fn, *args, **kwargs):
        ctx: _HybridContext = self._ltmp_ctx
        if ctx.state is not None:  # nested (forward -> forward_features)
            return fn(*args, **kwargs)
        records = _HybridRecords()
        ctx.state = records
        try:
            out = fn(*args, **kwargs)
        finally:
            ctx.state = None
        self.block_costs = records.costs
        if self.masked:
            self.masks = records.masks
        else:
            self.ltmp_info = {"tokens": records.tokens}
        return out

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self._ltmp_run(super().forward_features, x)

    def forward_intermediates(self, *args, **kwargs):
        return self._ltmp_run(super().forward_intermediates, *args, **kwargs)

    def forward(self, x: torch.Tensor):
        logits = self._ltmp_run(super().forward, x)
        if self.masked and self.training and self.return_masks:
            return {"logits": logits, "masks": list(self.masks)}
        return logits


def _hybrid_record(kwargs: dict, tau, merge_threshold, prune_threshold) -> dict:
    tau = _check_tau(tau)
    if merge_threshold is not None:
        merge_threshold = _check_threshold(merge_threshold, "merge_threshold")
    if prune_threshold is not None:
        prune_threshold = _check_threshold(prune_threshold, "prune_threshold")
    return dict(kwargs, tau=tau, merge_threshold=merge_threshold, prune_threshold=prune_threshold)


class LTMPByobNet(_LTMPHybridMixin, ByobNet):
    """Masked (training) LTMP MobileViT: every `MobileVitBlock`'s transformer blocks carry the
    thresholds; tokens are merged and pruned inside each transformer and unmerged before `norm`
    / fold / `conv_proj`."""

    masked = True

    def __init__(self, cfg, tau: float = 0.1, merge_threshold: Optional[float] = None,
                 prune_threshold: Optional[float] = None, ltmp_threshold: Optional[float] = None,
                 ltmp_merge_threshold: Optional[float] = None, **kwargs):
        record = _hybrid_record(dict(kwargs, cfg=cfg), tau, merge_threshold, prune_threshold)
        super().__init__(cfg=cfg, **kwargs)
        self._ltmp_attach(record)
        self._ltmp_overrides_init(ltmp_threshold, ltmp_merge_threshold, masked=self.masked)

    def _ltmp_swap_modules(self, ctx: _HybridContext) -> List[nn.Module]:
        blocks = []
        for module in list(self.modules()):
            if isinstance(module, MobileVitBlock):
                if not isinstance(module.transformer, nn.Sequential):
                    raise ModelConfigError("LTMP needs MobileViT's transformer as a sequence of timm blocks")
                module.transformer.__class__ = LTMPTransformerSequence
                module.transformer._ltmp_ctx = ctx
                for block in module.transformer:
                    if type(block) is not Block:
                        raise ModelConfigError(f"LTMP needs timm Blocks in MobileViT's transformer, got "
                                               f"{type(block).__name__} (MobileViT-v2 is not supported)")
                    _check_attention(block.attn)
                    block.__class__ = LTMPHybridBlock
                    blocks.append(block)
        return blocks


class InferenceLTMPByobNet(LTMPByobNet):
    """Inference LTMP MobileViT: tokens really merged and removed (padded per sequence)."""

    masked = False


class LTMPEfficientVit(_LTMPHybridMixin, EfficientVit):
    """Masked (training) LTMP EfficientViT-MIT: the `EfficientVitBlock`s carry the thresholds;
    tokens are merged and pruned inside each attention stage and unmerged before every
    spatial convolution and at the stage's end."""

    masked = True

    def __init__(self, tau: float = 0.1, merge_threshold: Optional[float] = None,
                 prune_threshold: Optional[float] = None, ltmp_threshold: Optional[float] = None,
                 ltmp_merge_threshold: Optional[float] = None, **kwargs):
        record = _hybrid_record(kwargs, tau, merge_threshold, prune_threshold)
        super().__init__(**kwargs)
        self._ltmp_attach(record)
        self._ltmp_overrides_init(ltmp_threshold, ltmp_merge_threshold, masked=self.masked)

    def _ltmp_swap_modules(self, ctx: _HybridContext) -> List[nn.Module]:
        blocks = []
        for stage in self.stages:
            if not any(type(b) is EfficientVitBlock for b in stage.blocks):
                continue
            stage.__class__ = LTMPEfficientVitStage
            stage._ltmp_ctx = ctx
            for block in stage.blocks:
                if type(block) is EfficientVitBlock:
                    for residual in (block.context_module, block.local_module):
                        if not isinstance(residual.shortcut, nn.Identity):
                            raise ModelConfigError("LTMP needs EfficientViT blocks with identity shortcuts")
                    block.__class__ = LTMPEfficientVitBlock
                    blocks.append(block)
        return blocks


class InferenceLTMPEfficientVit(LTMPEfficientVit):
    """Inference LTMP EfficientViT-MIT: tokens really merged and removed (padded per sample)."""

    masked = False


# masked class -> (inference class, plain timm class)
_INFERENCE_CLASSES = dict({
    LTMPVisionTransformer: (InferenceLTMPVisionTransformer, VisionTransformer),
    LTMPByobNet: (InferenceLTMPByobNet, ByobNet),
    LTMPEfficientVit: (InferenceLTMPEfficientVit, EfficientVit),
})
