"""TokenReduction baselines: Top-K, K-Medoids, DPC-KNN, Sinkhorn, PatchMerger.

"Which Tokens to Use? Investigating Token Reduction in Vision Transformers" (Haurum et al.,
ICCV 2023 workshops, arXiv 2308.04657) fine-tunes DeiT with token reduction at a few fixed
blocks (`reduction_loc`, paper: 3 6 9). The number of tokens kept at the i-th location is
`K_i = int(r ** i * P)` for one keep rate r, or `int(r_i * P)` for one rate per location, with P
the model's patch count (196 at 224 px). Models `{topk,kmedoids,dpcknn,sinkhorn,patchmerger}_
{tiny,small,base}_patch16_224`, state dicts identical to the official ones.

Changes relative to timm's `VisionTransformer` (DeiT):

* Top-K (`TopKViT`) IS the project's EViT (`models/evit.py`) without token fusion, given a fixed
  token count at each location: block l_i keeps the K_i patch tokens its class token attends
  to most, between its attention and its MLP (shared code, not a copy).
* The merging methods (`ClusterViT` and its four subclasses) act *before* block l_i: the patch
  tokens leaving block l_i - 1 are replaced by K_i new tokens from `cluster_layers.{i}`
  (`models/tokenreduction_clustering.py`, `_sinkhorn.py`, `_patchmerger.py`) and the class
  token is put back in front. Blocks are `ReductionBlock`s (timm `Block`s that hold a reference
  to their reducer, not a submodule, so the state dict keeps the official
  `cluster_layers.{i}.*` keys); the block before a K-Medoids location computes its attention
  matrix explicitly, because K-Medoids weighs tokens by their attention column sums.
* Per-forward state (`ReductionState`: K-Medoids' attention weights, `viz_mode` records)
  lives in a `token_ops.StateSlot` shared by the model and its blocks, so blocks keep timm's
  `Tensor -> Tensor` signature, forward hooks fire and `forward_intermediates` works.
* `viz_mode` (attribute or kwarg): the eval forward returns `(logits, viz_data)` as the
  official models do; `get_reduction_count()`, `get_new_module_names()` as in the official code.

Where the official code crashes or misbehaves this module follows the spec's design choices
(docs/methods/tokenreduction.md, "Differences from the official code"): a Top-K location whose
count equals the current count prunes nothing; counts use the model's patch count, not a
hard-coded 196; several keep rates mean per-location rates for all five methods; invalid
configurations raise `ModelConfigError` at construction.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from functools import partial
from numbers import Integral, Real
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import Block, VisionTransformer, checkpoint_filter_fn
from torch import nn

from . import family
from .deit_cfgs import deit_cfg
from .errors import ModelConfigError
from .evit import EViT
from .hooks import MethodHooks
from .launch_lines import is_number, split_items
from .token_ops import StateSlot, selection_precision
from .tokenreduction_clustering import DPCKNN, ClusterResult, KMedoids, selection_float
from .tokenreduction_patchmerger import PatchMerger
from .tokenreduction_sinkhorn import Sinkhorn

__all__ = [
    "METHODS", "ReductionPlan", "reduction_plan", "TopKViT", "ClusterViT", "KMedoidsViT", "DPCKNNViT",
    "SinkhornViT", "PatchMergerViT", "ReductionBlock", "ReductionState", "checkpoint_filter",
    "official_param_groups", "TokenReductionHooks", "translate_official_argv", "DEIT_WEIGHTS", "FAMILY",
]

METHODS = ("topk", "kmedoids", "dpcknn", "sinkhorn", "patchmerger")
# methods whose counts may not grow along the locations (top-k of more tokens than there are)
_SHRINK_ONLY = ("topk", "kmedoids", "dpcknn")
_OFFICIAL_ARGS = ("reduction_loc", "keep_rate", "viz_mode", "cluster_iters", "equal_weight", "k_neighbors",
                  "sinkhorn_eps")


# ---------------------------------------------------------------------------
# Token counts
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class ReductionPlan:
    """Validated reduction settings: locations, the rate of each location relative to the full
    patch count, and the patch tokens kept there (`K_i = int(rate_i * num_patches)`)."""
    locations: Tuple[int, ...]
    rates: Tuple[float, ...]
    counts: Tuple[int, ...]
    keep_rate: Tuple[float, ...] = ()  # as given (one rate or one per location)


def _as_tuple(value, kind) -> tuple:
    if isinstance(value, kind) and not isinstance(value, bool):
        return (value,)
    try:
        return tuple(value)
    except TypeError:
        return (value,)


def reduction_plan(method: str, reduction_loc, keep_rate, num_patches: int, depth: int) -> ReductionPlan:
    """The token counts of spec section 1; a one-line `ModelConfigError` for invalid settings.

    One rate r: location i (1-based) keeps `int(r ** i * P)` (compounding by list position,
    Python floats); m rates: `int(r_i * P)` each (relative to the ORIGINAL P, no compounding).
    """
    locations = _as_tuple(reduction_loc, Integral)
    for loc in locations:
        if isinstance(loc, bool) or not isinstance(loc, Integral) or not 0 <= loc < depth:
            raise ModelConfigError(f"{method} reduction_loc entry {loc!r} is not a block index 0..{depth - 1}; "
                                   f"e.g. --reduction_loc 3 6 9.")
    locations = tuple(int(loc) for loc in locations)
    if any(b <= a for a, b in zip(locations, locations[1:])):
        raise ModelConfigError(f"{method} reduction_loc {list(locations)} must be strictly increasing; "
                               f"e.g. --reduction_loc 3 6 9.")
    if method == "kmedoids" and locations and locations[0] == 0:
        raise ModelConfigError("kmedoids cannot reduce at block 0 (it weighs tokens by the previous block's "
                               "attention); use locations >= 1, e.g. --reduction_loc 3 6 9.")
    rates = _as_tuple(keep_rate, Real)
    given = tuple(float(r) for r in rates if isinstance(r, Real) and not isinstance(r, bool))
    for rate in rates:
        if isinstance(rate, bool) or not isinstance(rate, Real) or not 0 < rate <= 1:
            raise ModelConfigError(f"{method} keep_rate {rate!r} is outside (0, 1]; e.g. --keep_rate 0.7.")
    if len(rates) == 1:
        rates = tuple(float(rates[0]) ** (i + 1) for i in range(len(locations)))
    elif len(rates) != len(locations):
        raise ModelConfigError(f"{method} has {len(rates)} keep rates for {len(locations)} reduction locations; "
                               f"give one rate or one per location.")
    rates = tuple(float(r) for r in rates)
    counts = tuple(int(rate * num_patches) for rate in rates)
    for loc, rate, count in zip(locations, rates, counts):
        if count < 1:
            raise ModelConfigError(f"{method} keeps int({rate:g} * {num_patches}) = {count} tokens at block {loc}; "
                                   f"raise --keep_rate so every location keeps at least 1.")
    if method in _SHRINK_ONLY:
        for (loc_a, a), (loc_b, b) in zip(zip(locations, counts), zip(locations[1:], counts[1:])):
            if b > a:
                raise ModelConfigError(f"{method} would keep {b} tokens at block {loc_b} after {a} at block {loc_a}; "
                                       f"keep rates must not increase along --reduction_loc.")
    return ReductionPlan(locations, rates, counts, given)


def _check_backbone(model: VisionTransformer, method: str) -> None:
    if model.cls_token is None or model.num_prefix_tokens != 1 or model.global_pool != "token":
        raise ModelConfigError(f"{method} needs exactly one class token and token pooling (DeiT); "
                               f"drop class_token/reg_tokens/global_pool overrides.")


def _to_numpy(tensor: torch.Tensor):
    return tensor.detach().cpu().numpy()


# ---------------------------------------------------------------------------
# Top-K: EViT without fusion, with fixed per-location counts
# ---------------------------------------------------------------------------

class TopKViT(EViT):
    """Top-K pruning (spec section 2) as the project's EViT with `fuse_token=False`.

    No block prunes by rate; EViT's `fixed_tokens` holds this model's per-block counts (`K_i` at
    `reduction_loc[i]`, None elsewhere), which EViT's blocks apply after their attention
    residual, keeping the kept tokens in decreasing class-attention order, whenever a forward is
    given no keep_rate / tokens of its own. A count equal to the current one prunes nothing (the
    official code crashes there).
    """

    method = "topk"

    def __init__(self, *args, reduction_loc: Sequence[int] = (3, 6, 9), keep_rate: Sequence[float] = (0.9,),
                 viz_mode: bool = False, depth: int = 12, **kwargs):
        super().__init__(*args, keep_rate=(1.0,) * depth, fuse_token=False, depth=depth, **kwargs)
        _check_backbone(self, self.method)
        plan = reduction_plan(self.method, reduction_loc, keep_rate, self.patch_embed.num_patches, depth)
        self.reduction_loc = plan.locations
        self.reduction_rates = plan.rates
        self.keep_counts = plan.counts
        self.keep_rate = plan.keep_rate
        tokens: List[Optional[int]] = [None] * depth
        for loc, count in zip(plan.locations, plan.counts):
            tokens[loc] = count
        self.fixed_tokens = tuple(tokens)  # EViT's per-block counts for forwards given no rate
        self.viz_mode = bool(viz_mode)

    def get_reduction_count(self) -> Tuple[int, ...]:
        return self.reduction_loc

    def get_new_module_names(self) -> List[str]:
        return []

    def forward(self, x: torch.Tensor, keep_rate=None, tokens=None, get_idx: bool = False):
        if self.viz_mode and not self.training and not get_idx:
            return self._forward_viz(x)
        return super().forward(x, keep_rate=keep_rate, tokens=tokens, get_idx=get_idx)

    def _forward_viz(self, x: torch.Tensor):
        """`(logits, viz_data)`: the official Top-K viz_data (spec section 7)."""
        outputs: Dict[int, Tuple[int, torch.Tensor]] = {}
        handles = [block.register_forward_hook(
            lambda module, args, out, index=index: outputs.__setitem__(index, (args[0].shape[1], out)))
            for index, block in enumerate(self.blocks)]
        try:
            logits, kept = super().forward(x, get_idx=True)
        finally:
            for handle in handles:
                handle.remove()
        pruning = [index for index in sorted(outputs) if outputs[index][1].shape[1] < outputs[index][0]]
        features = {index: _to_numpy(outputs[index][1]) for index in pruning}
        last = len(self.blocks) - 1
        features.setdefault(last, _to_numpy(outputs[last][1]))
        return logits, {"Kept_Tokens": {index: _to_numpy(idx) for index, idx in zip(pruning, kept)},
                        "Features": features}


# ---------------------------------------------------------------------------
# Merging methods: a reducer before each reduction location
# ---------------------------------------------------------------------------

@dataclass
class ReductionState:
    """One forward's state: the attention weights K-Medoids reads (`[B, N, 1]`, written by the
    block before a K-Medoids location) and, in viz mode, what the official viz_data records."""
    attn_weight: Optional[torch.Tensor] = None
    viz: Optional[Dict[str, Dict[int, Any]]] = None
    results: List[Tuple[int, ClusterResult]] = field(default_factory=list)


class ReductionBlock(Block):
    """timm `Block` that may first replace its input's patch tokens with a reducer's output.

    Modifications relative to timm's Block (its `Tensor -> Tensor` forward is kept):

    * `attach(reducer)` makes the block reduce its input: patch tokens `x[:, 1:]` `[B, N, C]`
      -> reducer output `[B, K, C]`, class token put back in front, then the block as usual.
      The reducer is referenced, not registered (it is `cluster_layers.{i}` of the model);
    * `records_attention` (the block before a K-Medoids location): the attention matrix is
      computed explicitly, `softmax((q @ k^T) * scale)` after attention dropout as the official
      code, and its column sums over heads and queries are left in the state for the reducer.
    """

    def __init__(self, *args, depth: int = 0, state_slot: Optional[StateSlot] = None,
                 records_attention: Sequence[int] = (), **kwargs):
        super().__init__(*args, depth=depth, **kwargs)
        self.block_index = depth
        self.records_attention = depth in records_attention
        self._state_slot = state_slot
        object.__setattr__(self, "_reducer", None)  # a reference, kept out of the state dict

    @property
    def reducer(self) -> Optional[nn.Module]:
        return self._reducer

    def attach(self, reducer: Optional[nn.Module]) -> None:
        object.__setattr__(self, "_reducer", reducer)

    def forward(self, x: torch.Tensor, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
        state = self._state_slot.state if self._state_slot is not None else None
        if self._reducer is not None:
            x = self._reduce(x, state)
        if self.records_attention and state is not None and attn_mask is None and not is_causal:
            out, attn = self._attention_matrix(self.norm1(x))
            with selection_precision(attn):
                state.attn_weight = selection_float(attn).sum(dim=1).sum(dim=1)[:, 1:].unsqueeze(2)
            x = x + self.drop_path1(self.ls1(out))
            x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        else:
            x = super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        if state is not None and state.viz is not None:
            state.viz["Features"][self.block_index] = _to_numpy(x)
        return x

    def _reduce(self, x: torch.Tensor, state: Optional[ReductionState]) -> torch.Tensor:
        weight = None
        if isinstance(self._reducer, KMedoids) and not self._reducer.equal_weight:
            weight = None if state is None else state.attn_weight
            if weight is None or weight.shape[1] != x.shape[1] - 1:
                raise RuntimeError("a K-Medoids block needs the previous block's attention; run it through its "
                                   "model's forward, not on its own.")
        result = self._reducer(x[:, 1:], weight)
        if state is not None:
            if state.viz is not None:
                _record_viz(state.viz, self.block_index, result)
            state.results.append((self.block_index, result))
        return torch.cat([x[:, :1], result.tokens], dim=1)

    def _attention_matrix(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """timm Attention forward with the `[B, H, N, N]` probabilities: (output `[B, N, C]`, attn)."""
        attn = self.attn
        batch, n, _ = x.shape
        qkv = attn.qkv(x).reshape(batch, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = attn.q_norm(q), attn.k_norm(k)
        probs = attn.attn_drop(((q @ k.transpose(-2, -1)) * attn.scale).softmax(dim=-1))
        out = attn.norm((probs @ v).transpose(1, 2).reshape(batch, n, attn.attn_dim))
        if getattr(attn, "gate", None) is not None:
            out = out * attn.gate(x).sigmoid()
        return attn.proj_drop(attn.proj(out)), probs


def _record_viz(viz: Dict[str, Dict[int, Any]], index: int, result: ClusterResult) -> None:
    if result.soft is None:
        viz["Kept_Tokens"][index] = _to_numpy(result.centers)
        viz["Assignment_Maps"][index] = _to_numpy(result.assignment)
    else:
        viz["Assignment_Maps"][index] = _to_numpy(result.assignment)
        viz["Soft_Assignment_Maps"][index] = _to_numpy(result.soft)
    viz["Center_Feats"][index] = _to_numpy(result.center_feats)


class ClusterViT(VisionTransformer):
    """DeiT whose patch tokens are replaced by K_i reducer outputs before each `reduction_loc[i]`.

    Subclasses name the method and build `cluster_layers.{i}` (`_make_reducer`). `forward`,
    `forward_features` and `forward_intermediates` make one `ReductionState` per call.
    """

    method = ""
    viz_keys: Tuple[str, ...] = ()

    def __init__(self, *args, reduction_loc: Sequence[int] = (3, 6, 9), keep_rate: Sequence[float] = (0.9,),
                 viz_mode: bool = False, depth: int = 12, **kwargs):
        slot = StateSlot()
        # validated again below with the real patch count; the locations are needed for the blocks
        locations = _as_tuple(reduction_loc, Integral)
        records = tuple(int(loc) - 1 for loc in locations if self._needs_attention()
                        and isinstance(loc, Integral) and not isinstance(loc, bool))
        kwargs.setdefault("block_fn", partial(ReductionBlock, state_slot=slot, records_attention=records))
        super().__init__(*args, depth=depth, **kwargs)
        _check_backbone(self, self.method)
        plan = reduction_plan(self.method, reduction_loc, keep_rate, self.patch_embed.num_patches, depth)
        self._state_slot = slot
        self.reduction_loc = plan.locations
        self.reduction_rates = plan.rates
        self.keep_counts = plan.counts
        self.keep_rate = plan.keep_rate
        self.viz_mode = bool(viz_mode)
        self.cluster_layers = nn.ModuleList([self._make_reducer(count) for count in plan.counts])
        for loc, reducer in zip(plan.locations, self.cluster_layers):
            self.blocks[loc].attach(reducer)

    def _needs_attention(self) -> bool:
        return False

    def _make_reducer(self, num_clusters: int) -> nn.Module:
        raise NotImplementedError

    def get_reduction_count(self) -> Tuple[int, ...]:
        return self.reduction_loc

    def get_new_module_names(self) -> List[str]:
        return ["cluster_layers"]

    def _open(self, viz: bool = False):
        """(state, previous) of this call; the previous state is not None for a nested call."""
        slot = self._state_slot
        if slot.state is not None:
            return slot.state, True
        if self.grad_checkpointing and torch.is_grad_enabled():
            raise ValueError(f"{self.method} does not support gradient checkpointing; "
                             f"call set_grad_checkpointing(False).")
        state = ReductionState(viz={key: {} for key in self.viz_keys + ("Features",)} if viz else None)
        slot.open(state)
        return state, False

    def _close(self, nested: bool) -> None:
        if not nested:
            self._state_slot.close()

    def forward_features(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        _, nested = self._open()
        try:
            return super().forward_features(x, **kwargs)
        finally:
            self._close(nested)

    def forward_intermediates(self, x: torch.Tensor, *args, output_fmt: str = "NCHW", **kwargs):
        """timm's `forward_intermediates`; once tokens are merged only `output_fmt="NLC"` holds them."""
        if output_fmt == "NCHW" and self.reduction_loc:
            raise ValueError(f"{self.method} merges tokens, so its intermediates do not fill the patch grid; "
                             f"pass output_fmt='NLC'.")
        _, nested = self._open()
        try:
            return super().forward_intermediates(x, *args, output_fmt=output_fmt, **kwargs)
        finally:
            self._close(nested)

    def forward(self, x: torch.Tensor):
        viz = self.viz_mode and not self.training
        state, nested = self._open(viz)
        try:
            logits = self.forward_head(self.forward_features(x))
            if viz and state.viz is not None:
                return logits, state.viz
            return logits
        finally:
            self._close(nested)


class KMedoidsViT(ClusterViT):
    """K-Medoids (spec section 3): medoids of the patch tokens, weighed by the previous block's attention."""

    method = "kmedoids"
    viz_keys = ("Kept_Tokens", "Assignment_Maps", "Center_Feats")

    def __init__(self, *args, cluster_iters: int = 3, equal_weight: bool = False, **kwargs):
        if isinstance(cluster_iters, bool) or not isinstance(cluster_iters, Integral) or cluster_iters < 0:
            raise ModelConfigError(f"kmedoids cluster_iters must be an integer >= 0, got {cluster_iters!r}.")
        self.cluster_iters = int(cluster_iters)
        self.equal_weight = bool(equal_weight)
        super().__init__(*args, **kwargs)

    def _needs_attention(self) -> bool:
        return not self.equal_weight

    def _make_reducer(self, num_clusters: int) -> nn.Module:
        return KMedoids(num_clusters, self.cluster_iters, self.equal_weight)


class DPCKNNViT(ClusterViT):
    """DPC-KNN (spec section 4): density-peaks centres, exp(score)-weighted cluster means."""

    method = "dpcknn"
    viz_keys = ("Kept_Tokens", "Assignment_Maps", "Center_Feats")

    def __init__(self, *args, k_neighbors: int = 5, equal_weight: bool = False, **kwargs):
        if isinstance(k_neighbors, bool) or not isinstance(k_neighbors, Integral) or k_neighbors < 1:
            raise ModelConfigError(f"dpcknn k_neighbors must be an integer >= 1, got {k_neighbors!r}.")
        self.k_neighbors = int(k_neighbors)
        self.equal_weight = bool(equal_weight)
        super().__init__(*args, **kwargs)
        available = (self.patch_embed.num_patches,) + self.keep_counts[:-1]
        for loc, tokens in zip(self.reduction_loc, available):
            if self.k_neighbors > tokens:
                raise ModelConfigError(f"dpcknn k_neighbors {self.k_neighbors} exceeds the {tokens} tokens reaching "
                                       f"block {loc}; use --k_neighbors {tokens} or fewer.")

    def _make_reducer(self, num_clusters: int) -> nn.Module:
        return DPCKNN(self.embed_dim, num_clusters, self.k_neighbors, self.equal_weight)


class SinkhornViT(ClusterViT):
    """Sinkhorn (spec section 5): optimal-transport soft assignment onto K learned unit centres."""

    method = "sinkhorn"
    viz_keys = ("Assignment_Maps", "Soft_Assignment_Maps", "Center_Feats")

    def __init__(self, *args, cluster_iters: int = 3, sinkhorn_eps: float = 1.0, **kwargs):
        if isinstance(cluster_iters, bool) or not isinstance(cluster_iters, Integral) or cluster_iters < 0:
            raise ModelConfigError(f"sinkhorn cluster_iters must be an integer >= 0, got {cluster_iters!r}.")
        if isinstance(sinkhorn_eps, bool) or not isinstance(sinkhorn_eps, Real) or not sinkhorn_eps > 0:
            raise ModelConfigError(f"sinkhorn sinkhorn_eps must be > 0, got {sinkhorn_eps!r}.")
        self.cluster_iters = int(cluster_iters)
        self.sinkhorn_eps = float(sinkhorn_eps)
        super().__init__(*args, **kwargs)

    def _make_reducer(self, num_clusters: int) -> nn.Module:
        return Sinkhorn(self.embed_dim, num_clusters, self.sinkhorn_eps, self.cluster_iters)


class PatchMergerViT(ClusterViT):
    """PatchMerger (spec section 6): K learned queries attending over the layer-normed patch tokens."""

    method = "patchmerger"
    viz_keys = ("Assignment_Maps", "Soft_Assignment_Maps", "Center_Feats")

    def _make_reducer(self, num_clusters: int) -> nn.Module:
        return PatchMerger(self.embed_dim, num_clusters)


# ---------------------------------------------------------------------------
# Registration
# ---------------------------------------------------------------------------

_CLASSES = {"topk": TopKViT, "kmedoids": KMedoidsViT, "dpcknn": DPCKNNViT, "sinkhorn": SinkhornViT,
            "patchmerger": PatchMergerViT}


# The official runs fine-tune from these DeiT weights (models_act.py); the new
# cluster_layers keep their initialisation (see _filter_fn).
default_cfgs = generate_default_cfgs({
    f"{method}_{size}_patch16_224.fb_in1k": deit_cfg(f"deit_{size}_patch16_224.fb_in1k")
    for method in METHODS for size in ("tiny", "small", "base")
})


def checkpoint_filter(state_dict: dict, model: nn.Module) -> dict:
    """timm's ViT filter, plus the model's own `cluster_layers.*` for keys a DeiT checkpoint lacks
    (so a DeiT checkpoint loads strictly, the new layers keeping their initialisation)."""
    state_dict = checkpoint_filter_fn(state_dict, model, adapt_layer_scale=True)
    for key, value in model.state_dict().items():
        if key.startswith("cluster_layers.") and key not in state_dict:
            state_dict[key] = value
    return state_dict


def _create(variant: str, pretrained: bool = False, args=None, distilled: bool = False, **kwargs):
    method = variant.split("_", 1)[0]
    if distilled:
        raise ModelConfigError(f"{method} models have no distillation token (the official distilled path cannot "
                               f"run); drop distilled=True / use --distillation-type none.")
    if args is not None:  # an official argparse namespace: its options, explicit kwargs win
        for name in _OFFICIAL_ARGS:
            if hasattr(args, name) and _accepts(method, name):
                kwargs.setdefault(name, getattr(args, name))
    for name in _OFFICIAL_ARGS:  # one family's flags reach all five methods: refuse what does not apply
        if name in kwargs and not _accepts(method, name):
            if kwargs.pop(name) is not None:
                owners = " / ".join(m for m in METHODS if _accepts(m, name))
                raise ModelConfigError(f"{name} is an option of the {owners} models, not of {variant}; drop it")
    if "drop_rate" in kwargs:
        # timm 0.4.12 (the official stack) applies drop_rate in pos-drop, attention projection
        # and MLP, not before the head
        rate = kwargs.pop("drop_rate")
        kwargs.setdefault("pos_drop_rate", rate)
        kwargs.setdefault("proj_drop_rate", rate)
    return build_model_with_cfg(_CLASSES[method], variant, pretrained, pretrained_filter_fn=checkpoint_filter,
                                **kwargs)


def _accepts(method: str, name: str) -> bool:
    extras = {"kmedoids": ("cluster_iters", "equal_weight"), "dpcknn": ("k_neighbors", "equal_weight"),
              "sinkhorn": ("cluster_iters", "sinkhorn_eps")}
    return name in ("reduction_loc", "keep_rate", "viz_mode") or name in extras.get(method, ())


_TINY = dict(patch_size=16, embed_dim=192, depth=12, num_heads=3)
_SMALL = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6)
_BASE = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12)


@register_model
def topk_tiny_patch16_224(pretrained: bool = False, **kwargs) -> TopKViT:
    model_args = dict(_TINY)
    return _create("topk_tiny_patch16_224", pretrained, **dict(model_args, **kwargs))


@register_model
def topk_small_patch16_224(pretrained: bool = False, **kwargs) -> TopKViT:
    model_args = dict(_SMALL)
    return _create("topk_small_patch16_224", pretrained, **dict(model_args, **kwargs))


@register_model
def topk_base_patch16_224(pretrained: bool = False, **kwargs) -> TopKViT:
    model_args = dict(_BASE)
    return _create("topk_base_patch16_224", pretrained, **dict(model_args, **kwargs))


@register_model
def kmedoids_tiny_patch16_224(pretrained: bool = False, **kwargs) -> KMedoidsViT:
    model_args = dict(_TINY)
    return _create("kmedoids_tiny_patch16_224", pretrained, **dict(model_args, **kwargs))


@register_model
def kmedoids_small_patch16_224(pretrained: bool = False, **kwargs) -> KMedoidsViT:
    model_args = dict(_SMALL)
    return _create("kmedoids_small_patch16_224", pretrained, **dict(model_args, **kwargs))


@register_model
def kmedoids_base_patch16_224(pretrained: bool = False, **kwargs) -> KMedoidsViT:
    model_args = dict(_BASE)
    return _create("kmedoids_base_patch16_224", pretrained, **dict(model_args, **kwargs))


@register_model
def dpcknn_tiny_patch16_224(pretrained: bool = False, **kwargs) -> DPCKNNViT:
    model_args = dict(_TINY)
    return _create("dpcknn_tiny_patch16_224", pretrained, **dict(model_args, **kwargs))


@register_model
def dpcknn_small_patch16_224(pretrained: bool = False, **kwargs) -> DPCKNNViT:
    model_args = dict(_SMALL)
    return _create("dpcknn_small_patch16_224", pretrained, **dict(model_args, **kwargs))


@register_model
def dpcknn_base_patch16_224(pretrained: bool = False, **kwargs) -> DPCKNNViT:
    model_args = dict(_BASE)
    return _create("dpcknn_base_patch16_224", pretrained, **dict(model_args, **kwargs))


@register_model
def sinkhorn_tiny_patch16_224(pretrained: bool = False, **kwargs) -> SinkhornViT:
    model_args = dict(_TINY)
    return _create("sinkhorn_tiny_patch16_224", pretrained, **dict(model_args, **kwargs))


@register_model
def sinkhorn_small_patch16_224(pretrained: bool = False, **kwargs) -> SinkhornViT:
    model_args = dict(_SMALL)
    return _create("sinkhorn_small_patch16_224", pretrained, **dict(model_args, **kwargs))


@register_model
def sinkhorn_base_patch16_224(pretrained: bool = False, **kwargs) -> SinkhornViT:
    model_args = dict(_BASE)
    return _create("sinkhorn_base_patch16_224", pretrained, **dict(model_args, **kwargs))


@register_model
def patchmerger_tiny_patch16_224(pretrained: bool = False, **kwargs) -> PatchMergerViT:
    model_args = dict(_TINY)
    return _create("patchmerger_tiny_patch16_224", pretrained, **dict(model_args, **kwargs))


@register_model
def patchmerger_small_patch16_224(pretrained: bool = False, **kwargs) -> PatchMergerViT:
    model_args = dict(_SMALL)
    return _create("patchmerger_small_patch16_224", pretrained, **dict(model_args, **kwargs))


@register_model
def patchmerger_base_patch16_224(pretrained: bool = False, **kwargs) -> PatchMergerViT:
    model_args = dict(_BASE)
    return _create("patchmerger_base_patch16_224", pretrained, **dict(model_args, **kwargs))


# ---------------------------------------------------------------------------
# Training recipe: the official optimizer groups and backbone freeze (optim.py, engine.py)
# ---------------------------------------------------------------------------

_ROLE = "tokenreduction"  # optimizer group key: "new" or "backbone" (kept in optimizer checkpoints)
_NEW_MODULES = ("head.weight", "head.bias", "head_dist.weight", "head_dist.bias", "pos_embed", "patch_embed")


def official_param_groups(model: nn.Module, lr: float, weight_decay: float, backbone_lr_scale: float = 1.0,
                          constant_cls: bool = False, constant_pos: bool = False) -> List[dict]:
    """The official optimizer groups (optim.py `get_parameter_groups`), in its order of first use.

    A parameter is new if its name contains, or is contained in, one of the head / pos_embed /
    patch_embed names or `model.get_new_module_names()` (`cluster_layers`); new parameters train
    at `lr`, the backbone at `lr * backbone_lr_scale`. No weight decay for 1-D tensors, `.bias`
    and `model.no_weight_decay()` names. `constant_cls` leaves cls_token / dist_token out of the
    optimizer, `constant_pos` pos_embed (the official code wires both to --constant_cls; fixed).
    """
    new_names = list(_NEW_MODULES) + list(getattr(model, "get_new_module_names", lambda: [])())
    skip = set(getattr(model, "no_weight_decay", lambda: set())())
    groups: Dict[Tuple[str, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if constant_cls and ("cls_token" in name or "dist_token" in name):
            continue
        if constant_pos and "pos_embed" in name:
            continue
        role = "new" if any(name in s or s in name for s in new_names) else "backbone"
        decay = not (param.ndim == 1 or name.endswith(".bias") or name in skip)
        key = (role, decay)
        if key not in groups:
            groups[key] = {"params": [], "weight_decay": weight_decay if decay else 0.0,
                           "lr": lr * (backbone_lr_scale if role == "backbone" else 1.0), _ROLE: role}
        groups[key]["params"].append(param)
    return list(groups.values())


class TokenReductionHooks(MethodHooks):
    """The TokenReduction training recipe (train.py, optim.py, engine.py).

    * optimizer groups: `official_param_groups` (new modules at the lr, the backbone at
      `--backbone_lr_scale` times it; `--constant_cls` / `--constant_pos`);
    * `--backbone_freeze_steps E`: the backbone groups run at lr 0 in epochs < E (the unit is
      epochs despite the name): right before each optimizer step the groups this family made
      (tagged in the group dict, so a resumed optimizer state keeps the tag) get lr 0, as the
      official loop does before each iteration; the scheduler sets their lr again after the step;
    * progress lines: the patch tokens kept at each reduction location.
    """

    def __init__(self, model: nn.Module, options):
        super().__init__(model, options)
        self.epoch = 0
        self.freeze_epochs = int(options.backbone_freeze_steps or 0)

    def param_groups(self, model: nn.Module, lrs: List[float]) -> Optional[list]:
        if len(lrs) != 1:
            raise ModelConfigError(f"--lr takes one value for the TokenReduction models, got {len(lrs)}")
        return official_param_groups(model, lrs[0], float(self.options.weight_decay or 0.0),
                                     float(self.options.backbone_lr_scale), bool(self.options.constant_cls),
                                     bool(self.options.constant_pos))

    def before_optimizer_step(self, model: nn.Module, optimizer) -> None:
        self.freeze_backbone(optimizer.param_groups)

    def freeze_backbone(self, groups: Sequence[dict]) -> None:
        """lr 0 for this family's backbone groups while the epoch is below --backbone_freeze_steps."""
        if self.epoch < self.freeze_epochs:
            for group in groups:
                if group.get(_ROLE) == "backbone":
                    group["lr"] = 0.0

    def on_epoch_start(self, model, epoch):
        self.epoch = epoch

    def on_step_start(self, model, epoch, step, steps_per_epoch):
        self.epoch = epoch

    def log_state(self, model) -> Dict[str, float]:
        return {f"tokens_b{loc}": count for loc, count in zip(model.reduction_loc, model.keep_counts)}


def _family_hooks(model, options) -> Optional[TokenReductionHooks]:
    return TokenReductionHooks(model, options) if isinstance(model, (TopKViT, ClusterViT)) else None


# ---------------------------------------------------------------------------
# Official launch lines (train.py) -> this project's flags
# ---------------------------------------------------------------------------

# train.py always starts from these DeiT weights (models_act.py downloads them into ./deit_weights)
DEIT_WEIGHTS = {
    "tiny": "./deit_weights/deit_tiny_patch16_224-a1311bcf.pth",
    "small": "./deit_weights/deit_small_patch16_224-cd65a155.pth",
    "base": "./deit_weights/deit_base_patch16_224-b5f2ef4d.pth",
}
_TRAIN_PY_RENAMED = {"--data": "--data-path", "--grad_accum_steps": "--accum-iter", "--use_amp": "--amp"}
_TRAIN_PY_ONLY = ("--dataset", "--data", "--lr_batch_normalizer", "--sched_in_steps", "--use_amp",
                  "--grad_accum_steps")


def _model_of(items: List[List[str]]) -> str:
    for item in items:
        if item[0] == "--model" and len(item) > 1:
            return item[1]
    return ""


def translate_official_argv(argv: Sequence[str]) -> List[str]:
    """A train.py line of the official repository in this project's flags (lines for other models
    are returned unchanged).

    `--dataset imagenet` -> `--data-set IMNET` (other datasets: a one-line error), `--data P` ->
    `--data-path P`, `--sched_in_steps` -> `--sched-step iter`, `--use_amp` -> `--amp`,
    `--grad_accum_steps N` -> `--accum-iter N`, `--lr_batch_normalizer N` folds into `--lr` (the
    trainer divides by 512: `lr * 512 / N`, train.py's default lr 5e-4 when --lr is absent). A
    train.py line without `--finetune` / `--resume` / `--eval` starts, as train.py always does,
    from the DeiT weights models_act.py downloads (`--finetune ./deit_weights/deit_<size>_...pth`).
    `--distillation-type soft|hard` is refused (these models have no distillation token).
    """
    items = split_items(argv)
    model = _model_of(items)
    if not (model.split("_", 1)[0] in METHODS and model.endswith("_patch16_224")):
        return list(argv)
    options = {item[0].replace("-", "_") for item in items}
    if any(item[0].replace("-", "_") == "__distillation_type" and item[1:2] not in (["none"], []) for item in items):
        raise ModelConfigError(f"{model} has no distillation token (the official distilled runs cannot train); "
                               f"drop --distillation-type")
    train_py = any(item[0] in _TRAIN_PY_ONLY for item in items)
    normalizer = None
    out: List[List[str]] = []
    for item in items:
        option, values = item[0], item[1:]
        if option == "--dataset":
            if values[:1] != ["imagenet"]:
                raise ModelConfigError(f"--dataset {' '.join(values) or '(missing)'} is not supported here; "
                                       f"the TokenReduction models train on ImageNet (--dataset imagenet)")
            out.append(["--data-set", "IMNET"] + values[1:])
        elif option == "--lr_batch_normalizer":
            if not values or not is_number(values[0]) or float(values[0]) <= 0:
                raise ModelConfigError(f"--lr_batch_normalizer needs a positive number, got {values[:1]}")
            normalizer = float(values[0])
            if values[1:]:
                out.append(values[1:])
        elif option == "--sched_in_steps":
            out.append(["--sched-step", "iter"] + values)
        elif option in _TRAIN_PY_RENAMED:
            out.append([_TRAIN_PY_RENAMED[option]] + values)
        else:
            out.append(item)
    if normalizer is not None and "__unscale_lr" not in options:
        lr_items = [item for item in out if item[0] == "--lr" and len(item) > 1 and is_number(item[1])]
        if lr_items:
            for item in lr_items:
                item[1] = repr(float(item[1]) * 512 / normalizer)
        else:
            out.append(["--lr", repr(5e-4 * 512 / normalizer)])
    if train_py and not options & {"__finetune", "__resume", "__checkpoint", "__eval", "__pretrained",
                                   "__auto_resume"}:
        size = model.split("_")[1]
        if size in DEIT_WEIGHTS:
            out.append(["--finetune", DEIT_WEIGHTS[size]])
    return [token for item in out for token in item]


# ---------------------------------------------------------------------------
# The method family
# ---------------------------------------------------------------------------

class _RatesAction(argparse.Action):
    """`--keep_rate R [R ...]`: floats, or the single word 'auto' (a rate solved by --target-gmacs)."""

    def __init__(self, option_strings, dest, nargs="+", **kwargs):
        super().__init__(option_strings, dest, nargs=nargs, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        if len(values) == 1 and str(values[0]).strip().lower() == family.AUTO:
            setattr(namespace, self.dest, family.AUTO)
            return
        try:
            setattr(namespace, self.dest, [float(v) for v in values])
        except ValueError:
            parser.error(f"{option_string} takes keep rates such as 0.7 (or 0.9 0.8 0.7, or 'auto'), got "
                         f"{' '.join(values)}")


def _check_options(options) -> None:
    rates = options.keep_rate
    if rates is not None and rates != family.AUTO:
        for rate in _as_tuple(rates, Real):
            if not 0 < rate <= 1:
                raise ModelConfigError(f"--keep_rate {rate:g} is outside (0, 1]; e.g. --keep_rate 0.7")
    for dest, low in (("cluster_iters", 0), ("k_neighbors", 1), ("backbone_freeze_steps", 0)):
        value = getattr(options, dest)
        if value is not None and value < low:
            raise ModelConfigError(f"--{dest} must be >= {low}, got {value}")
    for dest in ("sinkhorn_eps", "backbone_lr_scale"):
        value = getattr(options, dest)
        if value is not None and not value >= (0 if dest == "backbone_lr_scale" else 1e-300):
            raise ModelConfigError(f"--{dest} must be {'>= 0' if dest == 'backbone_lr_scale' else '> 0'}, "
                                   f"got {value}")


def _search_keep_rate(build, target, gmacs_of):
    """--target-gmacs for `--keep_rate auto`: one rate r (location i keeps int(r ** i * P))."""
    probe = build(1.0)
    locations, patches = len(probe.reduction_loc), probe.patch_embed.num_patches
    if not locations:
        raise ModelConfigError("--keep_rate auto needs reduction locations; give --reduction_loc, e.g. 3 6 9")
    # the smallest three-decimal rate that keeps at least one token at the last location
    low = next(k / 1000 for k in range(1, 1001) if int((k / 1000) ** locations * patches) >= 1)
    return family.search_continuous(low, 1.0, build, target, gmacs_of, decimals=3)


_TINY_EXAMPLE = dict(embed_dim=32, num_heads=2, patch_size=8, depth=4)  # 16 patches at 32 px
_EXAMPLE_FLAGS = ("--reduction_loc", "1", "3", "--keep_rate", "0.5")    # 8 then 4 patch tokens

FAMILY = family.register_family(family.MethodFamily(
    name="tokenreduction",
    title="TokenReduction baselines: Top-K, K-Medoids, DPC-KNN, Sinkhorn, PatchMerger (ICCVW 2023)",
    owns=family.models_of(__name__),
    flags=(
        family.Flag("--reduction_loc", type=int, nargs="+", kwarg="reduction_loc", metavar="BLOCK",
                    help="blocks at which tokens are reduced, e.g. 3 6 9 (model default)"),
        family.Flag("--keep_rate", action=_RatesAction, kwarg="keep_rate", metavar="RATE",
                    help="one rate r (location i keeps int(r**i * patches)) or one rate per location "
                         "(model default 0.9; 'auto' with --target-gmacs)"),
        family.Flag("--cluster_iters", type=int, kwarg="cluster_iters", metavar="N",
                    help="K-Medoids / Sinkhorn iterations (model default 3)"),
        family.Flag("--equal_weight", action="store_true", default=None, kwarg="equal_weight",
                    help="K-Medoids / DPC-KNN ablation: unit token weights (K-Medoids: sampled start)"),
        family.Flag("--k_neighbors", type=int, kwarg="k_neighbors", metavar="K",
                    help="DPC-KNN neighbours of the local density (model default 5)"),
        family.Flag("--sinkhorn_eps", type=float, kwarg="sinkhorn_eps", metavar="EPS",
                    help="Sinkhorn entropic regularisation (model default 1.0)"),
        family.Flag("--viz_mode", action="store_true", default=False,
                    help="write validate.py's per-image JSON (<output_dir>/<run name>_viz_results.json: "
                         "predictions, kept tokens / assignments per location) after --eval, then exit"),
        family.Flag("--backbone_lr_scale", type=float, default=1.0,
                    help="lr multiplier of the backbone (all but head, pos_embed, patch_embed, cluster_layers)"),
        family.Flag("--backbone_freeze_steps", type=int, default=0, metavar="EPOCHS",
                    help="epochs (despite the name) at the start in which the backbone's lr is 0"),
        family.Flag("--constant_cls", action="store_true", default=False,
                    help="leave cls_token (and dist_token) out of the optimizer"),
        family.Flag("--constant_pos", action="store_true", default=False,
                    help="leave pos_embed out of the optimizer (train.py wired it to --constant_cls; fixed)"),
        family.Flag("--save_more_than_best", action="store_true", default=False,
                    help="accepted for train.py lines: main.py always writes checkpoint.pth and best_checkpoint.pth"),
        family.Flag("--wandb_project", default=None, metavar="NAME",
                    help="accepted for train.py lines and recorded in args.yaml (no W&B logging)"),
        family.Flag("--wandb_group", default=None, metavar="NAME",
                    help="accepted for train.py lines and recorded in args.yaml (no W&B logging)"),
    ),
    check_options=_check_options,
    reduction=family.Reduction("keep_rate", _search_keep_rate),
    hooks=_family_hooks,
    # train.py's defaults where they differ from DeiT's main.py
    recipe=dict(cooldown_epochs=0),
    translate_argv=translate_official_argv,
    checkpoint_filter_fn=checkpoint_filter,
    commands=(family.Command("viz_mode", "tools.tokenreduction_visualize:viz_results_command", exits=True,
                             needs_data=True),),
    # one per registered model (the training test covers every entry point); the small and base
    # entry points build the same classes at the same tiny width, so only tiny is compiled
    examples=tuple(
        family.Example(f"{method}_{size}", model=f"{method}_{size}_patch16_224", kwargs=dict(_TINY_EXAMPLE),
                       flags=_EXAMPLE_FLAGS, invalid=dict(keep_rate=(1.5,)),
                       compile=("eval", "train") if size == "tiny" else ())
        for method in METHODS for size in ("tiny", "small", "base")),
))
