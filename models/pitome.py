"""PiToMe: "Accelerating Transformers with Spectrum-Preserving Token Merging"
(Tran et al., NeurIPS 2024, arXiv 2405.16148); docs/methods/pitome.md.

An in-place patch for timm `VisionTransformer`s (DeiT, distilled DeiT, ViT with a class
token, LayerScale) and the attention-shrink models of `models/shrink.py`. It swaps the
classes of the model and of its blocks that have attention; parameters, buffers and the
state dict are untouched, and `unpatch` restores the original classes.

Modifications of a patched block (relative to timm's `Block`), in a block whose keep
ratio removes `r = floor(T - T * ratio) > 0` of its T patch tokens:

* attention (fused SDPA) also returns the head-mean keys as the merge metric; with
  `prop_attn=True` every key's logit gets `+ ln(size)` (off by default, as in the
  official code, where the sizes never reach attention);
* between the attention residual and the MLP, the patch tokens are ranked by their
  energy `mean_l ELU(cos(k_j, k_l) - margin_i)` (margin `m0 - m0 * i / L` over depth) and
  merged by one of two rules (`pitome_match`): energy-ordered bipartite soft matching
  in the `bsm_layers` (default: the first `ceil(L / 2)` blocks), and in the other blocks
  the protect rule: the `2 r` highest-energy tokens pair up (every even rank merges into
  its most similar odd rank), the other `T - 2 r` tokens are protected;
* the merge is ToMe's size-weighted average; sizes (and, with `trace_source`, the
  source map) are carried in the per-forward state;
* every prefix token (class, distillation) stays in place with size 1 and never enters
  the ranking (the official code ranks and merges the distillation token);
* LayerScale (`ls1`, `ls2`) is applied (the official patch targets timm 0.4.12 blocks,
  which have none).

A block with `r = 0` runs timm's own forward (officially a crash in the protect rule and
a token permutation in the BSM rule). Blocks without attention at call time (deployed
`ShrinkBlock`: `has_attention = False`; lambda blocks whose `attention_weight()` is 0)
run unchanged and never merge; the schedules (ratio, margin, rule) are indexed by the
block's position in `model.blocks`, L = `len(model.blocks)`. A lambda block with
0 < lambda merges after its diluted residual `(2 - lam) x + lam attn`.

The ranking and matching run under no_grad in float32 (float64 for a float64 model),
whatever the model's dtype, with a stable descending sort and first-index argmax:
the energies of early blocks sit a few ulp apart, so any other op order or precision
picks other merges than the official code. Models whose head averages the tokens
(`global_pool='avg'`) average them weighted by size (the official MAE patch's rule).

Per-forward state (sizes, sources, token counts) lives in a `PiToMeState` made by the
patched model's forward in a `token_ops.StateSlot` shared with the blocks. With
`trace_source=True`, `model._pitome_info` holds `source` `[B, N_final, N0]` and `size`
`[B, N_final, 1]` after each forward (prefix tokens included).

Refused (`ModelConfigError`): models without a class token, register tokens, EViT, LTM
and LTMP models, hybrids and other non-ViT backbones, attention pooling heads.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from numbers import Integral, Real
from typing import List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn
from timm.models.vision_transformer import VisionTransformer

from . import tome
from .errors import ModelConfigError
from .token_ops import (
    StateSlot, attention_residual, attention_with_keys, has_attention_now, patched_class, restore_classes,
    selection_precision)

__all__ = [
    "patch", "unpatch", "is_patched", "PiToMeConfig", "PiToMeState", "PiToMeMatch",
    "merge_count", "margin_schedule", "default_bsm_layers", "energy_scores", "pitome_match", "merge_sum",
    "merge_wavg", "merge_source", "token_counts", "official_flops", "merging_blocks", "expected_tokens",
    "official_gflops",
]

Ratio = Union[float, Sequence[float]]
Margin = Union[float, Sequence[float]]

DEFAULT_MARGIN = 0.75  # m0 of the official DeiT / MAE patches


# ---------------------------------------------------------------------------
# Pure kernels: schedules, energy, matching, merging
# ---------------------------------------------------------------------------

def merge_count(tokens: int, ratio: float) -> int:
    """Tokens a block removes from its `tokens` patch tokens: `floor(T - T * ratio)`.

    On Python doubles on purpose, as the official code: T = 200, ratio = 0.545 gives 90
    (exact decimals would give 91). 0 for ratio >= 1.
    """
    if ratio >= 1.0:
        return 0
    return math.floor(tokens - tokens * ratio)


def margin_schedule(margin: Margin, num_layers: int) -> List[float]:
    """Per-block margins: `m0 - m0 * (i / L)` for a number m0 (the official form), or the list as given."""
    if isinstance(margin, Real) and not isinstance(margin, bool):
        m0 = float(margin)
        return [m0 - m0 * (i / num_layers) for i in range(num_layers)]
    return [float(m) for m in margin]


def default_bsm_layers(num_layers: int) -> List[int]:
    """The official DeiT rule: energy-ordered BSM in blocks `i < ceil(L / 2)`, protect after."""
    return list(range(math.ceil(num_layers / 2)))


def energy_scores(metric: torch.Tensor, margin: float, alpha: float = 1.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """PiToMe's energy of each token and the cosine similarities it comes from.

    metric: `[B, T, c]` (head-mean keys of the patch tokens). Returns (energy `[B, T]`,
    sim `[B, T, T]`) with `sim = n n^T` for the L2-normalised rows `n` (diagonal
    included) and `energy_j = mean_l ELU(sim_jl - margin)` (ELU with `alpha`, mean over
    all T columns, sizes not used). The op sequence is the official one, so the float
    rounding (and hence the ranking of near-equal energies) is too.
    """
    normed = F.normalize(metric, p=2, dim=-1)
    sim = normed @ normed.transpose(-1, -2)
    return F.elu(sim - margin, alpha=alpha).mean(dim=-1), sim


class PiToMeMatch(NamedTuple):
    """One block's merge plan over T patch tokens (indices into the patch tokens, prefix excluded).

    keep `[B, K]`: tokens passed through (protected / unmatched A tokens), in output order;
    src `[B, r]`: tokens merged away, in reduction order; dst `[B, D]`: destination
    candidates (set B), in output order; dst_pos `[B, r]`: position in `dst` of each
    source's destination. Output: `[prefix, keep, dst + their sources]`, `K + D = T - r`.
    """
    keep: torch.Tensor
    src: torch.Tensor
    dst: torch.Tensor
    dst_pos: torch.Tensor

    @property
    def r(self) -> int:
        return self.src.shape[1]


def _descending(values: torch.Tensor) -> torch.Tensor:
    """Indices sorting the last dim in descending order; equal values keep their order."""
    return torch.sort(values, dim=-1, descending=True, stable=True).indices


def pitome_match(metric: torch.Tensor, r: int, margin: float, alpha: float = 1.0, bsm: bool = False) -> PiToMeMatch:
    """PiToMe's selection for `r` merges among T patch tokens; metric `[B, T, c]`, `0 < 2 r <= T`.

    Tokens are ranked by descending energy (`energy_scores`). `bsm=True` (energy-ordered
    bipartite soft matching): A = ranks 0, 2, 4, ..., B = ranks 1, 3, 5, ...; each A token's
    best B partner (first-index argmax of the cosine similarity) and the r A tokens with
    the highest best similarity merge; the other A tokens are kept in descending order of
    that similarity, all B tokens in rank order. `bsm=False` (protect): A = ranks 0, 2,
    ..., 2r - 2 all merge into their best partner among B = ranks 1, 3, ..., 2r - 1; ranks
    2r .. T - 1 are protected, in rank order. Computed under no_grad in float32 or better
    (autocast off).
    """
    with torch.no_grad(), selection_precision(metric):
        metric = metric.to(torch.promote_types(metric.dtype, torch.float32))
        energy, sim = energy_scores(metric, margin, alpha)
        order = _descending(energy)
        if bsm:
            set_a, set_b = order[:, 0::2], order[:, 1::2]
        else:
            set_a, set_b = order[:, 0:2 * r:2], order[:, 1:2 * r:2]
        batch, tokens = order.shape
        # W[p, q] = sim[A_p, B_q], one gather of the entries (not a second A @ B^T product)
        pairs = (set_a[:, :, None] * tokens + set_b[:, None, :]).flatten(1)
        scores = sim.flatten(1).gather(1, pairs).view(batch, set_a.shape[1], set_b.shape[1])
        best, partner = scores.max(dim=-1)  # first index among equal maxima
        if not bsm:
            return PiToMeMatch(order[:, 2 * r:], set_a, set_b, partner)
        edges = _descending(best)
        merged, kept = edges[:, :r], edges[:, r:]
        return PiToMeMatch(set_a.gather(1, kept), set_a.gather(1, merged), set_b, partner.gather(1, merged))


def merge_sum(x: torch.Tensor, match: PiToMeMatch, num_prefix: int = 1, mode: str = "sum") -> torch.Tensor:
    """Apply a match to `x` `[B, N, C]` (`num_prefix` prefix tokens first) -> `[B, N - r, C]`.

    Each destination becomes `reduce(dst, its sources)` (`scatter_reduce`, destination
    included, sources in `match.src` order); prefix tokens pass through first.
    """
    patches = x[:, num_prefix:]
    channels = x.shape[-1]

    def take(index: torch.Tensor) -> torch.Tensor:
        return patches.gather(1, index[..., None].expand(-1, -1, channels))

    dst = take(match.dst).scatter_reduce(1, match.dst_pos[..., None].expand(-1, -1, channels), take(match.src),
                                         reduce=mode)
    return torch.cat([x[:, :num_prefix], take(match.keep), dst], dim=1)


def merge_wavg(match: PiToMeMatch, x: torch.Tensor, size: Optional[torch.Tensor],
               num_prefix: int = 1) -> Tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted average merge: `(M(x * size) / M(size), M(size))` with `M = merge_sum`.

    x `[B, N, C]`; size `[B, N, 1]` (None = ones) kept in float32 or better, so sizes stay
    exact integers under bf16 and the average is accumulated in float32; float32 runs give
    the official bits (kept tokens come out as `(x * s) / s`). Returns x `[B, N - r, C]`
    in x's dtype and size `[B, N - r, 1]`.
    """
    acc = torch.promote_types(x.dtype, torch.float32)
    if size is None:
        size = torch.ones(*x.shape[:2], 1, dtype=acc, device=x.device)
    merged = merge_sum(x.to(acc) * size, match, num_prefix)
    size = merge_sum(size, match, num_prefix)
    return (merged / size).to(x.dtype), size


def merge_source(match: PiToMeMatch, x: torch.Tensor, source: Optional[torch.Tensor],
                 num_prefix: int = 1) -> torch.Tensor:
    """Follow the original tokens: source `[B, N, N0]` 0/1 (None = identity over x's N tokens) -> `[B, N - r, N0]`."""
    if source is None:
        batch, tokens, _ = x.shape
        source = torch.eye(tokens, device=x.device, dtype=x.dtype)[None].expand(batch, tokens, tokens)
    return merge_sum(source, match, num_prefix, mode="amax")


def token_counts(num_patches: int, num_prefix: int, ratios: Sequence[float],
                 merging: Optional[Sequence[bool]] = None) -> List[int]:
    """Tokens (prefix included) leaving each block: `N_{i+1} = N_i - floor(T_i - T_i * ratio_i)`.

    `merging[i]` False marks a block that does not merge (no attention at call time).
    """
    tokens, out = num_patches, []
    for i, ratio in enumerate(ratios):
        if merging is None or merging[i]:
            tokens -= merge_count(tokens, ratio)
        out.append(tokens + num_prefix)
    return out


def official_flops(num_patches: int, num_prefix: int, dim: int, ratios: Sequence[float],
                   attention: Optional[Sequence[bool]] = None) -> int:
    """The official analytic counter (`calculate_block_flop` summed over the blocks), per image.

    For a block whose INPUT has N tokens of width C: `4 N C^2 + 2 N^2 C` (qkv, proj, the two
    attention products) `+ 8 N C^2` (MLP charged at the input length although it runs on the
    merged tokens); patch embedding, head, norms and the energy / similarity cost are left
    out. Multiply-accumulates, which the official code prints as "GFLOPs" after / 1e9.
    A block with `attention[i]` False (attention-shrink models; not in the official code) is
    charged its MLP only.
    """
    total, tokens = 0, num_patches
    for i, ratio in enumerate(ratios):
        n = tokens + num_prefix
        has_attention = attention is None or attention[i]
        if has_attention:
            total += 4 * n * dim * dim + 2 * n * n * dim
            tokens -= merge_count(tokens, ratio)
        total += 8 * n * dim * dim
    return total


# ---------------------------------------------------------------------------
# Patched classes and per-forward state
# ---------------------------------------------------------------------------

@dataclass
class PiToMeConfig:
    """Settings shared by a patched model and its blocks; `slot.state` is set only during a forward."""
    ratio: Ratio
    ratios: List[float]
    margins: List[float]
    bsm_layers: frozenset
    alpha: float
    prop_attn: bool
    trace_source: bool
    num_prefix: int
    num_layers: int
    slot: StateSlot = field(default_factory=StateSlot)


@dataclass
class PiToMeState:
    """One forward's state: token sizes `[B, N, 1]` and sources `[B, N, N0]` (None until the
    first merge), and the tokens (prefix included) leaving each block of `model.blocks`."""
    size: Optional[torch.Tensor] = None
    source: Optional[torch.Tensor] = None
    tokens: List[int] = field(default_factory=list)


class PiToMeBlockMixin:
    """Placed before the block's own class; see the module docstring for what changes."""

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False) -> torch.Tensor:
        cfg: PiToMeConfig = self._pitome_cfg
        state: Optional[PiToMeState] = cfg.slot.state
        if attn_mask is not None or is_causal or state is None:  # masks do not survive merging
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        if not has_attention_now(self):
            x = super().forward(x)
            state.tokens.append(x.shape[1])
            return x
        index = self._pitome_index
        r = merge_count(x.shape[1] - cfg.num_prefix, cfg.ratios[index])
        size = state.size if cfg.prop_attn else None
        if r == 0 and size is None:
            x = super().forward(x)
            state.tokens.append(x.shape[1])
            return x

        out = attention_with_keys(self.attn, self.norm1(x), size)
        x = attention_residual(self, x, self.drop_path1(self.ls1(out.out)))
        if r > 0:
            metric = out.k.mean(dim=1, dtype=torch.promote_types(out.k.dtype, torch.float32))
            match = pitome_match(metric[:, cfg.num_prefix:], r, cfg.margins[index], cfg.alpha,
                                 bsm=index in cfg.bsm_layers)
            if cfg.trace_source:
                state.source = merge_source(match, x, state.source, cfg.num_prefix)
            x, state.size = merge_wavg(match, x, state.size, cfg.num_prefix)
        state.tokens.append(x.shape[1])
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


class PiToMeModelMixin:
    """Creates the per-forward `PiToMeState`; `model.ratio` is validated when set."""

    @property
    def ratio(self) -> Ratio:
        return self._pitome_cfg.ratio

    @ratio.setter
    def ratio(self, value: Ratio) -> None:
        cfg: PiToMeConfig = self._pitome_cfg
        cfg.ratios = _check_ratio(value, cfg.num_layers)
        cfg.ratio = value

    def _pitome_run(self, fn, *args, **kwargs):
        cfg: PiToMeConfig = self._pitome_cfg
        if cfg.slot.state is not None:  # nested call (forward -> forward_features)
            return fn(*args, **kwargs)
        if self.training and getattr(self, "grad_checkpointing", False):
            raise ModelConfigError("PiToMe cannot train with gradient checkpointing (blocks re-run after the "
                                   "forward); disable it.")
        state = PiToMeState()
        outer = cfg.slot.open(state)
        try:
            return fn(*args, **kwargs)
        finally:
            cfg.slot.close(outer)
            self._pitome_info = {"source": state.source, "size": state.size, "tokens": state.tokens}

    def forward(self, *args, **kwargs):
        return self._pitome_run(super().forward, *args, **kwargs)

    def forward_features(self, *args, **kwargs):
        return self._pitome_run(super().forward_features, *args, **kwargs)

    def forward_intermediates(self, *args, **kwargs):
        return self._pitome_run(super().forward_intermediates, *args, **kwargs)

    def pool(self, x: torch.Tensor, pool_type: Optional[str] = None) -> torch.Tensor:
        pool_type = self.global_pool if pool_type is None else pool_type
        state = self._pitome_cfg.slot.state
        if pool_type != "avg" or state is None or state.size is None:
            return super().pool(x, pool_type=pool_type)
        # merged tokens stand for `size` patches each: average the patches, not the tokens
        start = 0 if self.pool_include_prefix else self.num_prefix_tokens
        weight = state.size[:, start:].to(x.dtype)
        return (x[:, start:] * weight).sum(dim=1) / weight.sum(dim=1)


def _swap(module: nn.Module, mixin: type, cfg: PiToMeConfig) -> None:
    module.__class__ = patched_class(mixin, type(module), "PiToMe")
    module._pitome_cfg = cfg


# ---------------------------------------------------------------------------
# Patching
# ---------------------------------------------------------------------------

def is_patched(model: nn.Module) -> bool:
    return isinstance(model, PiToMeModelMixin)


def _check_ratio(ratio: Ratio, num_layers: int) -> List[float]:
    """Per-block keep ratios from a number or a list of `num_layers` numbers, each in [0.5, 1]."""
    if isinstance(ratio, Real) and not isinstance(ratio, bool):
        values = [float(ratio)] * num_layers
    elif isinstance(ratio, (list, tuple)) and all(isinstance(v, Real) and not isinstance(v, bool) for v in ratio):
        if len(ratio) != num_layers:
            raise ModelConfigError(f"PiToMe ratio list has {len(ratio)} entries but the model has {num_layers} "
                                   f"blocks; give one keep ratio per block or a single number.")
        values = [float(v) for v in ratio]
    else:
        raise ModelConfigError(f"PiToMe ratio must be a number in [0.5, 1] or a list of {num_layers} of them, "
                               f"got {ratio!r}.")
    for value in values:
        if not 0.5 <= value <= 1.0:  # also rejects NaN
            raise ModelConfigError(f"PiToMe keep ratio must lie in [0.5, 1] (a block cannot merge more than half "
                                   f"its tokens), got {value!r}; e.g. ratio=0.925.")
    return values


def _check_margin(margin: Margin, num_layers: int) -> List[float]:
    if isinstance(margin, Real) and not isinstance(margin, bool):
        if not math.isfinite(margin):
            raise ModelConfigError(f"PiToMe margin must be a finite number, got {margin!r}; e.g. margin=0.75.")
    elif isinstance(margin, (list, tuple)) and all(isinstance(v, Real) and not isinstance(v, bool) for v in margin):
        if len(margin) != num_layers or not all(math.isfinite(v) for v in margin):
            raise ModelConfigError(f"PiToMe margin list must hold {num_layers} finite numbers (one per block), "
                                   f"got {list(margin)!r}.")
    else:
        raise ModelConfigError(f"PiToMe margin must be a number (m0 of m0 - m0 * i / L) or a list of {num_layers} "
                               f"per-block margins, got {margin!r}.")
    return margin_schedule(margin, num_layers)


def _check_bsm_layers(bsm_layers, num_layers: int) -> frozenset:
    if bsm_layers is None:
        return frozenset(default_bsm_layers(num_layers))
    if isinstance(bsm_layers, (str, bytes)) or not hasattr(bsm_layers, "__iter__"):
        raise ModelConfigError(f"PiToMe bsm_layers must be a list of block indices, got {bsm_layers!r}; "
                               f"e.g. bsm_layers=range(6).")
    layers = list(bsm_layers)
    bad = [i for i in layers if isinstance(i, bool) or not isinstance(i, Integral) or not 0 <= i < num_layers]
    if bad:
        raise ModelConfigError(f"PiToMe bsm_layers entries must be block indices in [0, {num_layers}), got {bad[0]!r}.")
    return frozenset(int(i) for i in layers)


def _check_model(model: nn.Module) -> None:
    name = type(model).__name__
    if not isinstance(model, VisionTransformer):
        raise ModelConfigError(f"PiToMe patches timm VisionTransformers (DeiT, ViT, the shrink models); "
                               f"{name} is not one.")
    if any(hasattr(m, "mask_module") for m in model.modules()):
        raise ModelConfigError(f"PiToMe does not support {name}: an LTM model merges tokens itself.")
    for block in model.blocks:
        if hasattr(block, "forward_prune"):
            raise ModelConfigError(f"PiToMe does not support {name}: an EViT model already drops tokens.")
        if hasattr(block, "merge_masker"):
            raise ModelConfigError(f"PiToMe does not support {name}: an LTMP model merges tokens itself.")
    if getattr(model, "cls_token", None) is None:
        raise ModelConfigError(f"PiToMe needs a class token (it is never merged and feeds the head); "
                               f"{name} has none.")
    if getattr(model, "reg_token", None) is not None:
        raise ModelConfigError("PiToMe does not support register tokens; use a ViT without reg_tokens.")
    if getattr(model, "attn_pool", None) is not None or model.global_pool not in ("token", "avg", ""):
        raise ModelConfigError(f"PiToMe supports global_pool 'token' or 'avg' (size-weighted), "
                               f"not {model.global_pool!r}.")
    needed = ("qkv", "num_heads", "head_dim", "attn_dim", "proj", "q_norm", "k_norm")
    for block in model.blocks:
        attn = getattr(block, "attn", None)
        if attn is not None and getattr(block, "has_attention", True):
            missing = [n for n in needed if not hasattr(attn, n)]
            if missing:
                raise ModelConfigError(f"PiToMe needs timm's Attention layout; {type(attn).__name__} lacks "
                                       f"{', '.join(missing)}.")


def patch(model: nn.Module, ratio: Ratio = 1.0, margin: Margin = DEFAULT_MARGIN, bsm_layers=None,
          alpha: float = 1.0, prop_attn: bool = False, trace_source: bool = False) -> nn.Module:
    """Apply PiToMe to `model` in place (re-patching replaces the settings; a ToMe / ToFu patch
    is removed first); returns the model.

    ratio: keep ratio in [0.5, 1] for every block (1 = no merging), or one per block;
      `model.ratio` reads and sets it afterwards.
    margin: m0 of the schedule `m0 - m0 * i / L`, or one margin per block.
    bsm_layers: block indices using energy-ordered BSM (None = `range(ceil(L / 2))`, the
      official DeiT rule; `range(ceil(L / 2), L)` is the official MAE order); the other
      blocks use the protect rule.
    alpha: ELU alpha of the energy. prop_attn: add `ln(size)` to the attention logits.
    trace_source: keep the source map in `model._pitome_info["source"]` after each forward.
    """
    if isinstance(model, tome.ToMeModelMixin):  # ToMe and ToFu share one patch machinery
        tome.unpatch(model)
    if is_patched(model):
        unpatch(model)
    _check_model(model)
    if isinstance(alpha, bool) or not isinstance(alpha, Real) or not math.isfinite(alpha) or alpha <= 0:
        raise ModelConfigError(f"PiToMe alpha (the ELU alpha of the energy) must be a positive number, got {alpha!r}.")
    blocks = list(model.blocks)
    num_layers = len(blocks)
    cfg = PiToMeConfig(
        ratio=ratio, ratios=_check_ratio(ratio, num_layers), margins=_check_margin(margin, num_layers),
        bsm_layers=_check_bsm_layers(bsm_layers, num_layers), alpha=float(alpha), prop_attn=bool(prop_attn),
        trace_source=bool(trace_source), num_prefix=int(model.num_prefix_tokens), num_layers=num_layers,
    )
    for index, block in enumerate(blocks):  # attention-free blocks too: they count their tokens
        _swap(block, PiToMeBlockMixin, cfg)
        block._pitome_index = index
    _swap(model, PiToMeModelMixin, cfg)
    model._pitome_info = {"source": None, "size": None, "tokens": []}
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Undo `patch`: original classes back, patch attributes removed. No-op if not patched."""
    return restore_classes(model, "PiToMe", attributes=("_pitome_cfg", "_pitome_info", "_pitome_index"))


def merging_blocks(model: nn.Module) -> List[bool]:
    """Per block of `model.blocks`: whether it has attention now (and so may merge)."""
    return [has_attention_now(block) for block in model.blocks]


def expected_tokens(model: nn.Module, img_size: Optional[Tuple[int, int]] = None) -> List[int]:
    """Tokens (prefix included) leaving each block in the next forward of a patched model."""
    cfg: PiToMeConfig = model._pitome_cfg
    grid = model.patch_embed.dynamic_feat_size(img_size) if img_size is not None else model.patch_embed.grid_size
    return token_counts(int(grid[0] * grid[1]), cfg.num_prefix, cfg.ratios, merging_blocks(model))


def official_gflops(model: nn.Module, img_size: Optional[Tuple[int, int]] = None) -> float:
    """The official analytic "GFLOPs" (MACs / 1e9, `official_flops`) of a patched model at its ratio."""
    cfg: PiToMeConfig = model._pitome_cfg
    grid = model.patch_embed.dynamic_feat_size(img_size) if img_size is not None else model.patch_embed.grid_size
    return official_flops(int(grid[0] * grid[1]), cfg.num_prefix, model.embed_dim, cfg.ratios,
                          merging_blocks(model)) / 1e9


# ---------------------------------------------------------------------------
# Method family: PiToMe is a patch family, applied after any supported model is built
# ---------------------------------------------------------------------------

from . import family as _family  # noqa: E402  (the declaration below is the module's public contract)
from .hooks import MethodHooks  # noqa: E402

# main_ic.py's --ratio default when --algo pitome is given alone
OFFICIAL_DEFAULT_RATIO = "0.9125"

# main_ic.py's training defaults (docs/methods/pitome.md, "Training"): what an official launch line
# without --eval trains with, for every option the line does not give. Prepended to the argv, so
# the line's own flags (later on the command line) win.
OFFICIAL_RECIPE = (
    "--lr", "5e-5", "--unscale-lr",            # lr as given: main_ic.py rescales only after building the optimizer
    "--opt", "adamw", "--weight-decay", "0", "--decay-norm-and-bias",  # torch AdamW over all parameters, one group
    "--sched", "cosine", "--sched-step", "epoch", "--min-lr", "1e-8", "--warmup-epochs", "0",
    "--clip-grad", "1.0",                      # hard-coded gradient-norm clipping
    "--drop", "0.0", "--drop-path", "0.1", "--color-jitter", "0.4", "--aa", "rand-m9-mstd0.5-inc1",
    "--smoothing", "0.1", "--mixup", "0.8", "--cutmix", "1.0", "--reprob", "0.25", "--repeated-aug",
    "--batch-size", "100", "--epochs", "10", "--no-amp", "--no-model-ema", "--eval-every", "1",
)

_OFFICIAL_MODEL = re.compile(r"deit[-_]([tsb])[-_](?:patch16[-_])?(224|384)", re.IGNORECASE)
_DEIT_SIZES = {"t": "tiny", "s": "small", "b": "base"}
_OTHER_ALGOS = {
    "tome": "--tome-r R (ToMe's token count per block)",
    "tofu": "--tofu-r R (ToFu's token count per block)",
    "diffrate": "the diffrate_* models",
    "mctf": "the MCTF patch (--use_mctf)",
}


def _option_value(argv: List[str], index: int, name: str) -> Tuple[str, int]:
    """The value of the option at argv[index] (`--name V` or `--name=V`) and the index after it."""
    token = argv[index]
    if "=" in token:
        return token.split("=", 1)[1], index + 1
    if index + 1 >= len(argv):
        raise ModelConfigError(f"{name} needs a value")
    return argv[index + 1], index + 2


def official_model_name(value: str) -> Optional[str]:
    """timm's name for main_ic.py's `DEIT-{T,S,B}-{224,384}` (or the README's `DEIT_S_patch16_224`), else None."""
    import timm

    match = _OFFICIAL_MODEL.fullmatch(value)
    if match is None:
        if re.fullmatch(r"mae[-_][blh][-_].*", value, re.IGNORECASE):
            raise ModelConfigError(f"--model {value}: the official MAE models (vit_*_mae) are not provided here; "
                                   f"use a DeiT (DEIT-T-224, DEIT-S-224, DEIT-B-224, DEIT-B-384)")
        return None
    name = f"deit_{_DEIT_SIZES[match.group(1).lower()]}_patch16_{match.group(2)}"
    if not timm.is_model(name):
        raise ModelConfigError(f"--model {value}: timm has no {name}; use DEIT-T-224, DEIT-S-224, DEIT-B-224 "
                               f"or DEIT-B-384")
    return name


def translate_official_argv(argv: List[str]) -> List[str]:
    """main_ic.py's flags in this project's spelling (docs/methods/pitome.md, "Launch lines").

    `--algo pitome --ratio R` -> `--pitome-ratio R` (R defaults to 0.9125), `--algo none` -> no
    patch; `--algo` implies `--pretrained` unless `--resume` / `--finetune` give the weights and,
    without `--eval`, main_ic.py's training defaults (`OFFICIAL_RECIPE`) for every option the line
    leaves out; `--epoch` -> `--epochs`, `--autoresume` -> `--auto-resume`, main_ic.py's unused
    `--use_k` / `--reduced_token` / `--multi-reso` / `--port` are dropped. `--model DEIT-S-224`
    (or `DEIT_S_patch16_224`) -> `deit_small_patch16_224` always; `--defaults pitome` is the
    training preset alone. A line without these flags is returned unchanged.
    """
    argv = list(argv)
    out: List[str] = []
    algo = ratio = None
    preset = evaluate = weights = False
    i = 0
    while i < len(argv):
        token = argv[i]
        name = token.split("=", 1)[0]
        if name == "--algo":
            algo, i = _option_value(argv, i, name)
        elif name == "--ratio":
            ratio, i = _option_value(argv, i, name)
        elif name == "--defaults" and argv[i + 1:i + 2] == ["pitome"] or token == "--defaults=pitome":
            preset, i = True, i + (1 if "=" in token else 2)
        elif name == "--model":
            value, nxt = _option_value(argv, i, name)
            official = official_model_name(value)
            out += [name, official or value] if official else argv[i:nxt]
            i = nxt
        else:
            evaluate = evaluate or token == "--eval"
            weights = weights or name in ("--resume", "--checkpoint", "--finetune")
            out.append(token)
            i += 1
    if algo is None and ratio is not None:
        raise ModelConfigError("--ratio is main_ic.py's keep ratio of --algo pitome; give --algo pitome too "
                               "(or use --pitome-ratio R)")
    if algo is None:
        return (list(OFFICIAL_RECIPE) + out) if preset else out
    algo = algo.lower()
    if algo in _OTHER_ALGOS:
        raise ModelConfigError(f"--algo {algo}: main_ic.py's ratio-based {algo} is not provided; use this project's "
                               f"{_OTHER_ALGOS[algo]}")
    if algo not in ("pitome", "none"):
        raise ModelConfigError(f"--algo {algo} is not provided; use --algo pitome (or none)")
    if algo == "none" and ratio is not None:
        raise ModelConfigError("--ratio applies to --algo pitome only; drop it with --algo none")
    rest: List[str] = []
    i = 0
    while i < len(out):  # main_ic.py's spellings and its options PiToMe does not use
        token = out[i]
        name = token.split("=", 1)[0]
        if name == "--epoch":
            rest.append("--epochs" + token[len(name):])
        elif name == "--autoresume":
            rest.append("--auto-resume")
        elif name in ("--use_k", "--use-k", "--reduced_token", "--reduced-token", "--port"):
            i = _option_value(out, i, name)[1]
            continue
        elif name in ("--multi-reso", "--multi_reso"):
            pass
        else:
            rest.append(token)
        i += 1
    translated = list(OFFICIAL_RECIPE) if (preset or not evaluate) else []
    translated += rest
    if algo == "pitome":
        translated += ["--pitome-ratio", ratio if ratio is not None else OFFICIAL_DEFAULT_RATIO]
    if not weights and "--pretrained" not in rest:
        translated.append("--pretrained")  # main_ic.py always builds the model with pretrained=True
    return translated


def _family_active(options) -> bool:
    # any PiToMe flag switches the family on, so that `_family_check` sees (and refuses) the
    # other flags given without --pitome-ratio instead of them being silently ignored
    return (options.pitome_ratio is not None or options.pitome_margin not in (None, DEFAULT_MARGIN)
            or options.pitome_bsm_layers is not None or bool(options.pitome_prop_attn))


def _family_check(options) -> None:
    ratio = options.pitome_ratio
    if ratio is None:
        given = [flag for flag, unset in (("--pitome-margin", options.pitome_margin == DEFAULT_MARGIN),
                                          ("--pitome-bsm-layers", options.pitome_bsm_layers is None),
                                          ("--pitome-prop-attn", not options.pitome_prop_attn)) if not unset]
        if given:
            raise ModelConfigError(f"{' / '.join(given)} {'needs' if len(given) == 1 else 'need'} --pitome-ratio R "
                                   f"(the keep ratio per block)")
        return
    if ratio != _family.AUTO:
        _check_ratio(ratio, 1)
    _check_margin(options.pitome_margin, 1)
    bad = [i for i in options.pitome_bsm_layers or () if i < 0]
    if bad:
        raise ModelConfigError(f"--pitome-bsm-layers takes block indices >= 0, got {bad[0]}")


def _family_patch(model: nn.Module, options) -> None:
    patch(model, ratio=options.pitome_ratio, margin=options.pitome_margin, bsm_layers=options.pitome_bsm_layers,
          prop_attn=options.pitome_prop_attn)


def _search_ratio(build, target, gmacs_of):
    """--target-gmacs: the keep ratio (4 decimals) whose GMACs are closest to the target (GMACs grow with it)."""
    return _family.search_continuous(0.5, 1.0, build, target, gmacs_of, iterations=14, decimals=4)


class PiToMeHooks(MethodHooks):
    """The keep ratio and the tokens of the last forward in progress lines and log.txt; the
    official analytic GFLOPs at the end of training (docs/methods/pitome.md, "FLOPs")."""

    def log_state(self, model: nn.Module) -> dict:
        if not is_patched(model):
            return {}
        ratios = model._pitome_cfg.ratios
        state = {"pitome_ratio": sum(ratios) / max(len(ratios), 1)}
        tokens = model._pitome_info.get("tokens")
        if tokens:
            state["pitome_tokens"] = tokens[-1]
        return state

    def report(self, model: nn.Module, context) -> dict:
        if not is_patched(model):
            return {}
        size = getattr(self.options, "input_size", None)
        img_size = (size, size) if size else None
        return {"pitome_tokens_per_block": expected_tokens(model, img_size),
                "pitome_official_gflops": official_gflops(model, img_size)}


FAMILY = _family.register_family(_family.MethodFamily(
    name="pitome",
    title="PiToMe: spectrum-preserving token merging (a patch applied to ViTs with a class token)",
    flags=(
        _family.Flag("--pitome-ratio", type=_family.auto_or(float), metavar="R",
                     help="patch the model with PiToMe, keeping the fraction R in [0.5, 1] of the patch tokens in "
                          "every block, or 'auto' with --target-gmacs; default: no PiToMe (official spelling: "
                          "--algo pitome --ratio R)"),
        _family.Flag("--pitome-margin", type=float, default=DEFAULT_MARGIN, metavar="M",
                     help="m0 of the energy margin schedule m0 - m0 * i / L"),
        _family.Flag("--pitome-bsm-layers", type=int, nargs="+", metavar="I",
                     help="blocks using the energy-ordered bipartite matching (default: the first ceil(L/2), "
                          "the official DeiT rule); the others protect their low-energy tokens"),
        _family.Flag("--pitome-prop-attn", action="store_true", default=False,
                     help="proportional attention (+ ln(size) on the logits; off in the official code)"),
    ),
    patch=_family_patch,
    active=_family_active,
    check_options=_family_check,
    reduction=_family.Reduction("pitome_ratio", _search_ratio),
    hooks=PiToMeHooks,
    official_flops=lambda model, size: {"pitome_official_gflops": official_gflops(model, size)},
    translate_argv=translate_official_argv,
    examples=(
        _family.Example("pitome", model="deit_tiny_patch16_224",
                        kwargs={"depth": 4, "embed_dim": 32, "num_heads": 2, "patch_size": 8},
                        flags=("--pitome-ratio", "0.8"), input_size=32),
        # prefix tokens protected, proportional attention, the MAE order of the two rules
        _family.Example("pitome_distilled", model="deit_tiny_distilled_patch16_224",
                        kwargs={"depth": 4, "embed_dim": 32, "num_heads": 2, "patch_size": 8},
                        flags=("--pitome-ratio", "0.75", "--pitome-prop-attn", "--pitome-bsm-layers", "2", "3"),
                        input_size=32),
    ),
))
