"""LTMP's layers on timm's ViT: threshold maskers, the masked and the token-removing block,
and the two ViT models (the method and its contract: `models/ltmp.py`, `docs/methods/ltmp.md`).

Per-forward state (sizes, masks, padding) lives in one `LTMPState` made by the model's forward
and held in a `token_ops.StateSlot` shared with the blocks; blocks keep timm's
`Tensor -> Tensor` signature. A block called outside an LTMP forward runs as a plain timm block.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from functools import partial
from numbers import Real
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from . import family as _family
from . import token_ops
from .errors import ModelConfigError

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


class _LTMPContext(token_ops.StateSlot):
    """The slot shared by a model and its blocks (`state` is set only during the model's forward),
    plus `make` (during `forward_intermediates`, whose loop is timm's): builds the state from the
    first block's input."""
    __slots__ = ("make",)

    def __init__(self):
        super().__init__()
        self.make: Optional[Callable[[torch.Tensor], LTMPState]] = None


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

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
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

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
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
