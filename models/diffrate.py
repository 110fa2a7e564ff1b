"""DiffRate: "Differentiable Compression Rate for Efficient Vision Transformers" (Chen et al., ICCV 2023,
arXiv 2305.17997).

Every block ranks its tokens by the attention the class token pays them, drops the lowest
ones (prune) and averages the next-lowest into their most similar surviving token (merge),
between its attention and its MLP. How many tokens each block keeps after pruning and after
merging (two integers per block, class token included) is found once per model and FLOPs
budget by a short differentiable search and shipped as a table
(`models/diffrate_schedules.json`); evaluation applies the table to unchanged DeiT weights.

An in-place, reversible patch for timm `VisionTransformer`s with a class token
(`patch`, `unpatch`, `is_patched`), and the official model names
`vit_deit_{tiny,small,base}_patch16_224` (timm DeiT + the patch). Changes relative to timm:

* every `Block` gets two differentiable discrete proxies, `prune_ddp` and `merge_ddp`
  (`DiffRateProxy`: state-dict entries `kept_token_candidate` and `selected_probability`,
  the official layout, so search checkpoints load strictly);
* evaluation forward of a block: attention with proportional attention (`ln(size)` added to
  every key's logit once a merge has happened), then the class-attention ranking, pruning to
  `P_i` tokens and merging down to `M_i` tokens (unweighted mean of the features, sizes
  updated with similarity-weighted counts), then the MLP on the reduced sequence;
* training forward (the search): the sequence stays full length; the proxies' expected kept
  numbers switch tokens off through straight-through masks that act as key policies of the
  following blocks' attention (masked softmax), and the FLOPs of the forward are a
  differentiable function of the proxies (`calculate_flop_training`);
* LayerScale (`ls1`, `ls2`) is applied (the official code ignores it; identity for DeiT).

The token kernels and the proxy are pure functions / a small module in `models/diffrate_ops.py`.

Per-forward state (sizes, masks, sources, the proxies' kept numbers) lives in one
`DiffRateState` made by the model's forward and held in a `StateSlot` shared with the
blocks, which keep timm's `Tensor -> Tensor` signature (forward hooks and
`forward_intermediates` work). Differences from the official code (docs/methods/diffrate.md):
the forward returns logits (`forward(x, return_flop=True)` gives `(logits, flops)`), an
explicit schedule is never changed by loading a state dict and without one evaluation
derives the kept numbers from the loaded `selected_probability`, `parameters()` is timm's
(`arch_parameters()` lists the proxies), the ranking sort is stable, the active count is
rounded, schedules are validated and models with distillation or register tokens are refused.
"""
from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass, field
from numbers import Integral, Real
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import Block, VisionTransformer, checkpoint_filter_fn

from .deit_cfgs import deit_cfg
from .errors import ModelConfigError
from .diffrate_ops import (DiffRateProxy, class_attention_scores, gather_tokens, kept_numbers, masked_softmax,
                           match_to_destinations, merge_into, rank_tokens, score_dtype, ste_min)
from .token_ops import StateSlot, attention_with_keys, patched_class, restore_classes, selection_precision

__all__ = [
    "patch", "unpatch", "is_patched", "DiffRateProxy", "DiffRateState", "load_schedules", "shipped_schedule",
    "schedule_key_of", "tokens_per_block", "inference_flops", "SCHEDULE_FILE", "MODEL_SCHEDULE_KEYS",
]

SCHEDULE_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "diffrate_schedules.json")

# official model name -> key of the shipped table (the official main.py's model_name_dict)
MODEL_SCHEDULE_KEYS = {
    "vit_deit_tiny_patch16_224": "ViT-T-DeiT",
    "vit_deit_small_patch16_224": "ViT-S-DeiT",
    "vit_deit_base_patch16_224": "ViT-B-DeiT",
}
_KEY_BY_WIDTH = {192: "ViT-T-DeiT", 384: "ViT-S-DeiT", 768: "ViT-B-DeiT"}

Schedule = Tuple[Tuple[int, ...], Tuple[int, ...]]


# ---------------------------------------------------------------------------
# Shipped schedules
# ---------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def load_schedules() -> Dict[str, Dict[str, dict]]:
    """The shipped table: schedule key -> FLOPs key -> {prune_kept_num, merge_kept_num, official_gflops}.

    Parsed with `json` (the official code `eval`s strings read from the working directory).
    """
    with open(SCHEDULE_FILE, encoding="utf-8") as f:
        table = json.load(f)
    return {key: value for key, value in table.items() if not key.startswith("_")}


def _flops_key(target_flops) -> str:
    """The table's key of a FLOPs target: `str(float(F))` as the official lookup ("2.9", "10.0")."""
    if isinstance(target_flops, bool) or not isinstance(target_flops, (Real, str)):
        raise ModelConfigError(f"DiffRate target_flops must be a number such as 2.9, got {target_flops!r}.")
    try:
        return str(float(target_flops))
    except ValueError:
        raise ModelConfigError(f"DiffRate target_flops must be a number such as 2.9, got {target_flops!r}.") from None


def shipped_schedule(schedule_key: str, target_flops) -> Tuple[List[int], List[int]]:
    """(prune_kept_num, merge_kept_num) of the shipped schedule `schedule_key` at `target_flops` GFLOPs."""
    table = load_schedules()
    if schedule_key not in table:
        raise ModelConfigError(f"DiffRate has no shipped schedules for {schedule_key!r}; known keys: "
                               f"{', '.join(table)} (or pass prune_kept_num and merge_kept_num).")
    entries = table[schedule_key]
    key = _flops_key(target_flops)
    if key not in entries:
        raise ModelConfigError(f"DiffRate ships no {schedule_key} schedule for {key} GFLOPs; available: "
                               f"{', '.join(entries)} (or pass prune_kept_num and merge_kept_num).")
    return list(entries[key]["prune_kept_num"]), list(entries[key]["merge_kept_num"])


def schedule_key_of(model: nn.Module) -> Optional[str]:
    """The shipped table a model fits: a 224-px, patch-16, depth-12 class-token DeiT of width 192/384/768."""
    patch_embed = getattr(model, "patch_embed", None)
    if (getattr(patch_embed, "num_patches", None) == 196 and tuple(getattr(patch_embed, "patch_size", ())) == (16, 16)
            and len(getattr(model, "blocks", ())) == 12 and getattr(model, "cls_token", None) is not None):
        return _KEY_BY_WIDTH.get(getattr(model, "embed_dim", None))
    return None


def tokens_per_block(prune_kept_num: Sequence[int], merge_kept_num: Sequence[int], start: int) -> List[int]:
    """Tokens after each block: `N_{i+1} = min(N_i, P_i, M_i)`, `N_0 = start`."""
    tokens, n = [], start
    for p, m in zip(prune_kept_num, merge_kept_num):
        n = min(n, p, m)
        tokens.append(n)
    return tokens


def inference_flops(embed_dim: int, num_patches: int, patch_area: int, num_classes: int,
                    prune_kept_num: Sequence[int], merge_kept_num: Sequence[int], in_chans: int = 3) -> float:
    """The official FLOPs formula (multiply-accumulates) at integer kept numbers.

    `N C (3 p^2)` for the patch embedding (N counting the class token) plus `C num_classes` for
    the head, and per block `4 N C^2 + 2 N^2 C` for the attention at its input length and
    `8 N C^2` for the MLP after the reduction. Norms, softmax, the ranking and the merge's
    similarity matmul are not counted (the fvcore count of benchmark.py does count them).
    """
    c = embed_dim
    n = num_patches + 1
    flops = 0
    for p, m in zip(prune_kept_num, merge_kept_num):
        flops += 4 * n * c * c + 2 * n * n * c
        n = min(n, p, m)
        flops += 8 * n * c * c
    flops += (num_patches + 1) * c * patch_area * in_chans + c * num_classes
    return float(flops)


# ---------------------------------------------------------------------------
# Per-forward state (the token kernels and the proxy are in models/diffrate_ops.py)
# ---------------------------------------------------------------------------

@dataclass
class DiffRateState:
    """One forward's state.

    size `[B, T, 1]` float32 similarity-weighted token sizes (ones at start), source
    `[B, T, T0]` (with `trace_source`), mask `[B, T0]` (training: 1 = active), schedule:
    per block `(P_i, M_i)` (evaluation), prune_kept / merge_kept: the proxies' kept-number
    tensors of the training forward (for the FLOPs), tokens: sequence length after each block
    (training: active tokens).
    """
    training: bool
    schedule: Optional[List[Tuple[int, int]]] = None
    size: Optional[torch.Tensor] = None
    source: Optional[torch.Tensor] = None
    mask: Optional[torch.Tensor] = None
    merged: bool = False
    prune_kept: List[torch.Tensor] = field(default_factory=list)
    merge_kept: List[torch.Tensor] = field(default_factory=list)
    tokens: List[int] = field(default_factory=list)


# ---------------------------------------------------------------------------
# Patched block and model
# ---------------------------------------------------------------------------

@dataclass
class DiffRateConfig:
    """Settings shared by a patched model and its blocks."""
    granularity: int
    trace_source: bool
    num_patches: int
    schedule: Optional[Schedule] = None
    slot: Optional[StateSlot] = None
    flops_target: Optional[float] = None
    flops_weight: float = 0.0


class DiffRateBlockMixin:
    """Placed before timm's `Block`; see the module docstring for what changes."""

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False) -> torch.Tensor:
        state: Optional[DiffRateState] = self._diffrate_cfg.slot.state
        if state is None or attn_mask is not None or is_causal:  # masks do not survive the reduction
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        if state.training:
            return self._search_forward(x, state)
        return self._eval_forward(x, state)

    # evaluation: tokens really removed -------------------------------------------------
    def _eval_forward(self, x: torch.Tensor, state: DiffRateState) -> torch.Tensor:
        cfg: DiffRateConfig = self._diffrate_cfg
        batch, tokens, _ = x.shape
        if state.size is None:
            _init_state(state, x, cfg.trace_source)
        prune_num, merge_num = state.schedule[self._diffrate_index]
        kept = min(prune_num, tokens)
        merging = merge_num < kept  # official: M < P runs the merge; with no sources it is a no-op
        # sizes are all 1 until the first merge: ln(1) = 0 is skipped (fused attention without a bias)
        size = state.size if state.merged else None
        attn = attention_with_keys(self.attn, self.norm1(x), size)
        x = x + self.drop_path1(self.ls1(attn.out))
        if kept < tokens or merging:
            scores = class_attention_scores(attn.q, attn.k, self.attn.scale, size)
            order = rank_tokens(scores)[:, :kept]
            x = gather_tokens(x, order)
            state.size = gather_tokens(state.size, order)
            if state.source is not None:
                state.source = gather_tokens(state.source, order)
            if merging:
                node_max, node_idx = match_to_destinations(x, merge_num)
                x = merge_into(x[:, :merge_num], x[:, merge_num:], node_idx, "mean")
                weighted = state.size[:, merge_num:] * node_max.unsqueeze(-1)
                state.size = merge_into(state.size[:, :merge_num], weighted, node_idx, "sum")
                if state.source is not None:
                    state.source = merge_into(state.source[:, :merge_num], state.source[:, merge_num:], node_idx, "amax")
                state.merged = True
        state.tokens.append(x.shape[1])
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))

    # training: the search (full length, straight-through masks) ---------------------
    def _search_forward(self, x: torch.Tensor, state: DiffRateState) -> torch.Tensor:
        cfg: DiffRateConfig = self._diffrate_cfg
        batch, tokens, channels = x.shape
        if state.size is None:
            _init_state(state, x, cfg.trace_source)
            state.mask = torch.ones(batch, tokens, device=x.device, dtype=state.size.dtype)
        out, cls_attn = _search_attention(self.attn, self.norm1(x), state.size, state.mask)
        x = x + self.drop_path1(self.ls1(out))
        order = rank_tokens(cls_attn)
        x = gather_tokens(x, order)
        size = gather_tokens(state.size, order)
        mask = gather_tokens(state.mask, order)
        if state.source is not None:
            state.source = gather_tokens(state.source, order)

        # all samples share sample 0's active count (masks are identical across the batch)
        active = int(torch.round(mask[0].detach().sum()))
        prune_kept = self.prune_ddp.expected_kept()
        state.prune_kept.append(prune_kept)
        prune_num = int(prune_kept)
        if prune_num < active:
            mask = mask * self.prune_ddp.token_mask(prune_num, active, tokens).expand(batch, -1)
        mid = min(active, prune_num)

        merge_kept = self.merge_ddp.expected_kept()
        state.merge_kept.append(merge_kept)
        merge_num = int(merge_kept)
        if merge_num < mid:
            step = self.merge_ddp.token_mask(merge_num, mid, tokens)
            head = x[:, :mid]
            node_max, node_idx = match_to_destinations(head.detach(), merge_num)
            merged = merge_into(head[:, :merge_num], head[:, merge_num:], node_idx, "mean")
            x = torch.cat([merged, head[:, merge_num:], x[:, mid:]], dim=1)
            # training sizes: every size of the head clamped to >= 1 (sources weighted by similarity)
            head_size = torch.cat([size[:, :merge_num], size[:, merge_num:mid] * node_max.unsqueeze(-1)], dim=1)
            head_size = head_size.clamp(min=1)
            merged_size = merge_into(head_size[:, :merge_num], head_size[:, merge_num:], node_idx, "sum")
            size = torch.cat([merged_size, head_size[:, merge_num:], size[:, mid:]], dim=1)
            mask = mask * step
            mid = merge_num
        state.size, state.mask = size, mask
        state.tokens.append(mid)
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


def _init_state(state: DiffRateState, x: torch.Tensor, trace_source: bool) -> None:
    batch, tokens, _ = x.shape
    # sizes in float32 (float64 for float64 reference runs), whatever the features' dtype
    state.size = torch.ones(batch, tokens, 1, device=x.device, dtype=score_dtype(x[:0]).dtype)
    if trace_source:
        state.source = torch.eye(tokens, device=x.device, dtype=x.dtype)[None].expand(batch, tokens, tokens)


def _search_attention(attn: nn.Module, x: torch.Tensor, size: torch.Tensor, mask: torch.Tensor
                      ) -> Tuple[torch.Tensor, torch.Tensor]:
    """timm `Attention` with the search's masked softmax; x `[B, N, C]`, size `[B, N, 1]`, mask `[B, N]`.

    Returns (output `[B, N, C]`, class attention `[B, N]` = head mean of the attention row of
    the class token, after attention dropout as in the official code). The attention matrix is
    computed in float32 (the official masked softmax is float32; the logits here too).
    """
    batch, n, _ = x.shape
    qkv = attn.qkv(x).reshape(batch, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    with selection_precision(k):
        logits = (score_dtype(q) @ score_dtype(k).transpose(-2, -1)) * attn.scale + score_dtype(size).log()[:, None, None, :, 0]
        probabilities = attn.attn_drop(masked_softmax(logits, mask))
    out = (probabilities.to(v.dtype) @ v).transpose(1, 2).reshape(batch, n, attn.attn_dim)
    out = attn.norm(out)
    if getattr(attn, "gate", None) is not None:
        out = out * attn.gate(x).sigmoid()
    return attn.proj_drop(attn.proj(out)), probabilities[:, :, 0].mean(dim=1)


class DiffRateModelMixin:
    """Placed before the model's class: makes the per-forward `DiffRateState`, holds the schedule.

    Official API: `set_kept_num`, `get_kept_num`, `arch_parameters`, `calculate_flop_inference`,
    `calculate_flop_training`, `forward(x, return_flop=False)`.
    """

    # --- schedule -----------------------------------------------------------------
    def set_kept_num(self, prune_kept_num: Optional[Sequence[int]], merge_kept_num: Optional[Sequence[int]]) -> None:
        """Set the evaluation schedule (lists of length depth, class token counted); (None, None) clears it,
        after which evaluation uses the kept numbers the proxies encode."""
        cfg: DiffRateConfig = self._diffrate_cfg
        if prune_kept_num is None and merge_kept_num is None:
            cfg.schedule = None
            return
        cfg.schedule = validate_schedule(prune_kept_num, merge_kept_num, len(self.blocks), cfg.num_patches + 1)

    def get_kept_num(self) -> Tuple[List[int], List[int]]:
        """(prune, merge) kept numbers evaluation uses: the explicit schedule, else the proxies'."""
        schedule = self._diffrate_cfg.schedule
        if schedule is not None:
            return list(schedule[0]), list(schedule[1])
        return self.derived_kept_num()

    def derived_kept_num(self) -> Tuple[List[int], List[int]]:
        """The kept numbers `ceil(c . softmax(theta)) + 1` of the proxies, per block (block 0: all tokens)."""
        values = kept_numbers([b.prune_ddp for b in self.blocks] + [b.merge_ddp for b in self.blocks])
        depth = len(self.blocks)
        return values[:depth], values[depth:]

    def has_explicit_schedule(self) -> bool:
        return self._diffrate_cfg.schedule is not None

    def arch_parameters(self) -> List[nn.Parameter]:
        """The searched parameters: every proxy's `selected_probability` (2 per block)."""
        return [p for b in self.blocks for p in (b.prune_ddp.selected_probability, b.merge_ddp.selected_probability)]

    def set_flops_loss(self, target_gflops: Optional[float], weight: float = 5.0) -> None:
        """Search loss: with a target, a training forward returns `{"logits", "aux_loss", "gflops"}`
        where `aux_loss = weight * (F / 1e9 - target)^2` (F = `calculate_flop_training()`); None: logits."""
        cfg: DiffRateConfig = self._diffrate_cfg
        if target_gflops is not None and (isinstance(target_gflops, bool) or not isinstance(target_gflops, Real)
                                          or not target_gflops > 0):
            raise ModelConfigError(f"DiffRate target FLOPs must be a positive number of GFLOPs, got {target_gflops!r}.")
        cfg.flops_target = None if target_gflops is None else float(target_gflops)
        cfg.flops_weight = float(weight)

    # --- FLOPs --------------------------------------------------------------------
    def calculate_flop_inference(self) -> float:
        """Official FLOPs (MACs) of the evaluation schedule (`inference_flops`)."""
        prune, merge = self.get_kept_num()
        return inference_flops(self.embed_dim, self._diffrate_cfg.num_patches, _patch_area(self), self.num_classes,
                               prune, merge, getattr(self.patch_embed.proj, "in_channels", 3))

    def calculate_flop_training(self) -> torch.Tensor:
        """Official FLOPs (MACs) of the last training forward, a float32 tensor differentiable in the
        proxies (through `ste_min`: each block's kept numbers see their MLP and the next attention)."""
        kept = getattr(self, "_diffrate_last_kept", None)
        if kept is None:
            raise RuntimeError("calculate_flop_training() needs a training forward first (model.train(); model(x)).")
        return _training_flops(self, *kept)

    # --- forward ------------------------------------------------------------------
    def _diffrate_run(self, fn, *args, **kwargs):
        cfg: DiffRateConfig = self._diffrate_cfg
        slot = cfg.slot
        if slot.state is not None:  # nested call (forward -> forward_features)
            return fn(*args, **kwargs), slot.state
        if self.grad_checkpointing and torch.is_grad_enabled():
            raise ModelConfigError("DiffRate cannot run with gradient checkpointing (blocks re-run after the "
                                   "forward); call set_grad_checkpointing(False).")
        state = DiffRateState(training=self.training)
        if not self.training:
            prune, merge = self.get_kept_num()
            state.schedule = list(zip(prune, merge))
        outer = slot.open(state)
        try:
            out = fn(*args, **kwargs)
        finally:
            slot.close(outer)
        if state.training:
            self._diffrate_last_kept = (state.prune_kept, state.merge_kept)
        self._diffrate_info = {"size": state.size, "source": state.source, "tokens": list(state.tokens)}
        return out, state

    def forward(self, x: torch.Tensor, *args, return_flop: bool = False, **kwargs):
        logits, state = self._diffrate_run(super().forward, x, *args, **kwargs)
        if state.training:
            cfg: DiffRateConfig = self._diffrate_cfg
            if cfg.flops_target is None and not return_flop:
                return logits
            flops = _training_flops(self, state.prune_kept, state.merge_kept)
            if return_flop:
                return logits, flops
            gflops = flops / 1e9
            self._diffrate_info["gflops"] = gflops.detach()
            return {"logits": logits, "aux_loss": cfg.flops_weight * (gflops - cfg.flops_target) ** 2,
                    "gflops": gflops.detach()}
        if return_flop:
            return logits, self.calculate_flop_inference()
        return logits

    def forward_features(self, *args, **kwargs):
        return self._diffrate_run(super().forward_features, *args, **kwargs)[0]

    def forward_intermediates(self, x: torch.Tensor, *args, output_fmt: str = "NCHW", **kwargs):
        """timm's `forward_intermediates`; once tokens are removed only `output_fmt="NLC"` can hold them."""
        if output_fmt == "NCHW" and not self.training:
            prune, merge = self.get_kept_num()
            grid = self.patch_embed.dynamic_feat_size(x.shape[-2:])
            if min(tokens_per_block(prune, merge, grid[0] * grid[1] + 1)) < grid[0] * grid[1] + 1:
                raise ValueError("DiffRate removes tokens, so its intermediates do not fill the patch grid; "
                                 "pass output_fmt='NLC'.")
        return self._diffrate_run(super().forward_intermediates, x, *args, output_fmt=output_fmt, **kwargs)[0]


def _patch_area(model: nn.Module) -> int:
    size = model.patch_embed.patch_size
    return int(size[0]) * int(size[1])


def _training_flops(model: nn.Module, prune_kept: Sequence[torch.Tensor], merge_kept: Sequence[torch.Tensor]
                    ) -> torch.Tensor:
    """The official training FLOPs (float32, outside autocast): differentiable in the kept numbers."""
    c = model.embed_dim
    num_patches = model._diffrate_cfg.num_patches
    device = model.blocks[0].prune_ddp.selected_probability.device
    with torch.autocast(device_type=device.type, enabled=False):
        n = torch.tensor(float(num_patches + 1), device=device)
        patch_embedding = n * c * (_patch_area(model) * getattr(model.patch_embed.proj, "in_channels", 3))
        flops = 0
        for prune_num, merge_num in zip(prune_kept, merge_kept):
            flops += 4 * n * c * c + 2 * n * n * c
            n = ste_min(n, prune_num.float(), merge_num.float())
            flops += 8 * n * c * c
        flops += patch_embedding
        flops += c * model.num_classes
    return flops


# ---------------------------------------------------------------------------
# Patching
# ---------------------------------------------------------------------------

def is_patched(model: nn.Module) -> bool:
    return isinstance(model, DiffRateModelMixin)


def validate_schedule(prune_kept_num, merge_kept_num, depth: int, max_tokens: int) -> Schedule:
    """Both lists given, length `depth`, integers in [1, max_tokens], and a merge number >= 2 in every
    block that merges (a merge into the class token alone would divide by a -inf similarity)."""
    if prune_kept_num is None or merge_kept_num is None:
        raise ModelConfigError("DiffRate needs both prune_kept_num and merge_kept_num (or target_flops for a "
                               "shipped schedule).")
    lists = []
    for name, values in (("prune_kept_num", prune_kept_num), ("merge_kept_num", merge_kept_num)):
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
            raise ModelConfigError(f"DiffRate {name} must be a list of {depth} ints, got {values!r}.")
        values = list(values)
        if len(values) != depth:
            raise ModelConfigError(f"DiffRate {name} has {len(values)} entries for {depth} blocks; give one "
                                   f"kept number per block.")
        for value in values:
            if isinstance(value, bool) or not isinstance(value, Integral) or not 1 <= value <= max_tokens:
                raise ModelConfigError(f"DiffRate {name} entries must be ints in [1, {max_tokens}] (tokens kept, "
                                       f"class token included), got {value!r}.")
        lists.append(tuple(int(v) for v in values))
    n = max_tokens
    for block, (p, m) in enumerate(zip(*lists)):
        if m < min(n, p) and m < 2:
            raise ModelConfigError(f"DiffRate block {block} merges into {m} token (the class token alone); "
                                   f"merge numbers must be >= 2 where a block merges.")
        n = min(n, p, m)
    return lists[0], lists[1]


def _check_supported(model: nn.Module) -> None:
    if not isinstance(model, VisionTransformer):
        raise ModelConfigError(f"DiffRate supports timm VisionTransformer (DeiT/ViT) models, not "
                               f"{type(model).__name__}.")
    if (getattr(model, "cls_token", None) is None or model.global_pool != "token"
            or getattr(model, "num_prefix_tokens", 1) != 1):
        raise ModelConfigError("DiffRate needs a ViT with a class token, token pooling and no distillation or "
                               "register tokens (only the class token is protected from pruning and merging).")
    if getattr(model.patch_embed, "dynamic_img_size", False) or getattr(model, "dynamic_img_size", False):
        raise ModelConfigError("DiffRate needs a fixed patch grid (its candidates count the model's patches); "
                               "build the model without dynamic_img_size.")
    for index, block in enumerate(model.blocks):
        base = type(block).__dict__.get("_diffrate_base_class", type(block))
        if base is not Block:
            raise ModelConfigError(f"DiffRate patches timm's Block; block {index} is a {base.__name__} (models "
                                   f"already reduced by EViT, ToMe, LTM or shrink cannot be patched).")
        needed = ("qkv", "num_heads", "head_dim", "attn_dim", "proj", "q_norm", "k_norm", "norm")
        if not all(hasattr(block.attn, name) for name in needed):
            raise ModelConfigError(f"DiffRate needs timm's Attention layout; block {index}'s "
                                   f"{type(block.attn).__name__} is not.")


def patch(model: nn.Module, target_flops=None, prune_kept_num: Optional[Sequence[int]] = None,
          merge_kept_num: Optional[Sequence[int]] = None, granularity: int = 4, schedule_key: Optional[str] = None,
          trace_source: bool = False) -> nn.Module:
    """Apply DiffRate to `model` in place; returns the model.

    target_flops: a shipped schedule (GFLOPs key of `models/diffrate_schedules.json`, table
    `schedule_key`, inferred for 224-px DeiT-T/S/B); or prune_kept_num and merge_kept_num
    (lists of length depth, class token counted); or neither (evaluation uses the proxies'
    kept numbers). granularity: gap between the search's candidate kept numbers. Re-patching
    with the same granularity keeps the proxies' values.
    """
    if isinstance(granularity, bool) or not isinstance(granularity, Integral) or granularity < 1:
        raise ModelConfigError(f"DiffRate granularity must be an int >= 1 (gap between candidate kept numbers), "
                               f"got {granularity!r}.")
    if target_flops is not None and (prune_kept_num is not None or merge_kept_num is not None):
        raise ModelConfigError("DiffRate takes target_flops (a shipped schedule) or prune_kept_num/merge_kept_num, "
                               "not both.")
    _check_supported(model)
    depth = len(model.blocks)
    num_patches = int(model.patch_embed.num_patches)
    if target_flops is not None:
        key = schedule_key or schedule_key_of(model)
        if key is None:
            raise ModelConfigError(f"DiffRate's shipped schedules are for 224-px, 12-block DeiT-T/S/B; this model has "
                                   f"{depth} blocks and {num_patches} patches: give explicit kept numbers "
                                   f"(prune_kept_num/merge_kept_num, --diffrate-prune-kept/--diffrate-merge-kept).")
        prune_kept_num, merge_kept_num = shipped_schedule(key, target_flops)
    schedule = None
    if prune_kept_num is not None or merge_kept_num is not None:
        schedule = validate_schedule(prune_kept_num, merge_kept_num, depth, num_patches + 1)

    previous = model._diffrate_cfg if is_patched(model) else None
    slot = previous.slot if previous is not None else StateSlot()
    cfg = DiffRateConfig(granularity=int(granularity), trace_source=bool(trace_source), num_patches=num_patches,
                         schedule=schedule, slot=slot)
    if previous is not None:  # the search's loss settings are run state, not part of the schedule
        cfg.flops_target, cfg.flops_weight = previous.flops_target, previous.flops_weight
    for index, block in enumerate(model.blocks):
        if previous is None or previous.granularity != cfg.granularity or not hasattr(block, "prune_ddp"):
            ref = block.mlp.fc1.weight
            # block 0 is never compressed: one candidate, all patches (official non_compressed_block_index)
            step = num_patches + 1 if index == 0 else int(granularity)
            block.prune_ddp = DiffRateProxy(num_patches, step).to(ref.device)
            block.merge_ddp = DiffRateProxy(num_patches, step).to(ref.device)
        if type(block).__dict__.get("_diffrate_base_class") is None:
            block.__class__ = patched_class(DiffRateBlockMixin, type(block), "DiffRate")
        block._diffrate_cfg = cfg
        block._diffrate_index = index
    if not is_patched(model):
        model.__class__ = patched_class(DiffRateModelMixin, type(model), "DiffRate")
    model._diffrate_cfg = cfg
    model._diffrate_info = {"size": None, "source": None, "tokens": []}
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Undo `patch`: original classes back, proxies and patch attributes removed. No-op if not patched."""
    return restore_classes(model, "DiffRate", submodules=("prune_ddp", "merge_ddp"),
                           attributes=("_diffrate_cfg", "_diffrate_index", "_diffrate_info", "_diffrate_last_kept"))


# ---------------------------------------------------------------------------
# Registered models: the official names, timm DeiT + the patch
# ---------------------------------------------------------------------------

# the official main.py builds timm's pretrained DeiT and patches it: same weights
default_cfgs = generate_default_cfgs({
    "vit_deit_tiny_patch16_224.fb_in1k": deit_cfg("deit_tiny_patch16_224.fb_in1k"),
    "vit_deit_small_patch16_224.fb_in1k": deit_cfg("deit_small_patch16_224.fb_in1k"),
    "vit_deit_base_patch16_224.fb_in1k": deit_cfg("deit_base_patch16_224.fb_in1k"),
})


def checkpoint_filter(state_dict: dict, model: nn.Module) -> dict:
    """timm's ViT filter (official DeiT layouts), then the model's own proxies for the proxy keys a plain
    DeiT checkpoint lacks, so DeiT weights fine-tune or load into a DiffRate model."""
    state_dict = checkpoint_filter_fn(state_dict, model, adapt_layer_scale=True)
    own = model.state_dict()
    for key, value in own.items():
        if "_ddp." in key and key not in state_dict:
            state_dict[key] = value
    return state_dict


def _create_diffrate(variant: str, pretrained: bool = False, target_flops=None, load_compression_rate=None,
                     prune_kept_num=None, merge_kept_num=None, granularity: int = 4, schedule_key: Optional[str] = None,
                     trace_source: bool = False, **kwargs) -> VisionTransformer:
    """timm DeiT (`pretrained`: timm's DeiT weights) patched with DiffRate.

    target_flops: the shipped schedule to evaluate, unless `load_compression_rate=False` (main.py
    passes the flag's value: then `--target_flops` is only the search target, as officially).
    """
    if load_compression_rate is False:
        target_flops = None
    elif load_compression_rate and target_flops is None:
        target_flops = 3.0  # the official --target_flops default
    model = build_model_with_cfg(VisionTransformer, variant, pretrained,
                                 pretrained_filter_fn=functools.partial(checkpoint_filter_fn, adapt_layer_scale=True),
                                 **kwargs)
    return patch(model, target_flops=target_flops, prune_kept_num=prune_kept_num, merge_kept_num=merge_kept_num,
                 granularity=granularity, schedule_key=schedule_key or MODEL_SCHEDULE_KEYS.get(variant),
                 trace_source=trace_source)


@register_model
def vit_deit_tiny_patch16_224(pretrained: bool = False, **kwargs) -> VisionTransformer:
    model_args = dict(patch_size=16, embed_dim=192, depth=12, num_heads=3)
    return _create_diffrate("vit_deit_tiny_patch16_224", pretrained, **dict(model_args, **kwargs))


@register_model
def vit_deit_small_patch16_224(pretrained: bool = False, **kwargs) -> VisionTransformer:
    model_args = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6)
    return _create_diffrate("vit_deit_small_patch16_224", pretrained, **dict(model_args, **kwargs))


@register_model
def vit_deit_base_patch16_224(pretrained: bool = False, **kwargs) -> VisionTransformer:
    model_args = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12)
    return _create_diffrate("vit_deit_base_patch16_224", pretrained, **dict(model_args, **kwargs))


# ---------------------------------------------------------------------------
# Method families: the vit_deit_* models (evaluation and the search) and the patch for timm ViTs
# ---------------------------------------------------------------------------

import logging  # noqa: E402

from . import family as _family  # noqa: E402  (the declarations below are the module's public contract)
from .hooks import MethodHooks  # noqa: E402

_logger = logging.getLogger(__name__)

FLOPS_LOSS_WEIGHT = 5.0  # official lambda of (F / 1e9 - target)^2
LOG_KEPT_EVERY = 100  # official: kept numbers logged every 100 steps

# official flags the search does not use (its optimizer and schedule are the search's own, section 9)
_IGNORED_OFFICIAL_VALUE_FLAGS = ("--lr", "--min-lr", "--min_lr", "--warmup-lr", "--warmup_lr", "--warmup-epochs",
                                 "--warmup_epochs", "--sched", "--opt", "--opt-eps", "--opt_eps", "--momentum",
                                 "--weight-decay", "--weight_decay", "--port")
_WEIGHT_FLAGS = ("--resume", "--checkpoint", "--finetune", "--pretrained", "--auto-resume", "--auto_resume",
                 "--autoresume", "--model-kwargs", "--model_kwargs", "--cfg")


def _is_diffrate_model(model: nn.Module) -> bool:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return is_patched(model) and cfg.get("architecture") in MODEL_SCHEDULE_KEYS


def _official_model(argv: Sequence[str]) -> Optional[str]:
    for i, token in enumerate(argv):
        if token == "--model" and i + 1 < len(argv):
            return argv[i + 1]
        if token.startswith("--model="):
            return token.split("=", 1)[1]
    return None


def translate_official_argv(argv: List[str]) -> List[str]:
    """DiffRate's main.py flags in this project's spelling, for `vit_deit_*` models only.

    `--arch-lr X` -> `--lr X` and `--arch-min-lr X` -> `--min-lr X` (the search's AdamW and
    per-epoch cosine; the recipe makes `--lr` unscaled, without warm-up or weight decay); the
    official flags the search ignores (`--lr`, `--min-lr`, `--warmup-lr`, `--warmup-epochs`,
    `--sched`, `--opt`, `--opt-eps`, `--opt-betas`, `--momentum`, `--weight-decay`, `--port`)
    are dropped; `--autoresume` -> `--auto-resume`; and, as the official main.py always starts
    from timm's DeiT weights, `--pretrained` is added unless the line gives weights
    (`--resume`, `--finetune`, `--auto-resume`) or reshapes the model (`--model-kwargs`, `--cfg`).
    """
    argv = list(argv)
    if _official_model(argv) not in MODEL_SCHEDULE_KEYS:
        return argv
    names = [token.split("=", 1)[0] for token in argv]
    if not any(name in ("--arch-lr", "--arch_lr", "--arch-min-lr", "--arch_min_lr") for name in names) and \
            "--pretrained" in names and "--autoresume" not in names:
        return argv  # already translated
    out: List[str] = []
    lr = min_lr = None
    i = 0
    while i < len(argv):
        token = argv[i]
        name, has_value = token.split("=", 1)[0], "=" in token
        if name in ("--arch-lr", "--arch_lr", "--arch-min-lr", "--arch_min_lr") + _IGNORED_OFFICIAL_VALUE_FLAGS \
                + ("--opt-betas", "--opt_betas"):
            end = i + 1
            if not has_value:
                end = i + 2
                if name in ("--opt-betas", "--opt_betas"):  # nargs='+'
                    while end < len(argv) and not argv[end].startswith("--"):
                        end += 1
            value = token.split("=", 1)[1] if has_value else (argv[i + 1] if i + 1 < len(argv) else None)
            if name in ("--arch-lr", "--arch_lr"):
                lr = _learning_rate(name, value)
            elif name in ("--arch-min-lr", "--arch_min_lr"):
                min_lr = _learning_rate(name, value)
            i = end
            continue
        out.append("--auto-resume" if token == "--autoresume" else token)
        i += 1
    if lr is not None:
        out += ["--lr", lr]
    if min_lr is not None:
        out += ["--min-lr", min_lr]
    if not any(name in _WEIGHT_FLAGS for name in names):
        out.append("--pretrained")
    return out


def _learning_rate(flag: str, value: Optional[str]) -> str:
    try:
        ok = value is not None and float(value) >= 0
    except ValueError:
        ok = False
    if not ok:
        raise ModelConfigError(f"{flag} takes a learning rate >= 0, got {value!r}")
    return value


def _log_schedule(model: nn.Module, when: str) -> None:
    prune, merge = model.get_kept_num()
    source = "explicit schedule" if model.has_explicit_schedule() else "schedule of the proxies"
    _logger.info(f"DiffRate {when}: prune kept number {prune}; merge kept number {merge} ({source}); tokens after "
                 f"each block {tokens_per_block(prune, merge, model._diffrate_cfg.num_patches + 1)}; official FLOPs "
                 f"{model.calculate_flop_inference() / 1e9:.3f} G")


class DiffRateSearchHooks(MethodHooks):
    """The search of a `vit_deit_*` model (official recipe, docs/methods/diffrate.md "Search").

    The backbone is frozen (only the proxies' `selected_probability` train, in their own
    AdamW group without weight decay); the training forward returns the FLOPs loss
    `lambda (F / 1e9 - target)^2` as `aux_loss` (lambda 5, 0 during epoch 0 with
    `--warmup_compression_rate`); a schedule given for evaluation (`--load_compression_rate`)
    is dropped when the search starts, so evaluations during the search use the searched one.
    """

    def __init__(self, model: nn.Module, options=None):
        super().__init__(model, options)
        # before DDP wraps the model: only the proxies take part in the backward
        model.requires_grad_(False)
        for parameter in model.arch_parameters():
            parameter.requires_grad_(True)
        model.set_flops_loss(float(options.target_flops), FLOPS_LOSS_WEIGHT)
        self._started = False

    def param_groups(self, model, lrs):
        lr = self.options.arch_lr if self.options.arch_lr is not None else lrs[0]
        return [{"params": model.arch_parameters(), "lr": float(lr), "weight_decay": 0.0}]

    def prepare_eval(self, model):
        _log_schedule(model, "evaluation")

    def on_epoch_start(self, model, epoch):
        if not self._started and model.has_explicit_schedule():
            _logger.info("DiffRate search: the loaded schedule is replaced by the searched one")
            model.set_kept_num(None, None)
        self._started = True
        warm = bool(self.options.warmup_compression_rate) and epoch < 1
        model.set_flops_loss(float(self.options.target_flops), 0.0 if warm else FLOPS_LOSS_WEIGHT)

    def on_step_start(self, model, epoch, step, steps_per_epoch):
        if step % LOG_KEPT_EVERY == 0:
            prune, merge = model.get_kept_num()
            _logger.info(f"prune kept number:{prune}")
            _logger.info(f"merge kept number:{merge}")

    def log_state(self, model):
        info = getattr(model, "_diffrate_info", {}) or {}
        state = {}
        if info.get("gflops") is not None:
            state["diffrate_gflops"] = float(info["gflops"])
        if info.get("tokens"):
            state["diffrate_tokens"] = float(sum(info["tokens"])) / len(info["tokens"])
        return state

    def report(self, model, context):
        prune, merge = model.get_kept_num()
        return {"prune_kept_num": prune, "merge_kept_num": merge,
                "tokens_per_block": tokens_per_block(prune, merge, model._diffrate_cfg.num_patches + 1),
                "official_gflops": round(model.calculate_flop_inference() / 1e9, 3)}


def _search_hooks(model: nn.Module, options) -> Optional[MethodHooks]:
    return DiffRateSearchHooks(model, options) if is_patched(model) else None


def _check_model_options(options) -> None:
    target = options.target_flops
    if target is not None and not target > 0:
        raise ModelConfigError(f"--target_flops must be a positive number of GFLOPs, got {target}")
    if options.granularity is not None and options.granularity < 1:
        raise ModelConfigError(f"--granularity must be >= 1 (gap between candidate kept numbers), got "
                               f"{options.granularity}")
    for name in ("arch_lr", "arch_min_lr"):
        value = getattr(options, name)
        if value is not None and not value >= 0:
            raise ModelConfigError(f"--{name.replace('_', '-')} must be >= 0, got {value}")


_EXAMPLE_DIMS = {"embed_dim": 24, "num_heads": 2}  # the 224-px schedules need 196 patches and 12 blocks

FAMILY = _family.register_family(_family.MethodFamily(
    name="diffrate",
    title="DiffRate: searched prune-and-merge schedules (vit_deit_* models: evaluation and the search)",
    owns=_family.models_of(__name__),
    flags=(
        _family.Flag("--target_flops", type=float, default=3.0, kwarg="target_flops", metavar="GFLOPS",
                     help="search target in GFLOPs (official formula); with --load_compression_rate also the "
                          "shipped schedule evaluated (DeiT-T 0.6-1.0, DeiT-S 2.3-3.1, DeiT-B 8.7-12.5)"),
        _family.Flag("--load_compression_rate", action="store_true", default=False, kwarg="load_compression_rate",
                     help="evaluate the shipped schedule of --target_flops (models/diffrate_schedules.json)"),
        _family.Flag("--granularity", type=int, kwarg="granularity", metavar="G",
                     help="gap between the search's candidate kept numbers (model default 4)"),
        _family.Flag("--arch-lr", type=float, metavar="LR",
                     help="learning rate of the proxies (official 0.01; an official line's --arch-lr becomes --lr)"),
        _family.Flag("--arch-min-lr", type=float, metavar="LR",
                     help="cosine floor of the proxies' learning rate (official 0.001; becomes --min-lr)"),
        _family.Flag("--warmup_compression_rate", action="store_true", default=False,
                     help="no FLOPs loss during the first search epoch"),
        _family.Flag("--multi-reso", action="store_true", default=False,
                     help="accepted for official launch lines; no effect (as in the official code)"),
    ),
    check_options=_check_model_options,
    hooks=_search_hooks,
    recipe={"batch_size": 256, "lr": 0.01, "unscale_lr": True, "min_lr": 0.001, "warmup_epochs": 0,
            "weight_decay": 0.0, "model_ema": False, "dist_eval": True},
    translate_argv=translate_official_argv,
    checkpoint_filter_fn=checkpoint_filter,
    examples=(
        # 224 px and 12 blocks, as the shipped schedules need; narrow. Training runs the search (the
        # schedule is the evaluation's); the search forward reads its integer kept numbers from the
        # proxies at every step (data-dependent), so only evaluation compiles in one graph.
        _family.Example("diffrate_tiny", model="vit_deit_tiny_patch16_224", kwargs=dict(_EXAMPLE_DIMS),
                        flags=("--load_compression_rate", "--target_flops", "0.6"), input_size=224,
                        compile=("eval",)),
        # same code as the tiny example (other width tables): trained, not compiled again
        _family.Example("diffrate_small", model="vit_deit_small_patch16_224", kwargs=dict(_EXAMPLE_DIMS),
                        flags=("--load_compression_rate", "--target_flops", "2.9", "--warmup_compression_rate"),
                        input_size=224, compile=()),
        _family.Example("diffrate_base", model="vit_deit_base_patch16_224", kwargs=dict(_EXAMPLE_DIMS),
                        flags=("--target_flops", "11.5", "--granularity", "2"), input_size=224, compile=()),
    ),
))


# --- the patch family: a shipped or explicit schedule on any supported timm ViT ---------------

def _patch_active(options) -> bool:
    return any(value is not None for value in (options.diffrate_flops, options.diffrate_prune_kept,
                                               options.diffrate_merge_kept))


def _check_patch_options(options) -> None:
    if (options.diffrate_prune_kept is None) != (options.diffrate_merge_kept is None):
        raise ModelConfigError("--diffrate-prune-kept and --diffrate-merge-kept go together (one kept number per "
                               "block each)")
    if options.diffrate_flops is not None and options.diffrate_prune_kept is not None:
        raise ModelConfigError("give --diffrate-flops (a shipped schedule) or --diffrate-prune-kept/"
                               "--diffrate-merge-kept, not both")
    flops = options.diffrate_flops
    if flops is not None and flops != _family.AUTO and not flops > 0:
        raise ModelConfigError(f"--diffrate-flops must be a positive GFLOPs key such as 2.9, got {flops}")


def _apply_patch(model: nn.Module, options) -> None:
    granularity = model._diffrate_cfg.granularity if is_patched(model) else 4
    patch(model, target_flops=options.diffrate_flops, prune_kept_num=options.diffrate_prune_kept,
          merge_kept_num=options.diffrate_merge_kept, granularity=granularity)


class DiffRatePatchHooks(MethodHooks):
    """Evaluation only: the schedule is logged before `--eval`; training is refused (one line)."""

    def wrap_criterion(self, criterion, model):
        raise ModelConfigError("--diffrate-flops / --diffrate-prune-kept / --diffrate-merge-kept set an evaluation "
                               "schedule (--eval, benchmark.py); to search one, train a vit_deit_*_patch16_224 model "
                               "with --target_flops F")

    def prepare_eval(self, model):
        if not _is_diffrate_model(model):  # the model family logs its own
            _log_schedule(model, "evaluation")


def _search_shipped(build, target, gmacs_of):
    """--target-gmacs: the shipped schedule of the model's table whose fvcore GMACs are nearest the target."""
    key = schedule_key_of(build(None))
    if key is None:
        raise ModelConfigError("--diffrate-flops auto needs a model with shipped schedules (224-px DeiT-T/S/B)")
    measured = [(float(flops), gmacs_of(build(float(flops)))) for flops in load_schedules()[key]]
    return min(measured, key=lambda item: abs(item[1] - target))


PATCH_FAMILY = _family.register_family(_family.MethodFamily(
    name="diffrate_patch",
    title="DiffRate schedule on a timm ViT (a patch applied after the weights load; evaluation)",
    flags=(
        _family.Flag("--diffrate-flops", type=_family.auto_or(float), metavar="F",
                     help="patch the model with DiffRate's shipped schedule for F GFLOPs (224-px DeiT-T/S/B; "
                          "'auto' with --target-gmacs: the nearest shipped one); default: no DiffRate"),
        _family.Flag("--diffrate-prune-kept", type=_family.literal("int_list"), metavar="LIST",
                     help="explicit schedule: tokens kept after pruning in each block, class token included "
                          "(with --diffrate-merge-kept)"),
        _family.Flag("--diffrate-merge-kept", type=_family.literal("int_list"), metavar="LIST",
                     help="explicit schedule: tokens kept after merging in each block (with --diffrate-prune-kept)"),
    ),
    patch=_apply_patch,
    active=_patch_active,
    check_options=_check_patch_options,
    reduction=_family.Reduction("diffrate_flops", _search_shipped),
    hooks=lambda model, options: DiffRatePatchHooks(model, options),
    examples=(
        # evaluation only (training a fixed schedule is refused); 16 patches, 4 blocks
        _family.Example("diffrate_patch", model="deit_tiny_patch16_224",
                        kwargs={"depth": 4, "embed_dim": 32, "num_heads": 2, "patch_size": 8},
                        flags=("--diffrate-prune-kept", "[17,15,15,12]", "--diffrate-merge-kept", "[17,12,9,6]"),
                        input_size=32, train=False, compile=("eval",)),
    ),
))
