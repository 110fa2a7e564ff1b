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
from typing import Callable, Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from timm.models import build_model_with_cfg, generate_default_cfgs, get_pretrained_cfg, register_model
from timm.models.byobnet import ByobNet
from timm.models.efficientvit_mit import EfficientVit, EfficientVitBlock, EfficientVitStage
from timm.models.mobilevit import MobileVitBlock, model_cfgs as mobilevit_cfgs
from timm.models.vision_transformer import Block, VisionTransformer, checkpoint_filter_fn as vit_filter_fn
from torch import nn

from . import family as _family
from . import token_ops
from .errors import ModelConfigError
from .hooks import MethodHooks

__all__ = [
    "LTMPVisionTransformer", "InferenceLTMPVisionTransformer", "LTMPBlock", "InferenceLTMPBlock",
    "ThresholdMasker", "LTMPState", "softmax_with_mask", "ltmp_attention", "masked_merge", "merge_prune_compact",
    "flops_ratio", "LTMPCriterion", "threshold_param_groups", "clamp_thresholds", "inference_twin",
    "realised_flops_ratio", "checkpoint_filter_fn", "is_threshold_key",
]

_logger = logging.getLogger(__name__)


THRESHOLD_KEYS = ("merge_masker.threshold", "prune_masker.threshold")
MASKED_MERGE_INIT = 0.9  # official: "if we set it 1. it only learns to prune"
INFERENCE_MERGE_INIT = 1.0
PRUNE_INIT = 0.0


# ---------------------------------------------------------------------------------------------
# Thresholds
# ---------------------------------------------------------------------------------------------

class ThresholdMasker(nn.Module):
    """One learned threshold (Parameter `[1]`) and its two decisions.

    `forward(values)`: straight-through mask, forward value exactly 0/1
    (`sigmoid((v - theta) / tau) > 0.5`), gradient of the sigmoid. `hard(values)`: the
    inference decision `values > theta` (bool).
    """

    keep_fp32 = True  # engine.cast_for_inference leaves the thresholds in fp32: they decide

    def __init__(self, init: float, tau: float):
        super().__init__()
        self.threshold = nn.Parameter(torch.full((1,), float(init)))
        self.tau = float(tau)

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        soft = torch.sigmoid((values - self.threshold) / self.tau)
        hard = (soft > 0.5).to(soft.dtype)
        return soft + (hard - soft).detach()

    def hard(self, values: torch.Tensor) -> torch.Tensor:
        return values > self.threshold

    def extra_repr(self) -> str:
        return f"tau={self.tau:g}"


def is_threshold_key(key: str) -> bool:
    return key.endswith(THRESHOLD_KEYS)


def _check_threshold(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not 0.0 <= float(value) <= 1.0:
        raise ModelConfigError(f"LTMP {name} must be a number in [0, 1] (training clamps thresholds there), "
                               f"got {value!r}; e.g. {name}=0.9")
    return float(value)


def _check_tau(tau) -> float:
    if isinstance(tau, bool) or not isinstance(tau, Real) or not float(tau) > 0 or not math.isfinite(tau):
        raise ModelConfigError(f"LTMP tau (sigmoid temperature) must be a positive number, got {tau!r}; e.g. tau=0.5")
    return float(tau)


# ---------------------------------------------------------------------------------------------
# Kernels (pure functions on [B, N, C])
# ---------------------------------------------------------------------------------------------

def softmax_with_mask(logits: torch.Tensor, mask: torch.Tensor, training: bool, eps: float = 1e-5) -> torch.Tensor:
    """Softmax over keys with masked keys removed; logits `[B, H, N, N]`, mask `[B, N]` (0/1).

    The max runs over all keys (masked ones included), as in the official code. Eval:
    masked keys get exactly 0. Training: `(e + eps / N) / (sum e + eps)` with N the full key
    count, so rows stay finite and every key keeps a small gradient path.
    """
    e = (logits - logits.amax(dim=-1, keepdim=True)).exp() * mask[:, None, None, :].to(logits.dtype)
    if training:
        return (e + eps / logits.shape[-1]) / (e.sum(dim=-1, keepdim=True) + eps)
    return e / e.sum(dim=-1, keepdim=True)


def ltmp_attention(
        attn: nn.Module,
        x: torch.Tensor,
        size: torch.Tensor,
        mask: Optional[torch.Tensor] = None,
        valid: Optional[torch.Tensor] = None,
        class_token: bool = True,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """timm `Attention` with proportional attention, importance and the merge metric.

    x `[B, N, C]` (normed), size `[B, N, 1]`; either `mask` `[B, N]` (masked model:
    `softmax_with_mask`, importance averaged over all N query rows) or `valid` `[B, N]` bool
    (inference padding: padded keys get probability 0, padded query rows are left out of the
    importance mean, padded tokens get importance -inf). Returns (output `[B, N, C]`,
    metric `[B, N, head_dim]` = keys averaged over heads, importance `[B, N]` with the class
    token at +inf). Without a class token (`class_token=False`, hybrid backbones) the most
    important token of each sequence gets +inf instead, so at least one token always survives.
    """
    batch, n, _ = x.shape
    qkv = attn.qkv(x).reshape(batch, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    logits = (q * attn.scale) @ k.transpose(-2, -1) + size.log()[:, None, None, :, 0].to(q.dtype)
    if mask is not None:
        probs = softmax_with_mask(logits, mask, attn.training)
    else:
        if valid is not None:
            logits = logits.masked_fill(~valid[:, None, None, :], -math.inf)
        probs = logits.softmax(dim=-1)
    # official: importance from the probabilities after attention dropout (identity in eval)
    probs = attn.attn_drop(probs)
    # Importance and metric decide which tokens go: accumulated / returned in fp32 whatever the
    # model's precision (a bf16 mean over H x N rows would round the thresholded score itself).
    if valid is None:
        importance = probs.mean(dim=(1, 2), dtype=torch.float32)
    else:
        rows = valid.to(probs.dtype)
        importance = ((probs * rows[:, None, :, None]).sum(dim=(1, 2), dtype=torch.float32)
                      / (rows.sum(-1, keepdim=True, dtype=torch.float32) * attn.num_heads))
        importance = importance.masked_fill(~valid, -math.inf)
    importance = protect_importance(importance, class_token)
    out = (probs @ v).transpose(1, 2).reshape(batch, n, attn.attn_dim)
    out = attn.norm(out)
    if getattr(attn, "gate", None) is not None:
        out = out * attn.gate(x).sigmoid()
    return attn.proj_drop(attn.proj(out)), k.mean(dim=1, dtype=torch.float32), importance


def protect_importance(importance: torch.Tensor, class_token: bool = True) -> torch.Tensor:
    """Importance `[B, N]` with the protected token at +inf: the class token (index 0), or
    without one the most important token of each sequence (never pruned, never merged away)."""
    if class_token:
        return torch.cat([torch.full_like(importance[:, :1], math.inf), importance[:, 1:]], dim=1)
    return importance.scatter(1, importance.argmax(dim=1, keepdim=True), math.inf)


def _best_partner(metric: torch.Tensor, b_valid: Optional[torch.Tensor] = None,
                  class_token: bool = True, sink: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """Cosine similarity of every A token (even) to its best B token (odd); the class row is -inf
    (`class_token=False`: no row is excluded; hybrid backbones).

    metric `[B, N, c]` (already normalised and masked by the caller); b_valid `[B, N // 2]`.
    The scores are fp32 (`token_ops.selection_precision`) whatever the model's precision.
    Returns (node_max `[B, ceil(N/2)]`, node_idx `[B, ceil(N/2)]`).
    """
    with token_ops.selection_precision(metric):
        metric = metric.float()
        if torch.compiler.is_compiling():
            # all pairs, then the A x B block: inductor's CPU bmm lowering cannot take the halves
            # of a data-dependent length (it guards on `(T + 1) // 2 == 1`)
            scores = (metric @ metric.transpose(-1, -2))[:, ::2, 1::2]
        else:
            scores = metric[:, ::2] @ metric[:, 1::2].transpose(-1, -2)
    if b_valid is not None:
        scores = scores.masked_fill(~b_valid[:, None, :], -math.inf)
    if sink:
        scores = torch.cat([scores, scores.new_full((*scores.shape[:-1], 1), -math.inf)], dim=-1)
    if class_token:
        scores[:, 0, :] = -math.inf
    return scores.max(dim=-1)


def masked_merge(
        x: torch.Tensor,
        size: torch.Tensor,
        mask: torch.Tensor,
        importance: torch.Tensor,
        metric: torch.Tensor,
        decide: Callable[[torch.Tensor], torch.Tensor],
        source: Optional[torch.Tensor] = None,
        class_token: bool = True,
        with_index: bool = False,
):
    """The masked model's threshold merge; nothing is removed.

    x `[B, N, C]`, size `[B, N, 1]`, mask `[B, N]` (0/1), importance `[B, N]`, metric
    `[B, N, c]`, decide: node_max `[B, A]` -> STE merge decision (0/1), source `[B, N, N0]` or
    None. Output order [all A tokens, all B tokens] (cls stays first): merged A tokens keep
    their own value and size but are masked; each B token holds the size-weighted sum of
    itself and its merged A tokens, its size the sum of theirs, its importance the max.
    Returns (x, size, mask, importance, source) in the new order; with `with_index` also
    `index` `[B, N]` long: the new position of every input token (a merged A token: its
    destination's), for the group maps of the hybrid backbones. `class_token=False`: no
    protected class row (hybrids; the protected token is the one with +inf importance).
    """
    channels = x.shape[-1]
    if x.shape[1] < 2:  # a single token (a 1x1 hybrid grid): nothing to match
        out = (x, size, mask, importance, source)
        return out + (torch.zeros_like(mask, dtype=torch.long),) if with_index else out
    x = x * size
    metric = metric / metric.norm(dim=-1, keepdim=True)
    metric = metric * mask[..., None].detach()  # masked tokens get a zero metric
    node_max, node_idx = _best_partner(metric, class_token=class_token)
    merge = decide(node_max)
    src_mask, dst_mask = mask[:, ::2], mask[:, 1::2]
    unmerged = torch.where(src_mask.bool(), 1 - merge, src_mask)
    weight = merge.detach()[..., None]

    # under autocast x, importance and the STE decisions can differ in dtype; scatter needs one
    packed = torch.cat([x, size.to(x.dtype)], dim=-1)
    src, dst = packed[:, ::2], packed[:, 1::2]
    dst = dst.scatter_reduce(1, node_idx[..., None].expand(-1, -1, channels + 1), src * weight.to(x.dtype),
                             reduce="sum")
    src_imp = importance[:, ::2] * weight[..., 0].to(importance.dtype)
    if class_token:
        src_imp = torch.cat([torch.zeros_like(src_imp[:, :1]), src_imp[:, 1:]], dim=1)  # cls: inf * 0
    else:  # the protected token, unmerged: inf * 0
        src_imp = torch.nan_to_num(src_imp, nan=0.0, posinf=math.inf)
    dst_imp = importance[:, 1::2].scatter_reduce(1, node_idx, src_imp, reduce="amax")
    if source is not None:
        dst_src = source[:, 1::2].scatter_reduce(1, node_idx[..., None].expand(-1, -1, source.shape[-1]),
                                                 source[:, ::2] * weight.to(source.dtype), reduce="amax")
        source = torch.cat([source[:, ::2], dst_src], dim=1)

    packed = torch.cat([src, dst], dim=1)
    x, size = packed[..., :channels], packed[..., channels:]
    mask = torch.cat([unmerged, dst_mask], dim=1)
    importance = torch.cat([importance[:, ::2], dst_imp], dim=1)
    if not with_index:
        return x / size, size, mask, importance, source
    num_a = src_mask.shape[1]
    merged = (weight[..., 0] > 0.5) & src_mask.bool()
    index_a = torch.where(merged, num_a + node_idx, torch.arange(num_a, device=x.device).expand_as(node_idx))
    index_b = num_a + torch.arange(dst_mask.shape[1], device=x.device).expand(x.shape[0], -1)
    index = torch.stack([index_a[:, :index_b.shape[1]], index_b], dim=2).flatten(1)
    if num_a > index_b.shape[1]:
        index = torch.cat([index, index_a[:, -1:]], dim=1)
    return x / size, size, mask, importance, source, index


class CompactIndex(NamedTuple):
    """Where `merge_prune_compact`'s input tokens went (hybrid backbones' group maps).

    to_packed `[B, T]`: each input token's slot in the merged order [A, B] (a merged A token:
    its destination's); new_index `[B, T]`: each merged slot's output index, -1 when pruned
    (or padding); merged_x `[B, T, C]`: the merged slots' values (before pruning).
    """
    to_packed: torch.Tensor
    new_index: torch.Tensor
    merged_x: torch.Tensor


def merge_prune_compact(
        x: torch.Tensor,
        size: torch.Tensor,
        importance: torch.Tensor,
        metric: torch.Tensor,
        merge_threshold: torch.Tensor,
        prune_threshold: torch.Tensor,
        valid: Optional[torch.Tensor] = None,
        source: Optional[torch.Tensor] = None,
        class_token: bool = True,
        with_index: bool = False,
):
    """The inference model's merge and prune with real token removal, per sample.

    x `[B, T, C]`, size `[B, T, 1]`, importance `[B, T]`, metric `[B, T, c]`, thresholds `[1]`,
    valid `[B, T]` bool (None: no padding), source `[B, T, N0]` or None. Each sample merges the
    A tokens whose best B match exceeds `merge_threshold` into it (size-weighted sum,
    importance max), then keeps the tokens whose importance exceeds `prune_threshold`, in the
    order [unmerged A, B]. Samples keeping fewer tokens than the longest are padded at the end
    (valid False, size 1, zeros). Returns (x `[B, T', C]`, size `[B, T', 1]`, valid or None,
    pruned size `[B]` (patches dropped here), source). With `with_index` also a `CompactIndex`
    (where each input token went, for the group maps of the hybrid backbones).
    `class_token=False`: no protected class row (hybrids).
    """
    batch, tokens, channels = x.shape
    num_a, num_b = (tokens + 1) // 2, tokens // 2
    a_valid = None if valid is None else valid[:, ::2]
    b_valid = None if valid is None else valid[:, 1::2]
    # a -inf sink column: with no B token (a lone class token) every A token stays unmerged,
    # without a branch on the sequence length (data-dependent after the first block)
    node_max, node_idx = _best_partner(metric / metric.norm(dim=-1, keepdim=True), b_valid, class_token,
                                       sink=True)
    merge = node_max > merge_threshold
    if a_valid is not None:
        merge = merge & a_valid
    # unmerged A tokens go to a sink slot past the B tokens, dropped afterwards
    target = torch.where(merge, node_idx, torch.full_like(node_idx, num_b))

    def into_b(values: torch.Tensor, reduce: str) -> torch.Tensor:
        src, dst = values[:, ::2], values[:, 1::2]
        sink = torch.zeros_like(src[:, :1]) if reduce == "sum" else torch.full_like(src[:, :1], -math.inf)
        index = target.view(batch, num_a, *([1] * (values.dim() - 2))).expand_as(src)
        dst = torch.cat([dst, sink], dim=1).scatter_reduce(1, index, src, reduce=reduce)
        return torch.cat([src, dst[:, :num_b]], dim=1)

    packed = into_b(torch.cat([x * size, size], dim=-1), "sum")
    unpacked = packed  # before compaction (packed order [A, B])
    importance = into_b(importance, "amax")
    in_sequence = ~torch.cat([merge, torch.zeros_like(merge[:, :num_b])], dim=1)
    if valid is not None:
        in_sequence = in_sequence & torch.cat([a_valid, b_valid], dim=1)
    keep = (importance > prune_threshold) & in_sequence
    pruned_size = (packed[..., -1] * (in_sequence & ~keep).to(packed.dtype)).sum(dim=1)

    counts = keep.sum(dim=1)
    compiling = torch.compiler.is_compiling()
    if compiling and tokens >= 2:
        # A data-dependent ("unbacked") length for the compiler: needs Dynamo's capture_scalar_outputs
        # (`dynamo_config`, see models.compiling). At least 2 slots, so inductor's CPU matmuls never
        # ask whether the length is 1; a slot past a sample's count is padding (valid False) as usual.
        longest = counts.max().clamp(min=2).item()
        torch._check(longest >= 2)
        torch._check(longest <= tokens)
    else:
        longest = int(counts.max())
    if source is not None:
        source = into_b(source, "amax")
    order = None
    if not compiling and bool(keep.all()):  # eager shortcuts; compiled code always takes the general path
        new_valid = None
    else:
        order = torch.sort((~keep).to(torch.uint8), dim=1, stable=True).indices[:, :longest]
        packed = packed.gather(1, order[..., None].expand(-1, -1, packed.shape[-1]))
        if source is not None:
            source = source.gather(1, order[..., None].expand(-1, -1, source.shape[-1]))
        new_valid = torch.arange(longest, device=x.device)[None, :] < counts[:, None]
        if not compiling and bool(new_valid.all()):
            new_valid = None
    x, size = packed[..., :channels], packed[..., channels:]
    x = x / size
    if new_valid is not None:
        x = x.masked_fill(~new_valid[..., None], 0.0)
        size = size.masked_fill(~new_valid[..., None], 1.0)
        if source is not None:
            source = source.masked_fill(~new_valid[..., None], 0.0)
    if not with_index:
        return x, size, new_valid, pruned_size, source
    # packed position of every input token: A i -> i, or its destination num_a + node_idx; B j -> num_a + j
    index_a = torch.where(merge, num_a + node_idx, torch.arange(num_a, device=x.device).expand_as(node_idx))
    to_packed = torch.empty(batch, tokens, dtype=torch.long, device=x.device)
    to_packed[:, ::2] = index_a
    to_packed[:, 1::2] = num_a + torch.arange(num_b, device=x.device)
    if order is None:
        new_index = torch.arange(tokens, device=x.device).expand(batch, tokens)
    else:
        new_index = torch.full((batch, tokens), -1, dtype=torch.long, device=x.device)
        new_index = new_index.scatter(1, order, torch.arange(longest, device=x.device).expand(batch, longest))
    new_index = new_index.masked_fill(~keep, -1)
    merged_x = unpacked[..., :channels] / unpacked[..., channels:]
    return x, size, new_valid, pruned_size, source, CompactIndex(to_packed, new_index, merged_x)


# ---------------------------------------------------------------------------------------------
# Blocks and per-forward state
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class LTMPState:
    """One forward's state. size `[B, T, 1]`; masked model: mask `[B, N]`; inference model:
    valid `[B, T]` bool or None (no padding); source `[B, T, N0]` when traced."""
    size: torch.Tensor
    mask: Optional[torch.Tensor] = None
    valid: Optional[torch.Tensor] = None
    source: Optional[torch.Tensor] = None
    masks: List[torch.Tensor] = dataclasses.field(default_factory=list)
    sources: List[torch.Tensor] = dataclasses.field(default_factory=list)
    token_counts: List[torch.Tensor] = dataclasses.field(default_factory=list)
    pruned_size: Optional[torch.Tensor] = None


class _LTMPContext:
    """Shared by a model and its blocks; `state` is set only during the model's forward.
    `make` (during `forward_intermediates`, whose loop is timm's): builds the state from the
    first block's input."""
    state: Optional[LTMPState] = None
    make: Optional[Callable[[torch.Tensor], LTMPState]] = None


class _ThresholdBlock(Block):
    """timm `Block` with the two LTMP thresholds (`merge_masker`, `prune_masker`)."""

    merge_init = MASKED_MERGE_INIT

    def __init__(self, *args, tau: float = 0.1, merge_threshold: Optional[float] = None,
                 prune_threshold: Optional[float] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.merge_masker = ThresholdMasker(self.merge_init if merge_threshold is None else merge_threshold, tau)
        self.prune_masker = ThresholdMasker(PRUNE_INIT if prune_threshold is None else prune_threshold, tau)
        self._ltmp_ctx = _LTMPContext()

    def _state(self, x: torch.Tensor, attn_mask, is_causal) -> Optional[LTMPState]:
        ctx = self._ltmp_ctx
        if ctx.state is None and ctx.make is not None:
            ctx.state = ctx.make(x)
        state = ctx.state
        if state is not None and (attn_mask is not None or is_causal):
            raise ModelConfigError("LTMP models take no attention mask (tokens are merged and removed); "
                                   "call them without attn_mask/is_causal")
        return state


class LTMPBlock(_ThresholdBlock):
    """Masked (training) block: merge and prune by updating the state's mask, shape kept."""

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False) -> torch.Tensor:
        state = self._state(x, attn_mask, is_causal)
        if state is None:
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        attn_out, metric, importance = ltmp_attention(self.attn, self.norm1(x), state.size, mask=state.mask)
        x = x + self.drop_path1(self.ls1(attn_out))
        x, state.size, mask, importance, state.source = masked_merge(
            x, state.size, state.mask, importance, metric, self.merge_masker, state.source)
        # only still-active tokens take the prune decision (merged/masked keep theirs)
        state.mask = torch.where(mask.bool(), self.prune_masker(importance), mask)
        state.masks.append(state.mask)
        if state.source is not None:
            state.sources.append(state.source)
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


class InferenceLTMPBlock(_ThresholdBlock):
    """Inference block: tokens really merged and removed (padded per sample, see module docstring)."""

    merge_init = INFERENCE_MERGE_INIT
    # the sequence length after each block is data-dependent (`merge_prune_compact`)
    dynamo_config = {"capture_scalar_outputs": True}

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False) -> torch.Tensor:
        state = self._state(x, attn_mask, is_causal)
        if state is None:
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        attn_out, metric, importance = ltmp_attention(self.attn, self.norm1(x), state.size, valid=state.valid)
        x = x + self.drop_path1(self.ls1(attn_out))
        x, state.size, state.valid, pruned, state.source = merge_prune_compact(
            x, state.size, importance, metric, self.merge_masker.threshold, self.prune_masker.threshold,
            state.valid, state.source)
        state.pruned_size = pruned if state.pruned_size is None else state.pruned_size + pruned
        state.token_counts.append(torch.full((x.shape[0],), x.shape[1], device=x.device) if state.valid is None
                                  else state.valid.sum(dim=1))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------

class _ThresholdAPI:
    """Threshold access shared by every LTMP model (ViT and hybrid), and the fixed-threshold rule
    of the inference models (`ltmp_threshold` / `ltmp_merge_threshold`, `--ltmp-threshold`)."""

    ltmp_overrides: Dict[str, float] = {}

    def _threshold_blocks(self) -> List[nn.Module]:
        """The blocks carrying thresholds, in forward order."""
        return [m for m in self.modules() if isinstance(getattr(m, "merge_masker", None), ThresholdMasker)]

    def thresholds(self) -> Dict[str, List[float]]:
        """Current thresholds per block: {"merge": [...], "prune": [...]}."""
        return {"merge": [b.merge_masker.threshold.item() for b in self._threshold_blocks()],
                "prune": [b.prune_masker.threshold.item() for b in self._threshold_blocks()]}

    def set_thresholds(self, merge: Union[None, float, Sequence[float]] = None,
                       prune: Union[None, float, Sequence[float]] = None) -> None:
        """Set thresholds (a number for every block or one per block), each in [0, 1]."""
        blocks = self._threshold_blocks()
        for name, values in (("merge_threshold", merge), ("prune_threshold", prune)):
            if values is None:
                continue
            values = [values] * len(blocks) if isinstance(values, Real) else list(values)
            if len(values) != len(blocks):
                raise ModelConfigError(f"LTMP {name} has {len(values)} values for {len(blocks)} blocks; "
                                       f"give one number or {len(blocks)}")
            masker = "merge_masker" if name.startswith("merge") else "prune_masker"
            with torch.no_grad():
                for block, value in zip(blocks, values):
                    getattr(block, masker).threshold.fill_(_check_threshold(value, name))

    def _ltmp_overrides_init(self, prune: Optional[float], merge: Optional[float], masked: bool) -> None:
        """Fixed thresholds of an inference model: every prune threshold `prune`, every merge
        threshold `merge` (None: left as built / loaded). Re-applied after every `load_state_dict`,
        so a checkpoint's learned values are replaced by the fixed ones."""
        given = {k: v for k, v in (("prune", prune), ("merge", merge)) if v is not None}
        if given and masked:
            raise ModelConfigError("ltmp_threshold / ltmp_merge_threshold (--ltmp-threshold) fix the thresholds of "
                                   "inference_ltmp_* models; masked ltmp_* models learn theirs (drop the flag)")
        for key, value in given.items():
            if value == _family.AUTO:
                raise ModelConfigError("--ltmp-threshold auto needs --target-gmacs G")
            _check_threshold(value, "ltmp_threshold" if key == "prune" else "ltmp_merge_threshold")
        self.ltmp_overrides = {k: float(v) for k, v in given.items()}
        if self.ltmp_overrides:
            self._apply_ltmp_overrides()
            self.register_load_state_dict_post_hook(lambda module, keys: module._apply_ltmp_overrides())

    def _apply_ltmp_overrides(self) -> None:
        self.set_thresholds(merge=self.ltmp_overrides.get("merge"), prune=self.ltmp_overrides.get("prune"))


class _LTMPModelMixin(_ThresholdAPI):
    """Constructor checks, the shared context and the LTMP `forward_features`."""

    block_cls: type = LTMPBlock
    trace_source = False

    def _ltmp_init(self, kwargs: dict, tau: float, merge_threshold: Optional[float],
                   prune_threshold: Optional[float]) -> dict:
        """Checked constructor kwargs (with tau and the threshold inits) for `_ltmp_finish`."""
        tau = _check_tau(tau)
        if merge_threshold is not None:
            merge_threshold = _check_threshold(merge_threshold, "merge_threshold")
        if prune_threshold is not None:
            prune_threshold = _check_threshold(prune_threshold, "prune_threshold")
        if "block_fn" in kwargs:
            raise ModelConfigError("LTMP models set their own block_fn; drop the block_fn argument")
        if not kwargs.get("class_token", True) or kwargs.get("global_pool", "token") != "token":
            raise ModelConfigError("LTMP needs a class token and token pooling (global_pool='token'); "
                                   "drop class_token/global_pool overrides")
        if kwargs.get("reg_tokens", 0):
            raise ModelConfigError("LTMP does not support register tokens; use reg_tokens=0")
        if kwargs.get("patch_drop_rate", 0.0):
            raise ModelConfigError("LTMP does not apply patch dropout (official forward); use patch_drop_rate=0")
        return dict(kwargs, tau=tau, merge_threshold=merge_threshold, prune_threshold=prune_threshold)

    def _ltmp_finish(self, record: dict) -> None:
        self.ltmp_kwargs = record  # constructor kwargs, to build the other twin (`inference_twin`)
        self.tau = record["tau"]
        self._ltmp_ctx = _LTMPContext()
        for block in self.blocks:
            _check_attention(block.attn)
            block._ltmp_ctx = self._ltmp_ctx

    def _new_state(self, x: torch.Tensor) -> LTMPState:
        raise NotImplementedError

    def _store(self, state: LTMPState) -> None:
        raise NotImplementedError

    def forward_features(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                         is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise ModelConfigError("LTMP models take no attention mask; call them without attn_mask/is_causal")
        if self.grad_checkpointing and self.training:
            raise ModelConfigError("LTMP cannot train with gradient checkpointing (blocks would re-run and "
                                   "record their masks twice); disable it")
        x = self.norm_pre(self._pos_embed(self.patch_embed(x)))
        state = self._new_state(x)
        self._ltmp_ctx.state = state
        try:
            x = self.blocks(x)
        finally:
            self._ltmp_ctx.state = None
        self._store(state)
        return self.norm(x)


    def forward_intermediates(self, x: torch.Tensor, *args, **kwargs):
        """timm's `forward_intermediates` with this forward's LTMP state: intermediates are the
        blocks' outputs without the class token, `output_fmt="NLC"` (tokens in LTMP's order; the
        inference model's are fewer, padded per sample where samples differ)."""
        output_fmt = kwargs.get("output_fmt", args[2] if len(args) > 2 else "NCHW")
        if output_fmt != "NLC":
            raise ModelConfigError("LTMP intermediates are merged / reordered token sequences, not a grid; "
                                   "call forward_intermediates(x, output_fmt='NLC')")
        if kwargs.get("attn_mask") is not None:
            raise ModelConfigError("LTMP models take no attention mask; call them without attn_mask")
        if self.grad_checkpointing and torch.is_grad_enabled():
            raise ModelConfigError("LTMP forward_intermediates cannot run with gradient checkpointing; disable it")
        made: List[LTMPState] = []
        ctx = self._ltmp_ctx

        def make(tokens: torch.Tensor) -> LTMPState:
            made.append(self._new_state(tokens))
            return made[-1]

        ctx.make = make
        try:
            out = super().forward_intermediates(x, *args, **kwargs)
        finally:
            ctx.make, ctx.state = None, None
        if made:
            self._store(made[-1])
        return out


def _check_attention(attn: nn.Module) -> None:
    needed = ("qkv", "num_heads", "head_dim", "attn_dim", "scale", "proj", "q_norm", "k_norm", "attn_drop")
    missing = [name for name in needed if not hasattr(attn, name)]
    if missing:
        raise ModelConfigError(f"LTMP needs timm's Attention layout; {type(attn).__name__} lacks {', '.join(missing)}")


class LTMPVisionTransformer(_LTMPModelMixin, VisionTransformer):
    """Masked (training) LTMP ViT. After each forward `model.masks` holds one `[B, N]` 0/1 mask per
    block (post-block, in that block's output order) and, with `trace_source`, `model.vizs` the
    `[B, N, N]` source maps. With `set_return_masks(True)` (used by `LTMPCriterion`) a training
    forward returns `{"logits", "masks"}`; eval always returns logits.
    """

    block_cls = LTMPBlock
    return_masks = False

    def __init__(self, *args, tau: float = 0.1, merge_threshold: Optional[float] = None,
                 prune_threshold: Optional[float] = None, ltmp_threshold: Optional[float] = None,
                 ltmp_merge_threshold: Optional[float] = None, **kwargs):
        if args:
            raise ModelConfigError("LTMP models take keyword arguments only")
        record = self._ltmp_init(kwargs, tau, merge_threshold, prune_threshold)
        super().__init__(**kwargs, block_fn=partial(self.block_cls, tau=record["tau"],
                                                    merge_threshold=record["merge_threshold"],
                                                    prune_threshold=record["prune_threshold"]))
        self._ltmp_finish(record)
        self._ltmp_overrides_init(ltmp_threshold, ltmp_merge_threshold, masked=self.block_cls is LTMPBlock)
        self.masks: List[torch.Tensor] = []
        self.vizs: List[torch.Tensor] = []

    def set_return_masks(self, enabled: bool) -> None:
        self.return_masks = bool(enabled)

    def _new_state(self, x: torch.Tensor) -> LTMPState:
        batch, tokens, _ = x.shape
        source = None
        if self.trace_source:
            source = torch.eye(tokens, device=x.device, dtype=x.dtype)[None].expand(batch, tokens, tokens)
        return LTMPState(size=torch.ones_like(x[..., :1]), mask=torch.ones_like(x[..., 0]), source=source)

    def _store(self, state: LTMPState) -> None:
        self.masks = state.masks
        self.vizs = state.sources

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False):
        logits = self.forward_head(self.forward_features(x, attn_mask=attn_mask, is_causal=is_causal))
        if self.training and self.return_masks:
            return {"logits": logits, "masks": list(self.masks)}
        return logits


class InferenceLTMPVisionTransformer(_LTMPModelMixin, VisionTransformer):
    """Inference LTMP ViT (tokens removed, exact for any batch). After each forward
    `model.ltmp_info` holds `tokens` (per block, tokens each sample keeps `[B]`), `size`
    (final token sizes `[B, T, 1]`), `valid` (`[B, T]` bool or None), `pruned_size` (`[B]`
    patches dropped) and, with `trace_source`, `source` (`[B, T, N]`).
    """

    block_cls = InferenceLTMPBlock

    def __init__(self, *args, tau: float = 0.1, merge_threshold: Optional[float] = None,
                 prune_threshold: Optional[float] = None, ltmp_threshold: Optional[float] = None,
                 ltmp_merge_threshold: Optional[float] = None, **kwargs):
        if args:
            raise ModelConfigError("LTMP models take keyword arguments only")
        record = self._ltmp_init(kwargs, tau, merge_threshold, prune_threshold)
        super().__init__(**kwargs, block_fn=partial(self.block_cls, tau=record["tau"],
                                                    merge_threshold=record["merge_threshold"],
                                                    prune_threshold=record["prune_threshold"]))
        self._ltmp_finish(record)
        self._ltmp_overrides_init(ltmp_threshold, ltmp_merge_threshold, masked=self.block_cls is LTMPBlock)
        self.ltmp_info: dict = {}

    def _new_state(self, x: torch.Tensor) -> LTMPState:
        batch, tokens, _ = x.shape
        source = None
        if self.trace_source:
            source = torch.eye(tokens, device=x.device, dtype=x.dtype)[None].expand(batch, tokens, tokens)
        return LTMPState(size=torch.ones_like(x[..., :1]), source=source,
                         pruned_size=torch.zeros_like(x[:, 0, 0]))

    def _store(self, state: LTMPState) -> None:
        self.ltmp_info = {"tokens": state.token_counts, "size": state.size, "valid": state.valid,
                          "pruned_size": state.pruned_size, "source": state.source}


# ---------------------------------------------------------------------------------------------
# Hybrid backbones: MobileViT transformer sequences, EfficientViT attention stages
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


class _HybridContext:
    """Shared by a hybrid model, its stages and blocks: `stage` while a transformer stage runs,
    `records` while the model's own forward runs (stages called alone still merge)."""
    masked: bool = True
    stage: Optional[LTMPStageState] = None
    records: Optional[_HybridRecords] = None


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
    from .tome import _pointwise  # the hybrid ToMe's per-pixel helper

    seqs, count, _ = x.shape
    qkv = _pointwise(mla.qkv, x)
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
    return _pointwise(mla.proj, out), metric, importance


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
        if ctx.records is not None:
            ctx.records.costs.append(self._ltmp_cost(st))
        attn_out, metric, importance = ltmp_attention(self.attn, self.norm1(x), st.size, mask=st.mask,
                                                      valid=st.valid, class_token=False)
        attn_out = self.drop_path1(self.ls1(attn_out))
        return _hybrid_step(self, st, ctx.records, x, attn_out, metric, importance,
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
        from .tome import _pointwise

        if ctx.records is not None:
            ctx.records.costs.append(self._ltmp_cost(st))
        context, local = self.context_module, self.local_module
        attn_out, metric, importance = ltmp_lite_mla(context.main, _pointwise(context.pre_norm, x), st)

        def feedforward(tokens: torch.Tensor) -> torch.Tensor:
            mbconv = local.main
            hidden = _pointwise(mbconv.inverted_conv, _pointwise(local.pre_norm, tokens))
            return _pointwise(mbconv.point_conv, _on_grid(mbconv.depth_conv, hidden, st))

        return _hybrid_step(self, st, ctx.records, x, attn_out, metric, importance, feedforward)

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
        if ctx.records is not None:  # nested (forward -> forward_features)
            return fn(*args, **kwargs)
        records = _HybridRecords()
        ctx.records = records
        try:
            out = fn(*args, **kwargs)
        finally:
            ctx.records = None
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


def _rng_state():
    return torch.get_rng_state(), (torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)


def _set_rng_state(state) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state_all(state[1])


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
        saved.append(_rng_state())
        evaluated.append((u, math.nan))
        return build(threshold_of(u))

    def count(model) -> float:
        try:
            gmacs = gmacs_of(model)
        finally:
            _set_rng_state(saved.pop())
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
