"""LTM: learnable token merging on timm's ViT, Swin, MobileViT and EfficientViT.

Paper: Yancheng Wang, Yingzhen Yang, "Efficient Visual Transformer by Learnable Token
Merging", IEEE TPAMI 2025 (arXiv 2407.15219). The official repository has no LTM model code;
this module implements the project's definition in ``docs/methods/ltm.md``.

What changes relative to each timm base model (everything else, keys included, is timm's):
  - every transformer block gets a ``mask_module`` (two scalars: ``logit_scale``,
    ``prev_weight``) that turns the post-attention tokens Z into a row-stochastic merging mask
    G (each source token spreads its weight over the 3x3 neighbourhood of its home anchor on a
    smaller (h', w') grid, ``merged_grid``);
  - the block's FFN (ViT/Swin/MobileViT MLP, EfficientViT MBConv) runs on the merged tokens
    ``merge(Z, G)`` and its output is restored to the full grid with the same G, so the
    surrounding timm code (window partition, PatchMerging, MobileViT fold, convolutions) is
    untouched; prefix tokens (CLS/registers) are never merged;
  - G of one block is the prior of the next block of the same geometry (chain of masks);
  - ``compression_ratio=1.0`` skips the mask module: the model is bit-identical to timm's.

Merging and restoring use the index gathers/scatters of ``models.token_ops`` (``neighbor_merge``,
``neighbor_unmerge``) over the (h*w, 9) candidate table (no dense (h*w) x (h'*w') matrix). The
candidate table is recomputed once per forward per geometry (a handful of integer ops). Every
block keeps timm's ``Tensor -> Tensor`` forward: the module running a chain of blocks (the ViT,
a Swin / EfficientViT stage, a MobileViT block) makes one ``LTMState`` per forward (grid, prefix
count, the last block's ``MaskState``) that its blocks read through a shared slot, so forward
hooks fire on every block and timm's ``forward_intermediates`` / ``features_only`` work; nothing
outlives the call.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from functools import partial
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from timm.models import build_model_with_cfg, get_pretrained_cfg, generate_default_cfgs, register_model
from timm.models.byobnet import ByobNet
from timm.models.efficientvit_mit import EfficientVit, EfficientVitBlock, EfficientVitStage
from timm.models.mobilevit import MobileVitBlock, model_cfgs as mobilevit_cfgs
from timm.models.swin_transformer import (
    SwinTransformer, SwinTransformerBlock, SwinTransformerStage, checkpoint_filter_fn as swin_filter_fn)
from timm.models.vision_transformer import (
    Block, VisionTransformer, checkpoint_filter_fn as vit_filter_fn)

from .errors import ModelConfigError
from .token_ops import StateSlot, neighbor_dot, neighbor_merge, neighbor_unmerge

from . import family
from .hooks import MethodHooks
from .ltm_ib_loss import build_ib_criterion

__all__ = [
    "LTMMaskModule", "MaskState", "LTMState", "CandidateTable", "merged_grid", "candidate_table",
    "load_base_weights", "ltm_blocks",
]


MASK_KEYS = ("mask_module.logit_scale", "mask_module.prev_weight")
NUM_CANDIDATES = 9  # 3x3 anchor neighbourhood
_PRIOR_EPS = 1e-6
_MAX_LOGIT_SCALE = 100.0


def check_compression_ratio(ratio) -> float:
    """The ratio as a float, or a one-line ModelConfigError when it is outside (0, 1]."""
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 < float(ratio) <= 1.0:
        raise ModelConfigError(
            f"compression_ratio must be a number in (0, 1], got {ratio!r}; pass e.g. --compression-ratio 0.8")
    return float(ratio)


# ---------------------------------------------------------------------------------------------
# Geometry: merged grid and candidate table (pure functions)
# ---------------------------------------------------------------------------------------------

def merged_grid(h: int, w: int, ratio: float) -> Tuple[int, int]:
    """Target grid (h', w') keeping about ``ratio`` of h*w tokens, reduced evenly per row/column.

    Round half up (``floor(v + 0.5)``), not Python's banker's ``round``: (14, 14, 0.8) -> (13, 12).
    """
    if ratio >= 1.0:
        return h, w
    h2 = min(max(math.floor(h * math.sqrt(ratio) + 0.5), 1), h)
    w2 = min(max(math.floor(ratio * h * w / h2 + 0.5), 1), w)
    return h2, w2


@dataclass(frozen=True)
class CandidateTable:
    """Which merged tokens each source token may feed.

    index: (h*w, 9) long, row-major target index of slot t = 3*(dy+1) + (dx+1) around the
        source's home anchor (clamped into the grid where the slot is invalid);
    valid: (h*w, 9) bool, whether the slot lies inside the (h', w') grid.
    """
    grid: Tuple[int, int]
    merged: Tuple[int, int]
    index: torch.Tensor
    valid: torch.Tensor

    @property
    def num_targets(self) -> int:
        return self.merged[0] * self.merged[1]


def _home_anchor(size: int, merged_size: int, device) -> torch.Tensor:
    """a = min(m - 1, floor((y + 1/2) * m / n)) for y in [0, n), in exact integer arithmetic."""
    pos = torch.arange(size, device=device)
    return torch.div((2 * pos + 1) * merged_size, 2 * size, rounding_mode="floor").clamp_(max=merged_size - 1)


def candidate_table(grid: Tuple[int, int], merged: Tuple[int, int], device=None) -> CandidateTable:
    """Build the (h*w, 9) candidate table for merging an (h, w) grid onto (h', w')."""
    (h, w), (h2, w2) = grid, merged
    offsets = torch.arange(-1, 2, device=device)
    cand_y = _home_anchor(h, h2, device)[:, None] + offsets[None, :]  # (h, 3)
    cand_x = _home_anchor(w, w2, device)[:, None] + offsets[None, :]  # (w, 3)
    cand_y = cand_y[:, None, :, None]  # (h, 1, 3, 1)
    cand_x = cand_x[None, :, None, :]  # (1, w, 1, 3)
    valid = (cand_y >= 0) & (cand_y < h2) & (cand_x >= 0) & (cand_x < w2)
    index = cand_y.clamp(0, h2 - 1) * w2 + cand_x.clamp(0, w2 - 1)
    return CandidateTable(
        grid=(h, w), merged=(h2, w2),
        index=index.reshape(h * w, NUM_CANDIDATES),
        valid=valid.reshape(h * w, NUM_CANDIDATES))


# ---------------------------------------------------------------------------------------------
# Mask module and the merged feed-forward step shared by every backbone
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class MaskState:
    """What one LTM block hands to the next: its candidate table and merging mask G (B, h*w, 9)."""
    table: CandidateTable
    mask: torch.Tensor


class LTMMaskModule(nn.Module):
    """Produces the merging mask G from post-attention tokens (docs/methods/ltm.md).

    logits[i, t] = s * cos(z_i, A_c(i,t)) + prev_weight * log(P[i, t] + 1e-6), softmax over the
    valid slots; A = adaptive average pool of Z to (h', w'), s = min(exp(logit_scale), 100),
    P = the previous block's G (same geometry) or uniform over the valid slots. G is computed in
    float32 whatever the model's dtype (autocast off, inputs upcast), so bf16 runs merge like fp32.
    """

    keep_fp32 = True  # engine.cast_for_inference leaves these two scalars in float32

    def __init__(self, compression_ratio: float = 0.8, device=None):
        super().__init__()
        self.compression_ratio = check_compression_ratio(compression_ratio)
        self.logit_scale = nn.Parameter(torch.empty(1, device=device, dtype=torch.float32))
        self.prev_weight = nn.Parameter(torch.empty(1, device=device, dtype=torch.float32))
        self.reset_parameters()
        if self.compression_ratio >= 1.0:
            self.requires_grad_(False)  # bypassed: frozen so DDP sees no unused trainable parameter

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.logit_scale.fill_(math.log(10.0))
            self.prev_weight.zero_()

    def target_grid(self, grid: Tuple[int, int]) -> Tuple[int, int]:
        return merged_grid(grid[0], grid[1], self.compression_ratio)

    def merges(self, grid: Tuple[int, int]) -> bool:
        return self.target_grid(grid) != tuple(grid)

    def forward(self, tokens: torch.Tensor, grid: Tuple[int, int], prev: Optional[MaskState] = None) -> MaskState:
        """tokens (B, h*w, D) spatial tokens row-major on ``grid`` -> MaskState with G (B, h*w, 9)."""
        grid = (int(grid[0]), int(grid[1]))
        merged = self.target_grid(grid)
        same_geometry = prev is not None and prev.table.grid == grid and prev.table.merged == merged
        table = prev.table if same_geometry else candidate_table(grid, merged, tokens.device)
        with torch.autocast(device_type=tokens.device.type, enabled=False):
            z = tokens.float()
            anchors = F.adaptive_avg_pool2d(
                z.transpose(1, 2).reshape(z.shape[0], z.shape[-1], grid[0], grid[1]), merged)
            anchors = anchors.flatten(2).transpose(1, 2)
            cosine = neighbor_dot(F.normalize(z, dim=-1), F.normalize(anchors, dim=-1), table.index)
            if same_geometry:
                prior = prev.mask.float()
            else:
                # uniform over valid slots: constant per row, so no effect, but keeps prev_weight in the graph
                prior = table.valid.float() / table.valid.sum(-1, keepdim=True)
            # the two scalars in fp32 too: a model cast to bf16 (cast_for_inference keeps them fp32
            # through `keep_fp32`, but a plain .to(bf16) does not) still computes G in fp32
            scale = self.logit_scale.float().exp().clamp(max=_MAX_LOGIT_SCALE)
            logits = scale * cosine + self.prev_weight.float() * torch.log(prior + _PRIOR_EPS)
            logits = logits.masked_fill(~table.valid, float("-inf"))
            mask = logits.softmax(dim=-1)
        return MaskState(table=table, mask=mask)

    def extra_repr(self) -> str:
        return f"compression_ratio={self.compression_ratio}"


def merged_feedforward(
        z: torch.Tensor,
        ffn: Callable[[torch.Tensor], torch.Tensor],
        mask_module: LTMMaskModule,
        grid: Tuple[int, int],
        num_prefix_tokens: int = 0,
        prev: Optional[MaskState] = None,
) -> Tuple[torch.Tensor, MaskState]:
    """z + restore(ffn(merge(z))) for z (B, P + h*w, D); the P prefix tokens ride along unmerged."""
    prefix, spatial = z[:, :num_prefix_tokens], z[:, num_prefix_tokens:]
    state = mask_module(spatial, grid, prev)
    index = state.table.index
    merged = neighbor_merge(spatial, state.mask, index, state.table.num_targets)
    if num_prefix_tokens:
        delta = ffn(torch.cat([prefix, merged], dim=1))
        restored = neighbor_unmerge(delta[:, num_prefix_tokens:], state.mask, index)
        return torch.cat([prefix + delta[:, :num_prefix_tokens], spatial + restored], dim=1), state
    return spatial + neighbor_unmerge(ffn(merged), state.mask, index), state


def _attach_mask_module(block: nn.Module, ltm_cls: type, compression_ratio: float) -> nn.Module:
    """Turn a built timm block into its LTM subclass in place: weights and keys kept, mask module added."""
    device = next(block.parameters()).device
    block.__class__ = ltm_cls
    block.mask_module = LTMMaskModule(compression_ratio, device=device)
    return block


# ---------------------------------------------------------------------------------------------
# Per-forward state: one LTMState per chain of blocks, shared through a slot
# ---------------------------------------------------------------------------------------------

@dataclass
class LTMState:
    """One forward's state for a chain of LTM blocks that hand their masks on.

    Made by the module that runs the chain (the ViT, a Swin or EfficientViT stage, a MobileViT
    block) and seen by its blocks through their shared slot. ``grid`` (h, w) and
    ``num_prefix_tokens`` describe the token sequence of ViT / MobileViT blocks (Swin and
    EfficientViT blocks read the grid from their NHWC / NCHW input); ``prev`` is the mask of the
    last block, the next block's prior (None after a block that did not merge).
    """
    grid: Optional[Tuple[int, int]] = None
    num_prefix_tokens: int = 0
    prev: Optional[MaskState] = None


def _share_slot(owner: nn.Module, blocks) -> None:
    slot = StateSlot()
    owner._ltm_slot = slot
    for block in blocks:
        if isinstance(getattr(block, "mask_module", None), LTMMaskModule):
            block._ltm_slot = slot


def _current_state(block: nn.Module) -> Optional[LTMState]:
    slot = getattr(block, "_ltm_slot", None)
    return None if slot is None else slot.state


def _chain_step(slot: StateSlot, block: nn.Module, x: torch.Tensor, state: LTMState):
    """``block(x)`` with a copy of ``state`` in ``slot`` -> (output, the state after the block).

    ``state`` itself is left as given, so a checkpointed step re-runs identically.
    """
    step = dataclasses.replace(state)
    outer, slot.state = slot.state, step
    try:
        x = block(x)
    finally:
        slot.state = outer
    return x, step


def _run_chain(slot: StateSlot, blocks, x: torch.Tensor, state: LTMState, checkpointing: bool = False):
    """x through ``blocks`` in order (each through ``__call__``), the mask chain carried in ``state``."""
    for block in blocks:
        if checkpointing and not torch.jit.is_scripting():
            x, state = checkpoint(_chain_step, slot, block, x, state, use_reentrant=False)
        else:
            x, state = _chain_step(slot, block, x, state)
    return x


# ---------------------------------------------------------------------------------------------
# Blocks
# ---------------------------------------------------------------------------------------------

class LTMBlock(Block):
    """timm ViT ``Block`` whose MLP runs on merged tokens (ViT and MobileViT transformers).

    Changes: adds ``mask_module``; the token grid, prefix count and previous mask come from the
    ``LTMState`` of the chain running it (timm's ``Tensor -> Tensor`` forward is kept). Below
    ratio 1 it runs only inside its model, which knows the grid.
    """
    _ltm_slot: Optional[StateSlot] = None

    def __init__(self, *args, compression_ratio: float = 0.8, **kwargs):
        super().__init__(*args, **kwargs)
        self.mask_module = LTMMaskModule(compression_ratio, device=kwargs.get("device"))

    def _ffn(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop_path2(self.ls2(self.mlp(self.norm2(x))))

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), attn_mask=attn_mask, is_causal=is_causal)))
        state = _current_state(self)
        if state is None or state.grid is None:
            if self.mask_module.compression_ratio < 1.0:
                raise ValueError("an LTM block with compression_ratio < 1 runs only inside its model's forward, "
                                 "which gives it the token grid; call the model (or its stage)")
            return x + self._ffn(x)
        if not self.mask_module.merges(state.grid):
            state.prev = None
            return x + self._ffn(x)
        x, state.prev = merged_feedforward(
            x, self._ffn, self.mask_module, state.grid, state.num_prefix_tokens, state.prev)
        return x


class LTMSwinBlock(SwinTransformerBlock):
    """timm ``SwinTransformerBlock`` with the MLP on tokens merged over the whole stage grid.

    Changes: ``mask_module``; forward(x NHWC) -> x NHWC as timm's, the previous mask taken from
    and handed to the stage's ``LTMState`` (alone: uniform prior). Window attention (``_attn``)
    is untouched; merging happens after it and the full grid is restored before returning.
    """
    _ltm_slot: Optional[StateSlot] = None

    def _ffn(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop_path2(self.mlp(self.norm2(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        x = x + self.drop_path1(self._attn(self.norm1(x)))
        x = x.reshape(B, -1, C)
        state = _current_state(self)
        mask = None
        if self.mask_module.merges((H, W)):
            x, mask = merged_feedforward(x, self._ffn, self.mask_module, (H, W), 0,
                                         state.prev if state is not None else None)
        else:
            x = x + self._ffn(x)
        if state is not None:
            state.prev = mask
        return x.reshape(B, H, W, C)


class LTMSwinStage(SwinTransformerStage):
    """timm ``SwinTransformerStage`` whose blocks hand their masks on through one ``LTMState``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        return _run_chain(self._ltm_slot, self.blocks, x, LTMState(), self.grad_checkpointing)


class LTMMobileVitBlock(MobileVitBlock):
    """timm ``MobileVitBlock`` whose transformer blocks are ``LTMBlock``s on the patch grid.

    Changes: forward re-implements timm's (unfold, transformer, norm, fold) and runs the
    transformer blocks on the (n_h, n_w) patch grid with one ``LTMState`` (the mask chain); each
    of the P pixel offsets is a separate batch row and is merged independently.
    """

    @classmethod
    def from_block(cls, block: MobileVitBlock, compression_ratio: float) -> "LTMMobileVitBlock":
        block.__class__ = cls
        for layer in block.transformer:
            _attach_mask_module(layer, LTMBlock, compression_ratio)
        _share_slot(block, block.transformer)
        return block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.conv_kxk(x)
        x = self.conv_1x1(x)

        patch_h, patch_w = self.patch_size
        B, C, H, W = x.shape
        new_h, new_w = math.ceil(H / patch_h) * patch_h, math.ceil(W / patch_w) * patch_w
        num_patch_h, num_patch_w = new_h // patch_h, new_w // patch_w
        num_patches = num_patch_h * num_patch_w
        interpolate = new_h != H or new_w != W
        if interpolate:
            x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", align_corners=False)

        # [B, C, H, W] -> [B * P, N, C], N row-major on (n_h, n_w)
        x = x.reshape(B * C * num_patch_h, patch_h, num_patch_w, patch_w).transpose(1, 2)
        x = x.reshape(B, C, num_patches, self.patch_area).transpose(1, 3).reshape(B * self.patch_area, num_patches, -1)

        state = LTMState(grid=(num_patch_h, num_patch_w))
        x = _run_chain(self._ltm_slot, self.transformer, x, state)
        x = self.norm(x)

        # [B * P, N, C] -> [B, C, H, W]
        x = x.contiguous().view(B, self.patch_area, num_patches, -1)
        x = x.transpose(1, 3).reshape(B * C * num_patch_h, num_patch_w, patch_h, patch_w)
        x = x.transpose(1, 2).reshape(B, C, num_patch_h * patch_h, num_patch_w * patch_w)
        if interpolate:
            x = F.interpolate(x, size=(H, W), mode="bilinear", align_corners=False)

        x = self.conv_proj(x)
        if self.conv_fusion is not None:
            x = self.conv_fusion(torch.cat((shortcut, x), dim=1))
        return x


class LTMEfficientVitBlock(EfficientVitBlock):
    """timm ``EfficientVitBlock`` (MIT) whose MBConv runs on the merged feature map.

    Changes: ``mask_module``; Z = context_module(x) (LiteMLA + identity), output =
    Z + restore(MBConv(merge(Z))) replacing local_module's identity shortcut; forward(x) -> x as
    timm's, the previous mask taken from and handed to the stage's ``LTMState``.
    """
    _ltm_slot: Optional[StateSlot] = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.context_module(x)
        B, C, H, W = z.shape
        state = _current_state(self)
        if not self.mask_module.merges((H, W)):
            if state is not None:
                state.prev = None
            return self.local_module(z)
        h2, w2 = self.mask_module.target_grid((H, W))

        def mbconv(tokens: torch.Tensor) -> torch.Tensor:
            fmap = tokens.transpose(1, 2).reshape(B, C, h2, w2)
            return self.local_module.main(self.local_module.pre_norm(fmap)).flatten(2).transpose(1, 2)

        tokens = z.flatten(2).transpose(1, 2)
        out, mask = merged_feedforward(tokens, mbconv, self.mask_module, (H, W), 0,
                                       state.prev if state is not None else None)
        if state is not None:
            state.prev = mask
        return out.transpose(1, 2).reshape(B, C, H, W)


class LTMEfficientVitStage(EfficientVitStage):
    """timm ``EfficientVitStage`` whose LTM blocks hand their masks on through one ``LTMState``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _run_chain(self._ltm_slot, self.blocks, x, LTMState())


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------

class _LTMModelMixin:
    """Shared by every LTM model: IB-loss support and the optional training-time feature output.

    ``model(x)`` returns logits. In training, after ``set_return_features(True)`` (called by
    ``ib_loss.build_ib_criterion``), it returns ``{"logits", "features"}`` where features are the
    pooled pre-logits, computed in the same forward (DDP needs a single call through forward).
    """
    supports_ib_loss = True
    return_features = False

    def set_return_features(self, enabled: bool) -> None:
        self.return_features = bool(enabled)

    @property
    def ddp_find_unused_parameters(self) -> bool:
        # Below ratio 1 a block whose grid does not shrink at the run-time resolution (e.g. a
        # 2x2 grid at 0.8) bypasses its mask module, leaving its two parameters without grads.
        return self.compression_ratio < 1.0

    def forward(self, x, *args, **kwargs):
        if not (self.training and self.return_features):
            return super().forward(x, *args, **kwargs)
        features = self.forward_head(self.forward_features(x, *args, **kwargs), pre_logits=True)
        return {"logits": self.get_classifier()(features), "features": features}


class LTMVisionTransformer(_LTMModelMixin, VisionTransformer):
    """timm ``VisionTransformer`` with ``LTMBlock``s; its forwards make the blocks' ``LTMState``."""

    def __init__(self, *args, compression_ratio: float = 0.8, **kwargs):
        ratio = check_compression_ratio(compression_ratio)
        if kwargs.get("patch_drop_rate", 0.0) > 0 and ratio < 1.0:
            raise ModelConfigError("patch_drop_rate > 0 breaks the token grid LTM merges on; set it to 0")
        super().__init__(*args, block_fn=partial(LTMBlock, compression_ratio=ratio), **kwargs)
        self.compression_ratio = ratio
        _share_slot(self, self.blocks)

    def _new_state(self, x: torch.Tensor, attn_mask, is_causal: bool) -> LTMState:
        """The LTMState of one forward on images x (B, C, H, W)."""
        if (attn_mask is not None or is_causal) and self.compression_ratio < 1.0:
            raise ValueError("attention masks are not supported with compression_ratio < 1; use 1.0")
        grid = self.patch_embed.dynamic_feat_size(x.shape[-2:]) if self.dynamic_img_size else self.patch_embed.grid_size
        return LTMState(grid=(int(grid[0]), int(grid[1])), num_prefix_tokens=self.num_prefix_tokens)

    def forward_features(
            self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False,
    ) -> torch.Tensor:
        state = self._new_state(x, attn_mask, is_causal)
        x = self.norm_pre(self.patch_drop(self._pos_embed(self.patch_embed(x))))
        if attn_mask is not None or is_causal:  # ratio 1: nothing merges, the blocks are timm's
            for block in self.blocks:
                x = block(x, attn_mask=attn_mask, is_causal=is_causal)
        else:
            x = _run_chain(self._ltm_slot, self.blocks, x, state, self.grad_checkpointing)
        return self.norm(x)

    def forward_intermediates(self, x: torch.Tensor, *args, **kwargs):
        """timm's ``forward_intermediates``, with this forward's ``LTMState`` visible to the blocks."""
        state = self._new_state(x, kwargs.get("attn_mask"), kwargs.get("is_causal", False))
        if self.grad_checkpointing and torch.is_grad_enabled() and self.compression_ratio < 1.0:
            # timm's loop re-runs checkpointed blocks after this call, without the state
            raise ValueError("forward_intermediates with gradient checkpointing needs compression_ratio 1; "
                             "call set_grad_checkpointing(False)")
        slot = self._ltm_slot
        outer, slot.state = slot.state, state
        try:
            return super().forward_intermediates(x, *args, **kwargs)
        finally:
            slot.state = outer


class LTMSwinTransformer(_LTMModelMixin, SwinTransformer):
    """timm ``SwinTransformer`` whose stages and blocks are swapped for their LTM subclasses."""

    def __init__(self, *args, compression_ratio: float = 0.8, **kwargs):
        ratio = check_compression_ratio(compression_ratio)
        super().__init__(*args, **kwargs)
        self.compression_ratio = ratio
        for stage in self.layers:
            stage.__class__ = LTMSwinStage
            for block in stage.blocks:
                _attach_mask_module(block, LTMSwinBlock, self.compression_ratio)
            _share_slot(stage, stage.blocks)


class LTMByobNet(_LTMModelMixin, ByobNet):
    """timm ``ByobNet`` (MobileViT) whose ``MobileVitBlock``s become ``LTMMobileVitBlock``s."""

    def __init__(self, *args, compression_ratio: float = 0.8, **kwargs):
        ratio = check_compression_ratio(compression_ratio)
        super().__init__(*args, **kwargs)
        self.compression_ratio = ratio
        for module in list(self.modules()):
            if type(module) is MobileVitBlock:
                LTMMobileVitBlock.from_block(module, self.compression_ratio)


class LTMEfficientVit(_LTMModelMixin, EfficientVit):
    """timm ``EfficientVit`` (MIT) whose attention stages use ``LTMEfficientVitBlock``s."""

    def __init__(self, *args, compression_ratio: float = 0.8, **kwargs):
        ratio = check_compression_ratio(compression_ratio)
        super().__init__(*args, **kwargs)
        self.compression_ratio = ratio
        for stage in self.stages:
            if any(type(block) is EfficientVitBlock for block in stage.blocks):
                stage.__class__ = LTMEfficientVitStage
                for block in stage.blocks:
                    if type(block) is EfficientVitBlock:
                        _attach_mask_module(block, LTMEfficientVitBlock, self.compression_ratio)
                _share_slot(stage, stage.blocks)


# ---------------------------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------------------------

def is_mask_key(key: str) -> bool:
    return key.endswith(MASK_KEYS)


def ltm_blocks(model: nn.Module):
    """(name, module) of every module carrying a mask module, in forward order."""
    return [(name, module) for name, module in model.named_modules() if isinstance(
        getattr(module, "mask_module", None), LTMMaskModule)]


def _fill_mask_params(state_dict: dict, model: nn.Module) -> dict:
    """Add the model's own (init) mask parameters for every mask key the checkpoint lacks."""
    own = model.state_dict()
    filled = dict(state_dict)
    for key, value in own.items():
        if is_mask_key(key) and key not in filled:
            filled[key] = value.detach().clone()
    return filled


def load_base_weights(model: nn.Module, state_dict: dict) -> list:
    """Load a timm base-model state dict into an LTM model; mask parameters get their init values.

    Loads with ``strict=False`` and checks that the only missing keys are the mask-module ones
    and that nothing is unexpected. Returns the list of missing (mask) keys.
    """
    result = model.load_state_dict(state_dict, strict=False)
    other_missing = [k for k in result.missing_keys if not is_mask_key(k)]
    if other_missing or result.unexpected_keys:
        raise ValueError(
            f"checkpoint does not fit {type(model).__name__}: missing {other_missing[:3]} "
            f"unexpected {result.unexpected_keys[:3]}; pass the state dict of the matching timm base model")
    missing = set(result.missing_keys)
    for name, block in ltm_blocks(model):
        if f"{name}.mask_module.logit_scale" in missing or f"{name}.mask_module.prev_weight" in missing:
            block.mask_module.reset_parameters()
    return result.missing_keys


def _ltm_filter_fn(base_filter_fn: Optional[Callable]) -> Callable:
    """timm pretrained filter: base model's filter, then init values for the mask keys (strict load)."""
    def filter_fn(state_dict, model):
        if base_filter_fn is not None:
            state_dict = base_filter_fn(state_dict, model)
        return _fill_mask_params(state_dict, model)
    return filter_fn


# ---------------------------------------------------------------------------------------------
# Registration
# ---------------------------------------------------------------------------------------------

_BASE_MODELS = {
    "ltm_vit_small_patch16_224": "vit_small_patch16_224",
    "ltm_vit_base_patch16_224": "vit_base_patch16_224",
    "ltm_swin_tiny_patch4_window7_224": "swin_tiny_patch4_window7_224",
    "ltm_swin_base_patch4_window7_224": "swin_base_patch4_window7_224",
    "ltm_mobilevit_xs": "mobilevit_xs",
    "ltm_mobilevit_s": "mobilevit_s",
    "ltm_efficientvit_b1": "efficientvit_b1",
}


def _inherited_cfg(name: str, base_name: str) -> Tuple[str, dict]:
    """("<name>.<tag>", cfg) copied from the base model's default pretrained cfg: same preprocessing,
    and its hub weights as the starting point (``pretrained=True`` loads the base weights, mask
    parameters at init)."""
    cfg = get_pretrained_cfg(base_name)
    fields = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("architecture", "tag")}
    return f"{name}.{cfg.tag}", fields


default_cfgs = generate_default_cfgs(dict(_inherited_cfg(name, base) for name, base in _BASE_MODELS.items()))


def _create(model_cls, variant: str, pretrained: bool, base_filter_fn=None, **kwargs):
    return build_model_with_cfg(
        model_cls, variant, pretrained, pretrained_filter_fn=_ltm_filter_fn(base_filter_fn), **kwargs)


@register_model
def ltm_vit_small_patch16_224(pretrained: bool = False, **kwargs) -> LTMVisionTransformer:
    model_args = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6)
    return _create(LTMVisionTransformer, "ltm_vit_small_patch16_224", pretrained, vit_filter_fn,
                   **dict(model_args, **kwargs))


@register_model
def ltm_vit_base_patch16_224(pretrained: bool = False, **kwargs) -> LTMVisionTransformer:
    model_args = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12)
    return _create(LTMVisionTransformer, "ltm_vit_base_patch16_224", pretrained, vit_filter_fn,
                   **dict(model_args, **kwargs))


@register_model
def ltm_swin_tiny_patch4_window7_224(pretrained: bool = False, **kwargs) -> LTMSwinTransformer:
    model_args = dict(patch_size=4, window_size=7, embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24))
    return _create(LTMSwinTransformer, "ltm_swin_tiny_patch4_window7_224", pretrained, swin_filter_fn,
                   **dict(model_args, **kwargs))


@register_model
def ltm_swin_base_patch4_window7_224(pretrained: bool = False, **kwargs) -> LTMSwinTransformer:
    model_args = dict(patch_size=4, window_size=7, embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32))
    return _create(LTMSwinTransformer, "ltm_swin_base_patch4_window7_224", pretrained, swin_filter_fn,
                   **dict(model_args, **kwargs))


@register_model
def ltm_mobilevit_xs(pretrained: bool = False, **kwargs) -> LTMByobNet:
    model_args = dict(model_cfg=mobilevit_cfgs["mobilevit_xs"], feature_cfg=dict(flatten_sequential=True))
    return _create(LTMByobNet, "ltm_mobilevit_xs", pretrained, **dict(model_args, **kwargs))


@register_model
def ltm_mobilevit_s(pretrained: bool = False, **kwargs) -> LTMByobNet:
    model_args = dict(model_cfg=mobilevit_cfgs["mobilevit_s"], feature_cfg=dict(flatten_sequential=True))
    return _create(LTMByobNet, "ltm_mobilevit_s", pretrained, **dict(model_args, **kwargs))


@register_model
def ltm_efficientvit_b1(pretrained: bool = False, **kwargs) -> LTMEfficientVit:
    model_args = dict(widths=(16, 32, 64, 128, 256), depths=(1, 2, 3, 3, 4), head_dim=16, head_widths=(1536, 1600))
    return _create(LTMEfficientVit, "ltm_efficientvit_b1", pretrained, **dict(model_args, **kwargs))


# ---------------------------------------------------------------------------------------------
# Method family: flags, the IB loss and the DDP needs the trainer discovers
# ---------------------------------------------------------------------------------------------

def _family_filter_fn(state_dict: dict, model: nn.Module) -> dict:
    """The registered models' pretrained filter, chosen by the model's base architecture."""
    base = vit_filter_fn if isinstance(model, VisionTransformer) else (
        swin_filter_fn if isinstance(model, SwinTransformer) else None)
    return _ltm_filter_fn(base)(state_dict, model)


class LTMHooks(MethodHooks):
    """The information-bottleneck loss (when `--ib-weight` > 0) and DDP's unused-parameter flag."""

    def wrap_criterion(self, criterion: nn.Module, model: nn.Module) -> nn.Module:
        if not (self.options.ib_weight or 0) > 0 or not getattr(model, "supports_ib_loss", False):
            return criterion
        return build_ib_criterion(criterion, model, self.options)

    def ddp_find_unused_parameters(self, model: nn.Module) -> bool:
        return bool(getattr(model, "ddp_find_unused_parameters", False))


def _search_ratio(build, target, gmacs_of):
    return family.search_continuous(0.05, 1.0, build, target, gmacs_of, decimals=3)


FAMILY = family.register_family(family.MethodFamily(
    name="ltm",
    title="LTM: learnable token merging",
    owns=family.models_of(__name__),
    flags=(
        family.Flag("--compression-ratio", type=family.auto_or(float), kwarg="compression_ratio", metavar="RATIO",
                    help="fraction of tokens each LTM block's FFN processes (model default 0.8; "
                         "'auto' with --target-gmacs)"),
        family.Flag("--ib-weight", type=float, default=0.1,
                    help="weight of the information-bottleneck loss (0: plain criterion)"),
        family.Flag("--ib-warmup-ratio", type=float, default=0.3,
                    help="the IB loss starts after this fraction of --epochs"),
        family.Flag("--ib-input-clusters", choices=("none", "kmeans"), default="none",
                    help="cluster the input images for the IB loss (none: one cluster per class)"),
    ),
    hooks=LTMHooks,
    checkpoint_filter_fn=_family_filter_fn,
    reduction=family.Reduction("compression_ratio", _search_ratio),
    examples=(
        family.Example("ltm_vit", model="ltm_vit_small_patch16_224",
                       kwargs=dict(depth=2, embed_dim=32, num_heads=2, patch_size=8), flags=("--compression-ratio", "0.8"),
                       invalid=dict(compression_ratio=0.0)),
        family.Example("ltm_swin", model="ltm_swin_tiny_patch4_window7_224", input_size=64, compile=(),
                       kwargs=dict(embed_dim=16, depths=(2, 2), num_heads=(1, 2), window_size=4)),
        family.Example("ltm_vit_base", model="ltm_vit_base_patch16_224", compile=(),
                       kwargs=dict(depth=2, embed_dim=32, num_heads=2, patch_size=8)),
        family.Example("ltm_swin_base", model="ltm_swin_base_patch4_window7_224", input_size=64, compile=(),
                       kwargs=dict(embed_dim=16, depths=(2, 2), num_heads=(1, 2), window_size=4)),
        family.Example("ltm_mobilevit", model="ltm_mobilevit_xs", input_size=64, compile=()),
        family.Example("ltm_mobilevit_s", model="ltm_mobilevit_s", input_size=64, compile=()),
        family.Example("ltm_efficientvit", model="ltm_efficientvit_b1", input_size=64, compile=(),
                       kwargs=dict(widths=(8, 8, 16, 16, 32), depths=(1, 1, 1, 2, 2), head_dim=8, head_widths=(32, 32))),
    ),
))
