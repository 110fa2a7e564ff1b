"""ATS: "Adaptive Token Sampler For Efficient Vision Transformers" (Fayyaz et al., ECCV 2022,
arXiv 2111.15667), faithful to the official code (adaptivetokensampling/ATS) with its batch
dependence fixed. Page: docs/methods/ats.md.

A parameter-free, in-place patch for timm `VisionTransformer`s with a class token (DeiT, ViT,
distilled DeiT, the deployed attention-shrink models). Each block listed in `ats_blocks`
becomes an ATS block; parameters and state dict are untouched and `unpatch` restores the
original classes. Changes of an ATS block relative to timm's `Block`:

* the class row of the attention, `A[h, 0, :] = softmax((q_0 k^T) * scale)` over all n input
  tokens (padded keys at weight 0), is computed first, in float32, for the scores;
* significance score of patch j: `(sum over heads of A[h, 0, j]) * ||v_j||`, normalised over
  the image's own patches, sorted ascending, cumulated, min-max normalised; `K - 1` points
  spread from the smallest non-zero value to 1 pick their nearest cumulative value
  (inverse-transform sampling); duplicated picks collapse, so each image keeps its own
  number of tokens `1 + |picks| <= min(K, n)`;
* only the kept rows attend (fused attention of their queries over all n keys and values:
  tokens dropped here still serve as keys), and only they go through the projection, the
  residual (kept rows of the block input) and the MLP; the sequence leaves as [class token,
  kept patches in ascending score order];
* the scores, cumulative sum and sample points are computed in float32 under bf16
  (`token_ops.selection_precision`).

Ordinary blocks run timm's forward on whatever tokens they receive (padded keys masked).

Per-image results at any batch size (the official drop layout is batch dependent, spec
section 6): images that keep fewer tokens than the longest of the batch are padded at the end
of the sequence; padded rows are zero, excluded from every image's score distribution
(sum, sort, cumulative sum, min / max, candidates) and masked as keys (weight exactly 0), so
each image's logits equal those of the image alone while the batch still runs as one set of
dense matmuls. `drop_tokens=False` is the official masked layout instead: the sequence keeps
`min(K, rows)` rows, non-kept rows are zero and count as zero-score entries of later
distributions (as the official code, which is batch independent in that layout).

Per-forward state (padding mask, counts, kept positions) lives in one `ATSState` made by the
patched model's forward; blocks keep timm's `Tensor -> Tensor` signature. After each forward
`model._ats_info` holds `tokens` (`LongTensor [B, blocks run]`: real tokens, class token
included, leaving each block) and `kept` ({ATS block index: `[B, L]` original patch index of
each patch row, -1 for padding}).

Also here: the per-image FLOPs formula (`ats_macs_tensor`, three conventions), the filter for
checkpoints written by the official trainer (`checkpoint_filter_fn`), token statistics over an
evaluation (`start_statistics` / `statistics`), and the method family, whose `translate_argv`
reads the official SlowFast-style YAML configs (models/ats_config.py).
"""
from __future__ import annotations

import argparse
import ast
import functools
import json
import logging
import math
import os
import re
from dataclasses import dataclass, field
from numbers import Integral
from typing import Dict, List, NamedTuple, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ModelConfigError
from .gmacs_search import rng_state, set_rng_state
from .token_ops import StateSlot, selection_precision

__all__ = [
    "patch", "unpatch", "is_patched", "ATSConfig", "ATSState", "significance_scores", "sample_points",
    "inverse_transform_sampling", "Sampling", "kept_rows", "ats_block_indices", "block_caps",
    "ats_macs", "ats_macs_tensor", "ats_gmacs", "padded_batch_gmacs", "checkpoint_filter_fn", "MIN_TOKENS",
    "start_statistics", "stop_statistics", "statistics",
]

MIN_TOKENS = 8  # the official block breaks below 8 reference tokens


# ---------------------------------------------------------------------------
# Kernels (pure functions; B images, M patch entries, S sample points)
# ---------------------------------------------------------------------------

def significance_scores(cls_attn: torch.Tensor, v: torch.Tensor, num_prefix: int = 1,
                        real: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Normalised significance scores of the patch tokens.

    cls_attn `[B, H, N]`: attention probabilities of the class query (row 0) over the N keys;
    v `[B, H, N, D]`: values (qkv bias included); real `[B, N]` bool or None: rows whose score
    counts (padded / masked rows get score 0). Returns p `[B, N - num_prefix]` float32:
    `s_j = (sum_h A[h, 0, j]) * ||concat_h v_h[j]||_2` over the non-prefix tokens, divided by
    the image's sum. Computed in float32 whatever the inputs' dtype.
    """
    with selection_precision(v):
        attention = cls_attn.float().sum(dim=1)
        value_norm = torch.linalg.vector_norm(v.float(), ord=2, dim=(1, 3))  # over all heads' channels
        score = (attention * value_norm)[:, num_prefix:]
        if real is not None:
            score = score.masked_fill(~real[:, num_prefix:], 0.0)
        return score / score.sum(dim=1, keepdim=True)


def sample_points(y_start: torch.Tensor, num_samples: int) -> torch.Tensor:
    """The official sample points: y_start `[B]` (smallest non-zero normalised cumulative score)
    -> `[B, num_samples]`, `y_i = y* + (lam_i (S - 1) - y* i) / (S - 1)`, lam = linspace(0, 1, S).

    The operations are the official ones, in float32 (`y_0 = y*`, `y_{S-1} = 1` up to an ulp).
    """
    device = y_start.device
    lam = torch.linspace(0.0, 1.0, steps=num_samples, device=device, dtype=torch.float32)
    steps = torch.arange(num_samples, device=device, dtype=torch.float32)
    start = y_start.float()[:, None]
    return start + ((lam[None] * (num_samples - 1)) - start * steps[None]) / (num_samples - 1)


class Sampling(NamedTuple):
    """Result of `inverse_transform_sampling` for p `[B, M]`.

    order `[B, M]`: entry indices by ascending score, excluded entries first; rank position r
    of image b holds entry `order[b, r]`. first `[B]`: rank position of the image's lowest own
    entry (= number of excluded entries). picks `[B, S]`: the rank position each sample point
    picked. keep `[B, M]` bool: kept rank positions (duplicates collapsed). counts `[B]`: kept
    entries per image.
    """
    order: torch.Tensor
    first: torch.Tensor
    picks: torch.Tensor
    keep: torch.Tensor
    counts: torch.Tensor

    def kept_entries(self) -> torch.Tensor:
        """`[B, M]` bool over the original entry indices."""
        return torch.zeros_like(self.keep).scatter(1, self.order, self.keep)


def inverse_transform_sampling(p: torch.Tensor, num_samples: int,
                               excluded: Optional[torch.Tensor] = None) -> Sampling:
    """ATS's inverse-transform sampling, per image, exactly as the official block on that image.

    p `[B, M]` normalised scores (>= 0); num_samples S = K - 1; excluded `[B, M]` bool or None:
    entries that are not part of the image's distribution at all (padding of a batch): they
    take no part in the cumulative sum, its min / max or the candidates. With m own entries:
    sort ascending (stable), cumulate (float32), min-max normalise, S sample points from the
    smallest non-zero value to 1 (`sample_points`), each picks the nearest candidate (first on
    ties); candidates are the m values if S >= m, else only the top S ranks.
    """
    with selection_precision(p):
        p = p.float()
        batch, entries = p.shape
        if excluded is None:
            key = p
            first = torch.zeros(batch, dtype=torch.long, device=p.device)
        else:
            p = p.masked_fill(excluded, 0.0)
            key = p.masked_fill(excluded, -1.0)  # excluded entries sort first and add 0 to the cumsum
            first = excluded.sum(dim=1)
        order = torch.sort(key, dim=1, stable=True).indices
        cdf = torch.cumsum(p.gather(1, order), dim=1)
        low = cdf.gather(1, first.clamp(max=entries - 1)[:, None])
        high = cdf[:, -1:]
        span = high - low
        # one own entry (span 0): it is the only candidate, keep it instead of dividing by 0
        normalized = torch.where(span > 0, (cdf - low) / span.clamp_min(torch.finfo(torch.float32).tiny),
                                 torch.ones_like(cdf))
        position = torch.arange(entries, device=p.device)[None]
        own = position >= first[:, None]
        y_start = torch.where(own & (normalized != 0), normalized, torch.full_like(normalized, math.inf))
        ys = sample_points(y_start.amin(dim=1), num_samples)
        candidate = own & (position >= entries - num_samples)  # S < m: only the top S ranks
        values = torch.where(candidate, normalized, torch.full_like(normalized, math.inf))
        picks = torch.min((ys[:, :, None] - values[:, None, :]).abs(), dim=2).indices
        keep = torch.zeros(batch, entries, dtype=torch.bool, device=p.device).scatter(
            1, picks, torch.ones_like(picks, dtype=torch.bool))
        return Sampling(order, first, picks, keep, keep.sum(dim=1))


def kept_rows(sampling: Sampling, num_prefix: int, length: int):
    """Rows of the block's input that leave an ATS block, and which of them are real.

    Returns (rows `[B, length]` long: the prefix rows, then the kept patches in ascending rank
    order, then filler rows; real `[B, length]` bool: False for filler rows). `length` is at
    least `num_prefix` + the largest count.
    """
    batch, entries = sampling.keep.shape
    slots = length - num_prefix
    # kept rank positions first (ascending), then the rest (stable)
    slot_rank = torch.sort((~sampling.keep).to(torch.uint8), dim=1, stable=True).indices[:, :slots]
    patch_rows = sampling.order.gather(1, slot_rank) + num_prefix
    real = torch.arange(slots, device=patch_rows.device)[None] < sampling.counts[:, None]
    prefix = torch.arange(num_prefix, device=patch_rows.device).expand(batch, num_prefix)
    ones = torch.ones(batch, num_prefix, dtype=torch.bool, device=patch_rows.device)
    return torch.cat([prefix, patch_rows], dim=1), torch.cat([ones, real], dim=1)


# ---------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------

def _is_int(value) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


def ats_block_indices(depth: int, ats_blocks=None) -> List[int]:
    """Sorted ATS block indices; None = the official 3 .. depth - 1; () = none."""
    if ats_blocks is None:
        return list(range(3, depth))
    if _is_int(ats_blocks):
        ats_blocks = [ats_blocks]
    if not isinstance(ats_blocks, (list, tuple)) or not all(_is_int(i) for i in ats_blocks):
        raise ModelConfigError(f"ats_blocks must be a list of block indices such as [3, 4, 5], got {ats_blocks!r}")
    bad = [i for i in ats_blocks if not 0 <= i < depth]
    if bad:
        raise ModelConfigError(f"ats_blocks {bad} out of range for a model with {depth} blocks; "
                               f"use indices 0..{depth - 1}")
    if len(set(ats_blocks)) != len(ats_blocks):
        raise ModelConfigError(f"ats_blocks {list(ats_blocks)} lists a block twice; give each index once")
    return sorted(int(i) for i in ats_blocks)


def block_caps(depth: int, blocks: Sequence[int], num_tokens, initial_tokens: int) -> Dict[int, int]:
    """Reference token count K of every ATS block: None = the model's initial token count N0, an
    int = the same K everywhere, a list of `depth` entries = the official NUM_TOKENS (entries at
    other blocks ignored). Every used K must be an int >= MIN_TOKENS."""
    if num_tokens is None:
        caps = {i: initial_tokens for i in blocks}
    elif _is_int(num_tokens):
        caps = {i: int(num_tokens) for i in blocks}
    elif isinstance(num_tokens, (list, tuple)):
        if len(num_tokens) == 1:
            caps = {i: num_tokens[0] for i in blocks}
        elif len(num_tokens) != depth:
            raise ModelConfigError(f"num_tokens has {len(num_tokens)} entries; give one value or {depth} "
                                   f"(one per block, the official NUM_TOKENS)")
        else:
            caps = {i: num_tokens[i] for i in blocks}
    else:
        raise ModelConfigError(f"num_tokens must be None, an int or a list of ints, got {num_tokens!r}")
    for i, k in caps.items():
        if not _is_int(k) or k < MIN_TOKENS:
            raise ModelConfigError(f"ATS token count K at block {i} must be an int >= {MIN_TOKENS} "
                                   f"(class token included), got {k!r}")
    return {i: int(k) for i, k in caps.items()}


@dataclass
class ATSConfig:
    """Settings shared by a patched model and its blocks; `slot.state` is set only during a forward."""
    ats_blocks: List[int]
    caps: Dict[int, int]
    drop_tokens: bool
    num_prefix: int
    initial_tokens: int
    num_tokens: object = None  # as given (for re-patching / logging)
    slot: StateSlot = field(default_factory=StateSlot)  # the ATSState of the forward in progress
    totals: Optional[Dict[str, torch.Tensor]] = None  # running sums of `start_statistics`


@dataclass
class ATSState:
    """One forward's state. valid `[B, N]` bool: real rows of the current sequence (None: all);
    counts `[B]` real tokens per image (None: the sequence length); positions `[B, N - prefix]`
    original patch index of each patch row (-1: padding)."""
    valid: Optional[torch.Tensor] = None
    padding: Optional[torch.Tensor] = None  # ~valid
    counts: Optional[torch.Tensor] = None
    positions: Optional[torch.Tensor] = None
    tokens: List[torch.Tensor] = field(default_factory=list)
    kept: Dict[int, torch.Tensor] = field(default_factory=dict)

    def record(self, x: torch.Tensor) -> None:
        counts = self.counts
        if counts is None:
            counts = torch.full((x.shape[0],), x.shape[1], dtype=torch.long, device=x.device)
        self.tokens.append(counts)

    def info(self) -> dict:
        tokens = torch.stack(self.tokens, dim=1) if self.tokens else None
        return {"tokens": tokens, "kept": dict(self.kept)}


# ---------------------------------------------------------------------------
# Blocks and model
# ---------------------------------------------------------------------------

def _class_row(attn: nn.Module, q: torch.Tensor, k: torch.Tensor, valid: Optional[torch.Tensor]):
    """Class-query attention probabilities `[B, H, N]` in float32 (bf16 runs select like fp32 runs),
    with the official operation order `(q k^T) * scale`; padded keys get probability 0."""
    with selection_precision(q):
        logits = (q[:, :, :1].float() @ k.float().transpose(-2, -1)) * attn.scale
        if valid is not None:
            logits = logits.masked_fill(~valid[:, None, None, :], -math.inf)
        return logits.softmax(dim=-1)[:, :, 0]


def _zero_rows(x: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
    """x `[B, L, C]` with the rows where padding `[B, L]` is True set to 0 (in place without autograd)."""
    if torch.is_grad_enabled():
        return x.masked_fill(padding[..., None], 0.0)
    return x.masked_fill_(padding[..., None], 0.0)


def _block_state(block: nn.Module, attn_mask: Optional[torch.Tensor], is_causal: bool) -> Optional[ATSState]:
    """The ATS state of the forward in progress, or None where the block runs as timm's own
    (outside a patched model's forward, or given a mask of the caller's)."""
    state = block._ats_cfg.slot.state
    return None if attn_mask is not None or is_causal else state


class ATSBlockMixin:
    """An ATS block (see the module docstring); placed before timm's `Block` class."""

    # the drop layout's sequence length after the block is data-dependent (`_ats_length`)
    dynamo_config = {"capture_scalar_outputs": True}

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False) -> torch.Tensor:
        state = _block_state(self, attn_mask, is_causal)
        if state is None:
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        x = self._ats_forward(x, state, self._ats_cfg)
        state.record(x)
        return x

    def _ats_forward(self, x: torch.Tensor, state: ATSState, cfg: ATSConfig) -> torch.Tensor:
        attn = self.attn
        batch, n, channels = x.shape
        heads, dim = attn.num_heads, attn.head_dim
        prefix = cfg.num_prefix
        valid = state.valid
        y = self.norm1(x)
        qkv = attn.qkv(y).reshape(batch, n, 3, heads, dim)
        k = attn.k_norm(qkv[:, :, 1].transpose(1, 2))
        v = qkv[:, :, 2].transpose(1, 2)
        with torch.no_grad():
            cls_row = _class_row(attn, attn.q_norm(qkv[:, :1, 0].transpose(1, 2)), k, valid)
            p = significance_scores(cls_row, v, prefix, valid)
            excluded = None if valid is None or not cfg.drop_tokens else state.padding[:, prefix:]
            cap = self._ats_cap
            sampling = inverse_transform_sampling(p, cap - prefix, excluded)
            length = self._ats_length(sampling, n, cap, cfg)
            rows, real = kept_rows(sampling, prefix, length)
            images = torch.arange(batch, device=x.device)[:, None]

        # Only the kept rows attend (to all n keys, padded ones masked): fused attention on the
        # gathered queries (row by row the official softmax rows). Rows are taken by advanced
        # indexing, which is several times faster than gather on CPU.
        kept_q = attn.q_norm(qkv[images, rows, 0].transpose(1, 2))
        out = F.scaled_dot_product_attention(
            kept_q, k, v, attn_mask=None if valid is None else valid[:, None, None, :],
            dropout_p=attn.attn_drop.p if attn.training else 0.0, scale=attn.scale)
        out = attn.norm(out.transpose(1, 2).reshape(batch, length, attn.attn_dim))
        if getattr(attn, "gate", None) is not None:
            out = out * attn.gate(y[images, rows]).sigmoid()
        out = attn.proj_drop(attn.proj(out))
        x = x[images, rows] + self.drop_path1(self.ls1(out))
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))  # row-wise: filler rows harm no one

        if not torch.compiler.is_compiling() and bool(real.all()):  # eager shortcut; compiled code always masks
            real = None
        padding = None if real is None else ~real
        if padding is not None:
            x = _zero_rows(x, padding)

        with torch.no_grad():
            if state.positions is None:
                state.positions = torch.arange(n - prefix, device=x.device).expand(batch, n - prefix)
            positions = state.positions[images, rows[:, prefix:] - prefix]
            if padding is not None:
                positions = positions.masked_fill(padding[:, prefix:], -1)
            state.positions = positions
            state.kept[self._ats_index] = positions
            state.counts = sampling.counts + prefix
            state.valid, state.padding = real, padding
        return x

    @staticmethod
    def _ats_length(sampling: Sampling, n: int, cap: int, cfg: ATSConfig):
        """Rows leaving the block: masked layout min(K, n); drop layout the batch's largest count."""
        if not cfg.drop_tokens:
            return min(cap, n)
        prefix = cfg.num_prefix
        if torch.compiler.is_compiling():
            # a data-dependent ("unbacked") length for the compiler (`dynamo_config`: capture_scalar_outputs);
            # at least 2 rows, so inductor never asks whether it is 1
            longest = (sampling.counts.max() + prefix).clamp(min=2).item()
            torch._check(longest >= 2)
            torch._check(longest <= n)
            return longest
        return int(sampling.counts.max()) + prefix


class ATSPlainBlockMixin:
    """An ordinary block of a patched model: timm's forward with padded keys masked and padded
    rows re-zeroed (blocks without attention, such as the deployed shrink blocks, are row-wise)."""

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False) -> torch.Tensor:
        state = _block_state(self, attn_mask, is_causal)
        if state is None:
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        valid = state.valid
        if valid is None:
            x = super().forward(x)
        else:
            if getattr(self, "has_attention", True) and getattr(self, "attn", None) is not None:
                x = super().forward(x, attn_mask=valid[:, None, None, :])
            else:
                x = super().forward(x)
            x = _zero_rows(x, state.padding)
        state.record(x)
        return x


class ATSModelMixin:
    """Creates the per-forward `ATSState` and stores `_ats_info` after the forward."""

    def _ats_run(self, fn, *args, **kwargs):
        cfg: ATSConfig = self._ats_cfg
        if cfg.slot.state is not None:  # nested call (forward -> forward_features)
            return fn(*args, **kwargs)
        if self.training and getattr(self, "grad_checkpointing", False):
            raise ModelConfigError("ATS cannot train with gradient checkpointing (blocks re-run after the "
                                   "forward and resample); disable it")
        state = ATSState()
        outer = cfg.slot.open(state)
        try:
            out = fn(*args, **kwargs)
        finally:
            cfg.slot.close(outer)
        self._ats_info = state.info()
        if cfg.totals is not None and not self.training and self._ats_info["tokens"] is not None \
                and self._ats_info["tokens"].shape[1] == len(self.blocks):
            with torch.no_grad():
                _accumulate(self, self._ats_info["tokens"])
        return out

    def forward(self, *args, **kwargs):
        return self._ats_run(super().forward, *args, **kwargs)

    def forward_features(self, *args, **kwargs):
        return self._ats_run(super().forward_features, *args, **kwargs)

    def forward_intermediates(self, *args, **kwargs):
        output_fmt = kwargs.get("output_fmt", args[5] if len(args) > 5 else "NCHW")
        if output_fmt != "NLC" and self._ats_cfg.ats_blocks:
            raise ModelConfigError("ATS intermediates are token sequences of per-image length, not a grid; "
                                   "call forward_intermediates(x, output_fmt='NLC')")
        return self._ats_run(super().forward_intermediates, *args, **kwargs)


# ---------------------------------------------------------------------------
# Patching
# ---------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _patched_class(mixin: type, base: type) -> type:
    return type(f"ATS{base.__name__}", (mixin, base), {"_ats_base_class": base})


def is_patched(model: nn.Module) -> bool:
    return isinstance(model, ATSModelMixin)


_ATTENTION_NEEDS = ("qkv", "num_heads", "head_dim", "attn_dim", "scale", "q_norm", "k_norm", "attn_drop",
                    "norm", "proj", "proj_drop")


def _check_model(model: nn.Module) -> None:
    name = type(model).__name__
    if getattr(model, "_tome_cfg", None) is not None:
        raise ModelConfigError(f"{name} is patched by ToMe/ToFu; ATS cannot be combined with it "
                               "(models.tome.unpatch(model) first)")
    blocks = getattr(model, "blocks", None)
    if blocks is None or not hasattr(model, "patch_embed") or not hasattr(model, "num_prefix_tokens"):
        raise ModelConfigError(f"ATS needs a timm VisionTransformer (blocks, patch_embed); got {name}")
    for block in blocks:
        if hasattr(block, "forward_prune"):
            raise ModelConfigError(f"{name} is an EViT model (its blocks drop tokens themselves); use a DeiT/ViT")
        if hasattr(block, "merge_masker") or hasattr(block, "mask_module"):
            raise ModelConfigError(f"{name} is an LTM/LTMP model (its blocks merge tokens themselves); use a DeiT/ViT")
        if hasattr(block, "attention_weight"):
            raise ModelConfigError(f"{name} has lambda (dilution) blocks whose attention changes during training; "
                                   "use the deployed shrink model or a DeiT/ViT")
    if getattr(model, "cls_token", None) is None or getattr(model, "global_pool", "token") != "token":
        raise ModelConfigError(f"ATS needs a class token and class-token pooling (global_pool='token'); "
                               f"{name} has global_pool={getattr(model, 'global_pool', None)!r}")
    if getattr(model, "patch_drop", None) is not None and not isinstance(model.patch_drop, nn.Identity):
        raise ModelConfigError("ATS does not combine with patch dropout; build the model with patch_drop_rate=0")


def patch(model: nn.Module, ats_blocks=None, num_tokens=None, drop_tokens: bool = True) -> nn.Module:
    """Apply ATS to `model` in place (re-patching replaces the settings); returns the model.

    ats_blocks: block indices (None = 3 .. depth - 1, the official [3..11] at depth 12; () = none).
    num_tokens: None (K = the initial token count at every ATS block), an int, or a list of depth
    entries (official NUM_TOKENS). drop_tokens: True = tokens removed (per-image results), False =
    the official masked layout.
    """
    if is_patched(model):
        unpatch(model)
    _check_model(model)
    if not isinstance(drop_tokens, bool):
        raise ModelConfigError(f"drop_tokens must be True or False, got {drop_tokens!r}")
    depth = len(model.blocks)
    blocks = ats_block_indices(depth, ats_blocks)
    prefix = int(model.num_prefix_tokens)
    initial = prefix + int(model.patch_embed.num_patches)
    caps = block_caps(depth, blocks, num_tokens, initial)
    for i in blocks:
        block = model.blocks[i]
        if not getattr(block, "has_attention", True) or getattr(block, "attn", None) is None:
            raise ModelConfigError(f"block {i} has no attention (a deployed shrink block) and cannot be an ATS "
                                   "block; leave it out of ats_blocks")
        missing = [a for a in _ATTENTION_NEEDS if not hasattr(block.attn, a)]
        if missing:
            raise ModelConfigError(f"ATS needs timm's Attention layout at block {i}; "
                                   f"{type(block.attn).__name__} lacks {', '.join(missing)}")
        if caps[i] <= prefix + 1:
            raise ModelConfigError(f"ATS token count K at block {i} must exceed the prefix tokens + 1, got {caps[i]}")
    cfg = ATSConfig(ats_blocks=blocks, caps=caps, drop_tokens=drop_tokens, num_prefix=prefix,
                    initial_tokens=initial, num_tokens=num_tokens)
    for index, block in enumerate(model.blocks):
        mixin = ATSBlockMixin if index in caps else ATSPlainBlockMixin
        block.__class__ = _patched_class(mixin, type(block))
        block._ats_cfg = cfg
        block._ats_index = index
        if index in caps:
            block._ats_cap = caps[index]
    model.__class__ = _patched_class(ATSModelMixin, type(model))
    model._ats_cfg = cfg
    model._ats_info = {"tokens": None, "kept": {}}
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Undo `patch`: original classes back, patch attributes removed. No-op if not patched."""
    for module in model.modules():
        base = type(module).__dict__.get("_ats_base_class")
        if base is not None:
            module.__class__ = base
            for name in ("_ats_cfg", "_ats_info", "_ats_index", "_ats_cap"):
                module.__dict__.pop(name, None)
    return model


# ---------------------------------------------------------------------------
# FLOPs (MACs, fvcore's convention) from per-image token counts
# ---------------------------------------------------------------------------

def _model_dims(model: nn.Module) -> dict:
    block = next(b for b in model.blocks if getattr(b, "mlp", None) is not None)
    channels = int(model.embed_dim)
    hidden = int(block.mlp.fc1.out_features)
    proj = model.patch_embed.proj
    patch_macs = int(model.patch_embed.num_patches) * proj.in_channels * math.prod(proj.kernel_size) * channels
    head = getattr(model, "head", None)
    head_macs = head.in_features * head.out_features if isinstance(head, nn.Linear) else 0
    head_dist = getattr(model, "head_dist", None)
    if isinstance(head_dist, nn.Linear):
        head_macs += head_dist.in_features * head_dist.out_features
    return dict(C=channels, hidden=hidden, patch=patch_macs, head=head_macs)


CONVENTIONS = ("paper", "executed", "official")


def ats_macs_tensor(model: nn.Module, tokens: torch.Tensor, include_norms: bool = False,
                    convention: str = "paper") -> torch.Tensor:
    """MACs per image `[B]` (float64) from token counts `[B, depth]` (spec section 8): `tokens[:, i]` real
    tokens (class token included) leaving block i; the first block receives the initial count.

        ordinary block: (4 + 2r) n C^2 + 2 n^2 C        (n tokens in and out)
        ATS block:      3 n C^2 + n^2 C + n' n C + n' C^2 + 2r n' C^2
        plus patch embedding (patches x in_chans x P^2 x C) and the head (C x classes).

    `convention` is how an ATS block's attention is charged: "paper" (above: the full `q k^T`,
    `A v` on the kept rows), "executed" (what this implementation runs: the class row's `q k^T`
    for the scores, then fused attention of the n' kept rows over the n keys: n C + 2 n' n C),
    "official" (the released block: `q k^T` and `A v` on all rows, 2 n^2 C). `include_norms`
    adds fvcore's LayerNorm count (5 per element: norm1 on n, norm2 on n', the final norm on the
    last count): "executed" with norms equals fvcore's count of the patched model on the image at
    batch 1. Blocks without attention count their MLP only.
    """
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
    cfg: Optional[ATSConfig] = model._ats_cfg if is_patched(model) else None
    caps = cfg.caps if cfg is not None else {}
    dims = _model_dims(model)
    c, hidden = float(dims["C"]), float(dims["hidden"])
    tokens = tokens.to(torch.float64)
    if tokens.shape[-1] != len(model.blocks):
        raise ValueError(f"{tokens.shape[-1]} token counts for {len(model.blocks)} blocks")
    n = torch.full_like(tokens[:, 0], float(int(model.num_prefix_tokens) + int(model.patch_embed.num_patches)))
    total = torch.full_like(n, float(dims["patch"] + dims["head"]))
    for index, block in enumerate(model.blocks):
        out = tokens[:, index]
        has_attention = getattr(block, "has_attention", True) and getattr(block, "attn", None) is not None
        if index in caps:
            attention = {"paper": n * n * c + out * n * c, "executed": n * c + 2 * out * n * c,
                         "official": 2 * n * n * c}[convention]
            total = total + 3 * n * c * c + attention + out * c * c + 2 * out * hidden * c
            norms = 5 * (n + out) * c
        elif has_attention:
            total = total + 4 * n * c * c + 2 * n * hidden * c + 2 * n * n * c
            norms = 10 * n * c
        else:
            total = total + 2 * n * hidden * c
            norms = 5 * n * c
        if include_norms:
            total = total + norms
        n = out
    if include_norms:
        total = total + 5 * n * c
    return total


def ats_macs(model: nn.Module, tokens: Sequence[int], include_norms: bool = False, convention: str = "paper") -> int:
    """MACs of one image from its token counts `[depth]` (see `ats_macs_tensor`)."""
    counts = torch.as_tensor([int(t) for t in tokens], dtype=torch.float64)[None]
    return int(round(float(ats_macs_tensor(model, counts, include_norms, convention)[0])))


def ats_gmacs(model: nn.Module, tokens: Union[torch.Tensor, Sequence[Sequence[int]]],
              include_norms: bool = False, convention: str = "paper") -> torch.Tensor:
    """Per-image GMACs `[B]` from token counts `[B, depth]` (e.g. `model._ats_info["tokens"]`)."""
    counts = torch.as_tensor(tokens.tolist() if isinstance(tokens, torch.Tensor) else tokens, dtype=torch.float64)
    return ats_macs_tensor(model, counts, include_norms, convention) / 1e9


def padded_batch_gmacs(model: nn.Module, tokens: torch.Tensor) -> float:
    """GMACs per image the way the official code is profiled (spec section 8): every image charged
    the batch's largest count at each block (the drop layout pads to it and every later layer
    runs on the padded length), and the released ATS block's `A @ v` on all n rows instead of
    the kept ones. tokens `[B, depth]` from one batch."""
    longest = torch.as_tensor(tokens).to(torch.float64).max(dim=0, keepdim=True).values
    return float(ats_macs_tensor(model, longest, convention="official")[0]) / 1e9


# ---------------------------------------------------------------------------
# Checkpoints written by the official trainer
# ---------------------------------------------------------------------------

def checkpoint_filter_fn(state_dict: dict, model: Optional[nn.Module] = None) -> dict:
    """An official-trainer checkpoint as a timm DeiT state dict (spec section 9).

    Unwraps `model_state` / `model`, strips `module.`, drops the parameter-free blocks'
    `*.attn.out_zero_mask` (refusing a non-zero one: it would not be the released model), and
    lets timm's ViT filter adapt the rest (position-embedding resize). The result loads strictly.
    """
    for key in ("model_state", "model", "state_dict"):
        if isinstance(state_dict, dict) and key in state_dict and isinstance(state_dict[key], dict):
            state_dict = state_dict[key]
            break
    out = {}
    for key, value in state_dict.items():
        if key.startswith("module."):
            key = key[len("module."):]
        if key.endswith("out_zero_mask"):
            if torch.is_tensor(value) and bool((value != 0).any()):
                raise ModelConfigError(f"checkpoint entry {key} is not all zero; it is not a released ATS/DeiT "
                                       "model (ATS has no parameters), refusing to drop it")
            continue
        out[key] = value
    if model is not None:
        from timm.models.vision_transformer import checkpoint_filter_fn as vit_filter
        out = vit_filter(out, model)
    return out


# ---------------------------------------------------------------------------
# Token statistics over many forwards (evaluation): per-image GMACs, tokens per block
# ---------------------------------------------------------------------------

def start_statistics(model: nn.Module) -> None:
    """From now on every eval-mode forward of the patched `model` adds its images' token counts and
    per-image GMACs (the formula of `ats_macs`) to `model._ats_cfg.totals` (read by `statistics`)."""
    model._ats_cfg.totals = {}


def stop_statistics(model: nn.Module) -> None:
    model._ats_cfg.totals = None


def _accumulate(model: nn.Module, tokens: torch.Tensor) -> None:
    totals = model._ats_cfg.totals
    macs = ats_macs_tensor(model, tokens)
    executed = ats_macs_tensor(model, tokens, include_norms=True, convention="executed")
    padded = ats_macs_tensor(model, tokens.max(dim=0, keepdim=True).values, convention="official")
    batch = torch.tensor(tokens.shape[0], dtype=torch.float64)
    update = {"images": batch, "tokens": tokens.sum(dim=0, dtype=torch.float64), "macs": macs.sum(),
              "executed_macs": executed.sum(), "padded_macs": padded.sum() * batch}
    for key, value in update.items():
        totals[key] = value if key not in totals else totals[key] + value


def statistics(model: nn.Module) -> Dict[str, object]:
    """Mean per-image numbers of the forwards since `start_statistics` ({} when none): GMACs by the
    paper's convention (spec section 8), by fvcore's count of this implementation at batch 1
    (`convention="executed"` with norms), and as the official code's padded batches are profiled
    (each image charged its batch's largest counts, `A v` on all rows); tokens leaving each block."""
    totals = getattr(getattr(model, "_ats_cfg", None), "totals", None)
    if not totals:
        return {}
    images = float(totals["images"])
    return {
        "images": int(images),
        "gmacs_per_image": float(totals["macs"]) / images / 1e9,
        "gmacs_per_image_fvcore": float(totals["executed_macs"]) / images / 1e9,
        "gmacs_padded_batches": float(totals["padded_macs"]) / images / 1e9,
        "mean_tokens_per_block": [round(float(t) / images, 2) for t in totals["tokens"]],
    }


# ---------------------------------------------------------------------------
# Method family: flags, hooks, commands, --target-gmacs, the official launch line
# ---------------------------------------------------------------------------

from . import ats_config  # noqa: E402  (the declaration below is the module's public contract)
from . import family as _family  # noqa: E402
from .hooks import MethodHooks  # noqa: E402

_logger = logging.getLogger(__name__)


def _int_list(text, what: str) -> List[int]:
    """One command-line token as ints: "3", "[3,4,5]", "(3, 4)", "3,4,5", "3 4 5", "[]"."""
    if isinstance(text, (list, tuple)):
        value = text
    else:
        stripped = str(text).strip()
        if re.fullmatch(r"[-+]?\d+([\s,]+[-+]?\d+)*,?", stripped):
            stripped = "[" + ",".join(stripped.replace(",", " ").split()) + "]"
        try:
            value = ast.literal_eval(stripped)
        except (ValueError, SyntaxError):
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
    if _is_int(value):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(_is_int(v) for v in value):
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
    return [int(v) for v in value]


def ats_blocks_arg(text):
    """argparse type of one `--ats-blocks` token: an index, or a list such as [3,4,5] ("[]": none)."""
    values = _int_list(text, "a block index or a list of them such as [3,4,5]")
    if isinstance(text, str) and re.fullmatch(r"\s*[-+]?\d+\s*", text):
        return values[0]
    return values


def num_tokens_arg(text):
    """argparse type of `--ats-num-tokens`: K, a list of depth values such as [197,...], or 'auto'."""
    if isinstance(text, str) and text.strip().lower() == _family.AUTO:
        return _family.AUTO
    values = _int_list(text, "a token count K, a list of one K per block, or 'auto'")
    return values[0] if len(values) == 1 else values


def _flat_blocks(value) -> Optional[List[int]]:
    if value is None:
        return None
    flat: List[int] = []
    for item in (value if isinstance(value, (list, tuple)) else [value]):
        flat.extend(item if isinstance(item, (list, tuple)) else [item])
    return flat


def _family_active(options) -> bool:
    return options.ats_blocks is not None or options.ats_num_tokens is not None or options.ats_drop_tokens is False


def _family_check(options) -> None:
    blocks = _flat_blocks(options.ats_blocks)
    if blocks is not None and any(i < 0 for i in blocks):
        raise ModelConfigError(f"--ats-blocks {blocks}: block indices are >= 0")
    if blocks is not None and len(set(blocks)) != len(blocks):
        raise ModelConfigError(f"--ats-blocks {blocks} lists a block twice; give each index once")
    tokens = options.ats_num_tokens
    if tokens is not None and tokens != _family.AUTO:
        bad = [k for k in (tokens if isinstance(tokens, list) else [tokens]) if k < MIN_TOKENS]
        if bad:
            raise ModelConfigError(f"--ats-num-tokens {tokens}: every K must be >= {MIN_TOKENS} "
                                   "(class token included)")
    if options.ats_visualize_images is not None and options.ats_visualize_images < 1:
        raise ModelConfigError(f"--ats-visualize-images must be >= 1, got {options.ats_visualize_images}")


def _family_patch(model: nn.Module, options) -> None:
    if options.ats_num_tokens == _family.AUTO:
        raise ModelConfigError("--ats-num-tokens auto needs --target-gmacs G")
    patch(model, ats_blocks=_flat_blocks(options.ats_blocks), num_tokens=options.ats_num_tokens,
          drop_tokens=options.ats_drop_tokens is not False)


class ATSHooks(MethodHooks):
    """Token counts and per-image GMACs in progress lines and log.txt (the last forward's images;
    after an evaluation, its mean), the evaluation's numbers as the end-of-training report."""

    evaluating_only = False

    def prepare_eval(self, model: nn.Module) -> None:
        self.evaluating_only = True  # --eval: only the evaluation's own numbers mean anything
        if is_patched(model):
            start_statistics(model)

    def on_epoch_start(self, model: nn.Module, epoch: int) -> None:
        if is_patched(model):
            start_statistics(model)  # the numbers of this epoch's evaluation

    def log_state(self, model: nn.Module) -> Dict[str, float]:
        if not is_patched(model):
            return {}
        stats = statistics(model)
        if stats:
            return {"ats_tokens": stats["mean_tokens_per_block"][-1], "ats_gmacs": round(stats["gmacs_per_image"], 5)}
        tokens = model._ats_info.get("tokens")
        if self.evaluating_only:
            return {}
        if tokens is None or tokens.shape[1] != len(model.blocks):
            return {}
        return {"ats_tokens": round(float(tokens[:, -1].float().mean()), 2),
                "ats_gmacs": round(float(ats_gmacs(model, tokens).mean()), 5)}

    def report(self, model: nn.Module, context) -> Dict[str, object]:
        return statistics(model) if is_patched(model) else {}


def _family_hooks(model: nn.Module, options) -> Optional[ATSHooks]:
    return ATSHooks(model, options) if is_patched(model) else None


def report_command(model: nn.Module, context) -> None:
    """`--ats-report`: mean per-image GMACs and tokens per block over the evaluated images (the
    `--eval` pass just made; without `--eval`, one pass over the validation loader), logged and
    written to `ats_report.json` in the output directory."""
    if not is_patched(model):
        return
    stats = statistics(model)
    if not stats:
        start_statistics(model)
        was_training = model.training
        model.eval()
        with torch.no_grad():
            for batch in context.data_loader:
                model(batch[0].to(context.device))
        model.train(was_training)
        stats = statistics(model)
    if not stats:
        return
    _logger.info(f"ATS over {stats['images']} images: {stats['gmacs_per_image']:.4f} GMACs per image (mean of "
                 f"per-image counts, the paper's convention; fvcore at batch 1: "
                 f"{stats['gmacs_per_image_fvcore']:.4f}); "
                 f"{stats['gmacs_padded_batches']:.4f} GMACs as the official code's padded batches would be profiled; "
                 f"mean tokens leaving each block {stats['mean_tokens_per_block']}")
    output_dir = getattr(context, "output_dir", None)
    if output_dir:
        with open(os.path.join(output_dir, "ats_report.json"), "w") as f:
            json.dump(stats, f, indent=1)


def search_num_tokens(build, target: float, gmacs_of):
    """`--ats-num-tokens auto --target-gmacs G`: one token budget K for every ATS block (8 .. N0).

    ATS's GMACs depend on the input: every candidate is built and counted from the RNG state the
    search starts from (rewound after each), so all of them see the same weights and input image
    as the caller's own next build and count of the chosen K.
    """
    start = rng_state()

    def build_at(k):
        set_rng_state(start)
        return build(k)

    def count(model) -> float:
        try:
            return gmacs_of(model)
        finally:
            set_rng_state(start)

    probe = build_at(MIN_TOKENS)
    if not is_patched(probe):
        raise ModelConfigError("--ats-num-tokens auto: the model was built without ATS")
    candidates = list(range(MIN_TOKENS, probe._ats_cfg.initial_tokens + 1))
    try:
        return _family.search_sequence(candidates, build_at, target, count)
    finally:
        set_rng_state(start)


def _translate_argv(argv: List[str]) -> List[str]:
    return ats_config.translate_argv(argv)


_TINY = dict(depth=4, embed_dim=32, num_heads=2, patch_size=8)

FAMILY = _family.register_family(_family.MethodFamily(
    name="ats",
    title="ATS: adaptive token sampling, a per-image number of tokens (a patch applied to DeiT / ViT)",
    flags=(
        _family.Flag("--ats-blocks", type=ats_blocks_arg, nargs="+", metavar="I",
                     help="patch the model with ATS at these blocks (indices, or a list such as [3,4,5]; "
                          "official 3..11 when only another ATS flag is given)"),
        _family.Flag("--ats-num-tokens", type=num_tokens_arg, metavar="K",
                     help="token budget K of the ATS blocks (class token included, >= 8): one value, or one per "
                          "block as the official NUM_TOKENS; 'auto' with --target-gmacs; default: the initial count"),
        _family.Flag("--ats-drop-tokens", dest="ats_drop_tokens", action="store_true", default=None,
                     help="remove the tokens ATS does not keep (per-image results at any batch size; default)"),
        _family.Flag("--no-ats-drop-tokens", dest="ats_drop_tokens", action="store_false", default=None,
                     help="the official masked layout: non-kept tokens stay as zero rows"),
        _family.Flag("--ats-report", action="store_true", default=False,
                     help="after --eval (or over the validation set): mean per-image GMACs and tokens per block, "
                          "logged and written to ats_report.json"),
        _family.Flag("--ats-visualize", action="store_true", default=False,
                     help="save images of the tokens each ATS block keeps for --ats-visualize-images validation "
                          "images to --output_dir, then exit"),
        _family.Flag("--ats-visualize-images", type=int, default=8, metavar="N",
                     help="images for --ats-visualize"),
    ),
    patch=_family_patch,
    active=_family_active,
    check_options=_family_check,
    hooks=_family_hooks,
    reduction=_family.Reduction("ats_num_tokens", search_num_tokens),
    translate_argv=_translate_argv,
    checkpoint_filter_fn=checkpoint_filter_fn,
    commands=(
        _family.Command("ats_report", "models.ats:report_command", exits=True, needs_data=True),
        _family.Command("ats_visualize", "tools.ats_visualize:visualize_command", exits=True, needs_data=True),
    ),
    examples=(
        _family.Example("ats", model="deit_tiny_patch16_224", kwargs=dict(_TINY),
                        flags=("--ats-blocks", "1", "2", "3")),
        # the official masked layout with a budget below the token count (fixed shapes)
        _family.Example("ats_masked", model="deit_tiny_patch16_224", kwargs=dict(_TINY),
                        flags=("--ats-blocks", "[1,3]", "--ats-num-tokens", "12", "--no-ats-drop-tokens")),
    ),
))
