"""ToMe: "Token Merging: Your ViT but Faster" (Bolya et al., ICLR 2023, arXiv 2210.09461).

An in-place patch for timm `VisionTransformer`s (DeiT, distilled DeiT, ViTs with or
without a class token, LayerScale) and for the attention-shrink models of
`models/shrink.py`. The patch swaps the classes of the model and of its blocks that
have attention; parameters and state dict are untouched and `unpatch` restores the
original classes.

Modifications of a patched block (relative to timm's `Block`):

* attention runs through fused SDPA with the additive bias `ln(size)` per key
  (proportional attention) once a merge has happened in this forward, and also
  returns the head-mean keys as the merge metric;
* between the attention residual and the MLP, `r` tokens are merged by bipartite
  soft matching (`models.token_ops`), size-weighted, with the class (and
  distillation) tokens protected;
* LayerScale (`ls1`, `ls2`) is applied (the official patch ignores it).

Blocks without attention (deployed `ShrinkBlock`: `has_attention = False`, and lambda
blocks whose `attention_weight()` is 0 at call time) run unchanged and never take an
`r` from the schedule. `start_idx` counts only blocks that have attention at call
time: the attention block with ordinal k (0-based) merges iff `k >= start_idx`. The
schedule (`parse_r(len(model.blocks), model.r)`) is consumed front to back by the
merging blocks. A lambda block with 0 < lambda merges after its diluted residual
`(2 - lam) x + lam attn`, with proportional attention inside `attn`.

Per-forward state (schedule, sizes, sources) lives in a `ToMeState` made by the
patched model's forward and dropped when it returns. With `trace_source=True` the
final source map `[B, T_final, T0]` and sizes `[B, T_final, 1]` are stored after
each forward in `model._tome_info["source"]` / `["size"]` (and, in `["r_applied"]`,
the number of tokens each block actually merged, after clamping; zeros left out).

EViT models are not supported (their blocks change token counts themselves).
Gradient checkpointing of the blocks is not supported while patched, and blocks
called with an attention mask run unpatched. One deliberate deviation: when the clamp
turns a block's r into 0 before any merge, sizes stay None instead of becoming ones
(the official `ln(1) = 0` bias is a numerical no-op).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from numbers import Integral
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .token_ops import RSchedule, bipartite_soft_matching, merge_source, merge_wavg, parse_r

__all__ = ["patch", "unpatch", "is_patched", "merging_block_indices", "ToMeState"]


@dataclass
class ToMeConfig:
    """Settings shared by a patched model and its blocks; `state` is set only during a forward."""
    r: RSchedule
    prop_attn: bool
    start_idx: int
    trace_source: bool
    class_token: bool
    distill_token: bool
    state: Optional["ToMeState"] = None


@dataclass
class ToMeState:
    """One forward's state: remaining schedule, token sizes and sources."""
    r_list: List[int]
    size: Optional[torch.Tensor] = None
    source: Optional[torch.Tensor] = None
    attention_blocks_seen: int = 0
    merges: List[int] = field(default_factory=list)


def _has_attention_now(block: nn.Module) -> bool:
    """Whether a block uses attention at call time (shrink/lambda contract, no import of models.shrink)."""
    if not getattr(block, "has_attention", True) or getattr(block, "attn", None) is None:
        return False
    weight = getattr(block, "attention_weight", None)
    return weight is None or float(weight()) != 0.0


def _attention_with_metric(attn: nn.Module, x: torch.Tensor, size: Optional[torch.Tensor]):
    """timm `Attention` with proportional attention; x `[B, N, C]`, size `[B, N, 1]` or None.

    Returns (output `[B, N, C]`, metric `[B, N, head_dim]` = keys averaged over heads).
    """
    batch, n, _ = x.shape
    qkv = attn.qkv(x).reshape(batch, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    bias = None if size is None else size.log()[:, None, None, :, 0].to(q.dtype)  # [B, 1, 1, N]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias,
                                         dropout_p=attn.attn_drop.p if attn.training else 0.0)
    out = attn.norm(out.transpose(1, 2).reshape(batch, n, attn.attn_dim))
    if getattr(attn, "gate", None) is not None:
        out = out * attn.gate(x).sigmoid()
    return attn.proj_drop(attn.proj(out)), k.mean(dim=1)


class ToMeBlockMixin:
    """Placed before the block's own class; see the module docstring for what changes."""

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False) -> torch.Tensor:
        cfg: ToMeConfig = self._tome_cfg
        state = cfg.state
        if attn_mask is not None or is_causal:  # masks do not survive merging: run the block unchanged
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        if state is None or not _has_attention_now(self):
            return super().forward(x)
        ordinal = state.attention_blocks_seen
        state.attention_blocks_seen += 1
        if ordinal < cfg.start_idx:
            return super().forward(x)

        attn_out, metric = _attention_with_metric(self.attn, self.norm1(x), state.size if cfg.prop_attn else None)
        attn_out = self.drop_path1(self.ls1(attn_out))
        weight = getattr(self, "attention_weight", None)
        if weight is None:
            x = x + attn_out
        else:
            lam = float(weight())
            x = (2 - lam) * x + lam * attn_out

        r = state.r_list.pop(0)
        if r > 0:
            match = bipartite_soft_matching(metric, r, cfg.class_token, cfg.distill_token)
            if match is not None:
                if cfg.trace_source:
                    state.source = merge_source(match, x, state.source)
                x, state.size = merge_wavg(match, x, state.size)
                state.merges.append(match.r)
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


class ToMeModelMixin:
    """Creates the per-forward `ToMeState`; `model.r` is validated when set."""

    @property
    def r(self) -> RSchedule:
        return self._tome_cfg.r

    @r.setter
    def r(self, value: RSchedule) -> None:
        parse_r(len(self.blocks), value)  # raises ValueError on bad input
        self._tome_cfg.r = value

    def _tome_run(self, fn, *args, **kwargs):
        cfg: ToMeConfig = self._tome_cfg
        if cfg.state is not None:  # nested call (forward -> forward_features)
            return fn(*args, **kwargs)
        if self.training and getattr(self, "grad_checkpointing", False):
            raise ValueError("ToMe cannot train with gradient checkpointing (blocks re-run after the forward); disable it.")
        state = ToMeState(r_list=parse_r(len(self.blocks), cfg.r))
        cfg.state = state
        try:
            return fn(*args, **kwargs)
        finally:
            cfg.state = None
            if cfg.trace_source:
                self._tome_info = {"source": state.source, "size": state.size, "r_applied": state.merges}

    def forward(self, *args, **kwargs):
        return self._tome_run(super().forward, *args, **kwargs)

    def forward_features(self, *args, **kwargs):
        return self._tome_run(super().forward_features, *args, **kwargs)


@functools.lru_cache(maxsize=None)
def _patched_class(mixin: type, base: type) -> type:
    return type(f"ToMe{base.__name__}", (mixin, base), {"_tome_base_class": base})


def is_patched(model: nn.Module) -> bool:
    return isinstance(model, ToMeModelMixin)


def patch(model: nn.Module, r: RSchedule = 0, prop_attn: bool = True, start_idx: int = 0,
          trace_source: bool = False) -> nn.Module:
    """Apply ToMe to `model` in place (re-patching replaces the settings); returns the model."""
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise ValueError(f"ToMe patches ViTs with a `blocks` list; {type(model).__name__} has none.")
    if any(hasattr(b, "forward_prune") for b in blocks):
        raise ValueError("ToMe does not support EViT models (their blocks already change the token count).")
    if getattr(model, "reg_token", None) is not None:
        raise ValueError("ToMe does not support register tokens; use a ViT without reg_tokens.")
    if isinstance(start_idx, bool) or not isinstance(start_idx, Integral) or start_idx < 0:
        raise ValueError(f"ToMe start_idx must be an int >= 0 (attention blocks left unpatched), got {start_idx!r}.")
    parse_r(len(blocks), r)
    if is_patched(model):
        unpatch(model)

    cfg = ToMeConfig(
        r=r, prop_attn=prop_attn, start_idx=int(start_idx), trace_source=trace_source,
        class_token=getattr(model, "cls_token", None) is not None,
        distill_token=getattr(model, "dist_token", None) is not None,
    )
    for block in blocks:
        if getattr(block, "has_attention", True) and getattr(block, "attn", None) is not None:
            _check_attention(block.attn)
            block.__class__ = _patched_class(ToMeBlockMixin, type(block))
            block._tome_cfg = cfg
    model.__class__ = _patched_class(ToMeModelMixin, type(model))
    model._tome_cfg = cfg
    model._tome_info = {"source": None, "size": None}
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Undo `patch`: original classes back, ToMe attributes removed. No-op if not patched."""
    for module in [model, *getattr(model, "blocks", [])]:
        base = getattr(type(module), "_tome_base_class", None)
        if base is not None and type(module) is _patched_class(
                ToMeModelMixin if module is model else ToMeBlockMixin, base):
            module.__class__ = base
            for name in ("_tome_cfg", "_tome_info"):
                module.__dict__.pop(name, None)
    return model


def merging_block_indices(model: nn.Module) -> List[int]:
    """Indices of the blocks that merge in the next forward of a patched model (current lambdas)."""
    cfg: ToMeConfig = model._tome_cfg
    attention_blocks = [i for i, block in enumerate(model.blocks) if _has_attention_now(block)]
    return attention_blocks[cfg.start_idx:]


def _check_attention(attn: nn.Module) -> None:
    needed = ("qkv", "num_heads", "head_dim", "attn_dim", "proj", "q_norm", "k_norm")
    missing = [name for name in needed if not hasattr(attn, name)]
    if missing:
        raise ValueError(f"ToMe needs timm's Attention layout; {type(attn).__name__} lacks {', '.join(missing)}.")
