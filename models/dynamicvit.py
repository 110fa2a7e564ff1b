"""DynamicViT: "Efficient Vision Transformers with Dynamic Token Sparsification"
(Rao et al., NeurIPS 2021, arXiv 2106.02034).

A timm DeiT plus three small score predictors (`score_predictor.{0,1,2}`, `PredictorLG`)
placed before blocks 3, 6 and 9 (`pruning_loc`). Each predictor scores the patch tokens
that reach its location; the model keeps a fraction `rho, rho**2, rho**3` (`base_rate`) of
the original patches. Changes relative to timm's `VisionTransformer`:

* blocks are `DynamicViTBlock` (timm `Block`, same parameters): a block at a pruning
  location first runs its predictor. In eval it keeps the top-K patch tokens by keep
  log-probability, `K = int(num_patches * ratio)` (cls stays first, kept tokens in score
  order), then runs as timm's block on the shorter sequence. In training no token is removed:
  a straight-through Gumbel-softmax draws a 0/1 keep decision per token and every block
  (from block 0 on) runs the official eps-softmax attention masked by the current policy;
* `model(x)` in eval returns logits; in training it returns a dict with `logits`, `tokens`
  (final patch tokens after the norm), `decision` (the final keep decision, detached) and
  `masks` (the three hard masks `[B, N]`), which `DynamicViTLoss` consumes;
* per-forward state (policy, decisions, kept indices) lives in one `DynamicViTState` in a
  `StateSlot` shared with the blocks, so blocks keep timm's `Tensor -> Tensor` signature,
  forward hooks fire and timm's `forward_intermediates` works (`output_fmt="NLC"` once
  tokens are pruned);
* the predictors are fp32 islands (`keep_fp32`, autocast off): the keep scores are the same
  under bf16 as in fp32 up to their inputs.

State dict: timm DeiT's keys plus 30 predictor keys, identical to the official layout, so
official checkpoints load with `strict=True` and a plain DeiT checkpoint loads with exactly
the predictor keys missing. Differences from the official code (docs/methods/dynamicvit.md):
K is relative to the actual number of patches (official: hard-coded 196, so 224 px only);
a location that would keep every token skips its predictor and keeps the spatial order
(same logits up to rounding); gradient checkpointing is not supported.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from numbers import Integral, Real
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import Block, VisionTransformer, checkpoint_filter_fn
from torch import nn

from . import family
from .deit_cfgs import deit_cfg
from .errors import ModelConfigError
from .hooks import MethodHooks
from .launch_lines import split_items
from .token_ops import StateSlot, keep_topk_tokens, selection_precision

__all__ = [
    "PredictorLG", "DynamicViTBlock", "DynamicViT", "DynamicViTState", "DynamicViTLoss", "DeiTTeacher",
    "kept_token_mse", "load_checkpoint_state",
    "keep_ratios", "keep_counts", "policy_softmax", "policy_attention", "gumbel_keep_decision", "map_kept_to_patches",
]

_logger = logging.getLogger(__name__)

# The official training attention's smoothing constant (softmax_with_policy).
POLICY_EPS = 1e-6


# ---------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------

def keep_ratios(base_rate: float, num_locations: int) -> Tuple[float, ...]:
    """`(rho, rho**2, ...)` as Python floats, exactly as the official code forms them."""
    return tuple(base_rate ** (k + 1) for k in range(num_locations))


def keep_counts(ratios: Sequence[float], num_patches: int) -> Tuple[int, ...]:
    """Patch tokens kept at each location: `int(num_patches * ratio)`, each relative to the
    original patch count (not to the current length), truncated as the official code does."""
    return tuple(int(num_patches * ratio) for ratio in ratios)


class PredictorLG(nn.Module):
    """The official score predictor: local features plus the policy-weighted global mean.

    forward(x `[B, n, C]` patch tokens, policy `[B, n, 1]` 1 = active or None = all active)
    -> `[B, n, 2]` float32 log-probabilities (`[..., 0]` keep, `[..., 1]` drop). Submodule
    names and indices follow the official module (`in_conv.{0,1}`, `out_conv.{0,2,4}`);
    the LayerNorm has eps 1e-5 (PyTorch's default) unlike the backbone's 1e-6.
    """

    # engine.cast_for_inference leaves the predictors in fp32: they decide which tokens survive
    keep_fp32 = True

    def __init__(self, embed_dim: int = 384):
        super().__init__()
        self.in_conv = nn.Sequential(nn.LayerNorm(embed_dim), nn.Linear(embed_dim, embed_dim), nn.GELU())
        self.out_conv = nn.Sequential(
            nn.Linear(embed_dim, embed_dim // 2), nn.GELU(),
            nn.Linear(embed_dim // 2, embed_dim // 4), nn.GELU(),
            nn.Linear(embed_dim // 4, 2), nn.LogSoftmax(dim=-1))

    def forward(self, x: torch.Tensor, policy: Optional[torch.Tensor] = None) -> torch.Tensor:
        with selection_precision(x):
            h = self.in_conv(x.to(self.in_conv[1].weight.dtype))
            batch, n, channels = h.shape
            half = channels // 2
            local, rest = h[..., :half], h[..., half:]
            if policy is None:
                global_x = rest.sum(dim=1, keepdim=True) / n
            else:
                policy = policy.to(h.dtype)
                # unguarded as in the official code: a sample with no active token gives NaN
                global_x = (rest * policy).sum(dim=1, keepdim=True) / policy.sum(dim=1, keepdim=True)
            z = torch.cat([local, global_x.expand(batch, n, half)], dim=-1)
            return self.out_conv(z)


def gumbel_keep_decision(log_probs: torch.Tensor, decision: Optional[torch.Tensor]) -> torch.Tensor:
    """Training decision: `gumbel_softmax(log_probs, hard=True)[..., 0:1] * decision`.

    log_probs `[B, n, 2]`, decision `[B, n, 1]` (None = all ones) -> `[B, n, 1]` exact 0/1 values
    with the straight-through gradient of the soft sample; a dropped token stays dropped.
    """
    hard = F.gumbel_softmax(log_probs, hard=True)[..., 0:1]
    return hard if decision is None else hard * decision


def policy_softmax(logits: torch.Tensor, policy: Optional[torch.Tensor], eps: float = POLICY_EPS) -> torch.Tensor:
    """The official training attention weights (`softmax_with_policy`).

    logits `[B, H, N, N]` = `(q k^T) * scale`; policy `[B, N, 1]` key mask (1 active, 0 dropped;
    the class token is always 1) or None (all active). `M = m + (1 - m) I` (a dropped token may
    attend to itself), `e = exp(a - max_j a) * M` (max over all keys, masked ones included; exp
    in float32 even under autocast), `A = (e + eps / N) / (sum_j e + eps)`. Returns `A` in the
    dtype of `logits`: active queries see active keys plus a uniform `eps / N` leak.
    """
    batch, _, _, n = logits.shape
    shifted = logits - logits.amax(dim=-1, keepdim=True)
    e = shifted.float().exp()
    if policy is not None:
        keys = policy.reshape(batch, 1, 1, n).float()
        eye = torch.eye(n, dtype=e.dtype, device=e.device).view(1, 1, n, n)
        e = e * (keys + (1.0 - keys) * eye)
    return ((e + eps / n) / (e.sum(dim=-1, keepdim=True) + eps)).to(logits.dtype)


def policy_attention(attn, x: torch.Tensor, policy: Optional[torch.Tensor], eps: float = POLICY_EPS) -> torch.Tensor:
    """A timm `Attention` forward with the official training weights (`policy_softmax`).

    x `[B, N, C]` the block's `norm1(x)`; policy `[B, N, 1]` or None. Returns `[B, N, C]` after
    `proj` / `proj_drop`; attention dropout is not applied (the official module never does).
    """
    batch, n, _ = x.shape
    qkv = attn.qkv(x).reshape(batch, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    weights = policy_softmax((q @ k.transpose(-2, -1)) * attn.scale, policy, eps)
    out = attn.norm((weights @ v).transpose(1, 2).reshape(batch, n, attn.attn_dim))
    if getattr(attn, "gate", None) is not None:
        out = out * attn.gate(x).sigmoid()
    return attn.proj_drop(attn.proj(out))


def map_kept_to_patches(kept: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """Original patch ids kept at each location.

    kept: per location `[B, K_p]` indices into the patch tokens present at that location (which
    the previous locations reordered by score). Returns per location `[B, K_p]` original ids in
    the model's token order (descending keep score).
    """
    ids: List[torch.Tensor] = []
    current: Optional[torch.Tensor] = None
    for idx in kept:
        current = idx if current is None else current.gather(1, idx)
        ids.append(current)
    return ids


# ---------------------------------------------------------------------------
# Per-forward state and the block
# ---------------------------------------------------------------------------

@dataclass
class DynamicViTState:
    """One forward: mode, ratios, the running policy and what was kept or masked.

    num_patches: patch tokens of the input grid (K counts are relative to it);
    policy `[B, N + 1, 1]` / decision `[B, N, 1]`: training keep masks (None = all ones);
    masks: the training hard masks `[B, N]` in location order; kept: eval `[B, K]` indices
    into the tokens present at each location; counts: the eval K of each location that pruned.
    """
    training: bool
    num_patches: int
    ratios: Tuple[float, ...]
    predictors: nn.ModuleList
    policy: Optional[torch.Tensor] = None
    decision: Optional[torch.Tensor] = None
    masks: List[torch.Tensor] = field(default_factory=list)
    kept: List[torch.Tensor] = field(default_factory=list)
    counts: List[int] = field(default_factory=list)


class DynamicViTBlock(Block):
    """timm `Block` that may first prune (eval) or mask (training) its input tokens.

    Modifications relative to timm's Block (its `Tensor -> Tensor` forward is kept):

    * `location` is the index of this block's predictor (None: not a pruning location);
    * outside a DynamicViT forward (no state) or with an attention mask it is timm's block;
    * eval: at a location, keep the top-K patch tokens by the predictor's keep log-probability,
      then timm's attention (fused SDPA) on the shorter sequence;
    * training: at a location, draw the Gumbel keep decision; every block then runs
      `policy_attention` with the current policy (the official training attention).
    """

    def __init__(self, *args, location_of: Optional[Dict[int, int]] = None, depth: int = 0,
                 state_slot: Optional[StateSlot] = None, **kwargs):
        super().__init__(*args, depth=depth, **kwargs)
        self.block_index = depth
        self.location = (location_of or {}).get(depth)
        self._state_slot = state_slot

    def _select(self, x: torch.Tensor, state: DynamicViTState) -> torch.Tensor:
        """Eval pruning before the block: x `[B, 1 + n, C]` -> `[B, 1 + K, C]`."""
        n = x.shape[1] - 1
        keep = keep_counts(state.ratios[self.location:self.location + 1], state.num_patches)[0]
        if keep >= n:  # nothing to drop (the official code would only reorder by score)
            return x
        if keep < 1:
            raise ValueError(f"DynamicViT keeps {keep} of {state.num_patches} patches at location {self.location}; "
                             f"raise base_rate / token_ratio or use a larger input.")
        scores = state.predictors[self.location](x[:, 1:])[..., 0]
        x, idx = keep_topk_tokens(x, scores, keep, num_prefix=1)
        state.kept.append(idx)
        state.counts.append(keep)
        return x

    def _mask(self, x: torch.Tensor, state: DynamicViTState) -> None:
        """Training decision at this location (tokens stay; the policy changes)."""
        log_probs = state.predictors[self.location](x[:, 1:], state.decision)
        decision = gumbel_keep_decision(log_probs, state.decision)
        state.masks.append(decision.reshape(x.shape[0], -1))
        state.decision = decision
        cls_policy = torch.ones(x.shape[0], 1, 1, dtype=decision.dtype, device=decision.device)
        state.policy = torch.cat([cls_policy, decision], dim=1)

    def forward(self, x: torch.Tensor, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
        state = self._state_slot.state if self._state_slot is not None else None
        if state is None or attn_mask is not None or is_causal:
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        if not state.training:
            if self.location is not None:
                x = self._select(x, state)
            return super().forward(x)
        if self.location is not None:
            self._mask(x, state)
        x = x + self.drop_path1(self.ls1(policy_attention(self.attn, self.norm1(x), state.policy)))
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x


# ---------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------

def _check_rate(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not 0 < value <= 1:
        raise ModelConfigError(f"DynamicViT {name} must be in (0, 1], got {value!r}; e.g. {name}=0.7.")
    return float(value)


def _check_locations(pruning_loc, depth: int) -> Tuple[int, ...]:
    locs = (pruning_loc,) if isinstance(pruning_loc, Integral) else tuple(pruning_loc)
    if not locs:
        raise ModelConfigError("DynamicViT pruning_loc is empty; give at least one block index, e.g. (3, 6, 9).")
    for loc in locs:
        if isinstance(loc, bool) or not isinstance(loc, Integral) or not 0 <= loc < depth:
            raise ModelConfigError(f"DynamicViT pruning_loc entry {loc!r} is outside blocks 0..{depth - 1}; "
                                   f"e.g. pruning_loc=(3, 6, 9).")
    if any(b <= a for a, b in zip(locs, locs[1:])):
        raise ModelConfigError(f"DynamicViT pruning_loc {locs} must be strictly increasing, e.g. (3, 6, 9).")
    return tuple(int(loc) for loc in locs)


class DynamicViT(VisionTransformer):
    """DeiT with DynamicViT's score predictors (see the module docstring).

    Kwargs beyond timm's: `base_rate` (rho, 0.7 = the released checkpoints), `pruning_loc`
    (block indices, pruning happens before each), `token_ratio` (explicit keep fractions of the
    original patches, one per location; default `rho, rho**2, ...`).
    """

    def __init__(self, *args, base_rate: float = 0.7, pruning_loc: Sequence[int] = (3, 6, 9),
                 token_ratio: Optional[Sequence[float]] = None, depth: int = 12, embed_dim: int = 768,
                 **kwargs):
        locs = _check_locations(pruning_loc, depth)
        base_rate = _check_rate(base_rate, "base_rate")
        if token_ratio is None:
            ratios = keep_ratios(base_rate, len(locs))
        else:
            ratios = (token_ratio,) if isinstance(token_ratio, Real) else tuple(token_ratio)
            if len(ratios) != len(locs):
                raise ModelConfigError(f"DynamicViT token_ratio has {len(ratios)} entries for {len(locs)} pruning "
                                       f"locations; give one keep fraction per location.")
            ratios = tuple(_check_rate(r, "token_ratio entry") for r in ratios)
        slot = StateSlot()
        kwargs.setdefault("block_fn", partial(DynamicViTBlock, location_of={loc: p for p, loc in enumerate(locs)},
                                              state_slot=slot))
        super().__init__(*args, depth=depth, embed_dim=embed_dim, **kwargs)
        if self.cls_token is None or self.global_pool != "token" or self.num_prefix_tokens != 1:
            raise ModelConfigError("DynamicViT needs exactly one class token and token pooling; drop "
                                   "class_token / global_pool / reg_tokens overrides.")
        self._state_slot = slot
        self.base_rate = base_rate
        self.pruning_loc = locs
        self.token_ratio = ratios
        self.score_predictor = nn.ModuleList([PredictorLG(embed_dim) for _ in locs])
        self.score_predictor.apply(_init_predictor)
        num_patches = getattr(self.patch_embed, "num_patches", None)
        if isinstance(num_patches, Integral):
            low = min(keep_counts(ratios, num_patches))
            if low < 1:
                raise ModelConfigError(f"DynamicViT keeps {low} of {num_patches} patches at its last location; "
                                       f"raise base_rate / token_ratio (e.g. base_rate=0.7).")

    def keep_counts(self, num_patches: Optional[int] = None) -> Tuple[int, ...]:
        """Eval K of each location for `num_patches` patches (default: the model's grid)."""
        return keep_counts(self.token_ratio, num_patches or self.patch_embed.num_patches)

    def _grid_tokens(self, images: torch.Tensor) -> int:
        return math.prod(self.patch_embed.dynamic_feat_size(images.shape[-2:]))

    @contextmanager
    def _forward_state(self, images: torch.Tensor) -> Iterator[DynamicViTState]:
        """This call's DynamicViTState, visible to the blocks until the outermost forward returns."""
        slot = self._state_slot
        if slot.state is not None:  # nested call (forward -> forward_features)
            yield slot.state
            return
        if self.grad_checkpointing and torch.is_grad_enabled():
            # re-run blocks would see no state (and draw new Gumbel noise)
            raise ValueError("DynamicViT does not support gradient checkpointing; call set_grad_checkpointing(False).")
        state = DynamicViTState(self.training, self._grid_tokens(images), self.token_ratio, self.score_predictor)
        outer = slot.open(state)
        try:
            yield state
        finally:
            slot.close(outer)

    def forward_features(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        with self._forward_state(x):
            return super().forward_features(x, **kwargs)

    def forward_intermediates(self, x: torch.Tensor, *args, output_fmt: str = "NCHW", **kwargs):
        """timm's `forward_intermediates`; once tokens are pruned (eval) only `output_fmt="NLC"` holds them."""
        with self._forward_state(x) as state:
            if output_fmt == "NCHW" and not state.training and \
                    min(keep_counts(self.token_ratio, state.num_patches)) < state.num_patches:
                raise ValueError("DynamicViT prunes tokens in eval, so its intermediates do not fill the patch "
                                 "grid; pass output_fmt='NLC'.")
            return super().forward_intermediates(x, *args, output_fmt=output_fmt, **kwargs)

    def forward(self, x: torch.Tensor):
        with self._forward_state(x) as state:
            features = self.forward_features(x)
            logits = self.forward_head(features)
            if not state.training:
                return logits
            decision = state.decision
            if decision is None:
                decision = torch.ones(features.shape[0], features.shape[1] - 1, 1, device=x.device)
            return {"logits": logits, "tokens": features[:, 1:], "decision": decision.detach(),
                    "masks": list(state.masks)}

    def forward_kept(self, x: torch.Tensor) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """Eval forward that also returns, per location that pruned, the kept original patch ids
        `[B, K]` in the model's token order (descending keep score)."""
        if self.training:
            raise ValueError("forward_kept is an eval forward; call model.eval() first.")
        with self._forward_state(x) as state:
            logits = self.forward_head(self.forward_features(x))
            return logits, map_kept_to_patches(state.kept)


def _init_predictor(module: nn.Module) -> None:
    # official init: trunc-normal 0.02 Linear weights, zero biases (LayerNorms keep 1 / 0)
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


# ---------------------------------------------------------------------------
# Teacher and losses (official losses.py `DistillDiffPruningLoss_dynamic`)
# ---------------------------------------------------------------------------

class DeiTTeacher(nn.Module):
    """The official `VisionTransformerTeacher`: a plain DeiT, frozen and always in eval mode.

    forward(x) -> (logits `[B, classes]`, final patch tokens after the norm `[B, N, C]`).
    """

    def __init__(self, vit: VisionTransformer):
        super().__init__()
        self.vit = vit
        self.vit.eval()
        for p in self.vit.parameters():
            p.requires_grad_(False)

    @classmethod
    def like(cls, student: DynamicViT, state_dict: Optional[Dict[str, torch.Tensor]] = None) -> "DeiTTeacher":
        """A teacher with the student's backbone architecture; `state_dict` (DeiT keys) loads strictly."""
        attn = student.blocks[0].attn
        vit = VisionTransformer(
            img_size=student.patch_embed.img_size, patch_size=student.patch_embed.patch_size,
            embed_dim=student.embed_dim, depth=len(student.blocks), num_heads=attn.num_heads,
            mlp_ratio=student.blocks[0].mlp.fc1.out_features / student.embed_dim,
            qkv_bias=attn.qkv.bias is not None, num_classes=student.num_classes)
        if state_dict is not None:
            state = {k: v for k, v in state_dict.items() if not k.startswith("score_predictor.")}
            own = vit.state_dict()
            missing = [k for k in own if k not in state]
            unexpected = [k for k in state if k not in own]
            resized = [k for k in own if k in state and state[k].shape != own[k].shape]
            if missing or unexpected or resized:
                raise ModelConfigError(f"DynamicViT teacher checkpoint does not fit a DeiT of the student's size: "
                                       f"missing {_short(missing)}; unexpected {_short(unexpected)}; "
                                       f"other shape {_short(resized)}")
            vit.load_state_dict(state, strict=True)
        vit.to(device=student.cls_token.device)
        return cls(vit)

    def train(self, mode: bool = True) -> "DeiTTeacher":
        return super().train(False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        features = self.vit.forward_features(x)
        return self.vit.forward_head(features), features[:, 1:]


def _short(keys: Sequence[str], shown: int = 5) -> str:
    keys = list(keys)
    return (", ".join(keys[:shown]) + (f" (+{len(keys) - shown} more)" if len(keys) > shown else "")) or "none"


def load_checkpoint_state(path: str) -> Dict[str, torch.Tensor]:
    """The state dict of a checkpoint file: its `'model'` entry, else the file itself.

    Read with `weights_only=True`; an `argparse.Namespace` under `'args'` (as the official
    trainers save) is allowed, nothing else is unpickled.
    """
    if not os.path.isfile(path):
        raise ModelConfigError(f"DynamicViT: no checkpoint file at {path}; pass the DeiT weights with --teacher-path "
                               f"(the official recipe reads ./pretrained/deit_*_patch16_224-*.pth)")
    with torch.serialization.safe_globals([argparse.Namespace]):
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("model"), dict):
        checkpoint = checkpoint["model"]
    if not isinstance(checkpoint, dict) or not all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        raise ModelConfigError(f"DynamicViT: {path} holds no state dict (expected a 'model' entry or a bare state dict)")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in checkpoint.items()}


class DynamicViTLoss(nn.Module):
    """The official DynamicViT objective on the training outputs of `DynamicViT`.

    `loss = clf_weight * cls + ratio_weight * ratio / ratio_divisor + distill_weight * (cls_kl + token)`:

    * cls = `base_criterion(samples, logits, targets)` (the trainer's criterion: soft-target CE
      with mixup);
    * ratio = sum over locations of `mean_b((mean_n masks[k][b, n] - keep_ratios[k]) ** 2)`
      (hard 0/1 masks, straight-through gradients), divided by 3 as the official loss does
      whatever the number of locations;
    * cls_kl = `KL(p_teacher || p_student)`, batch mean, T = 1;
    * token = mean squared error between the student's and the teacher's final patch tokens over
      the rows the final decision keeps (pooled over the batch; 0 when no row is kept).

    Without a teacher (`distill_weight == 0`) it is the official `DiffPruningLoss`
    (cls + ratio term). The parts of the last call are kept in `last_parts` (detached).
    Outputs that are not the training dict (a model evaluated in eval mode) get `base_criterion` only.
    """

    def __init__(self, base_criterion: nn.Module, teacher: Optional[nn.Module], keep_ratios: Sequence[float],
                 ratio_weight: float = 2.0, distill_weight: float = 0.5, clf_weight: float = 1.0,
                 ratio_divisor: float = 3.0):
        super().__init__()
        self.base_criterion = base_criterion
        self.teacher = teacher
        self.keep_ratios = tuple(float(r) for r in keep_ratios)
        self.ratio_weight = float(ratio_weight)
        self.distill_weight = float(distill_weight)
        self.clf_weight = float(clf_weight)
        self.ratio_divisor = float(ratio_divisor)
        self.last_parts: Dict[str, torch.Tensor] = {}

    def forward(self, samples: torch.Tensor, outputs: Any, targets: torch.Tensor) -> torch.Tensor:
        if not isinstance(outputs, dict) or "masks" not in outputs:
            return self.base_criterion(samples, outputs, targets)
        logits, masks = outputs["logits"], outputs["masks"]
        ratio_loss = logits.new_zeros(())
        for k, mask in enumerate(masks):
            ratio_loss = ratio_loss + ((mask.float().mean(dim=1) - self.keep_ratios[k]) ** 2).mean()
        cls_loss = self.base_criterion(samples, logits, targets)
        loss = self.clf_weight * cls_loss + self.ratio_weight * ratio_loss / self.ratio_divisor
        parts = {"cls_loss": cls_loss, "ratio_loss": ratio_loss}
        if self.teacher is not None and self.distill_weight:
            teacher_logits, teacher_tokens = self.teacher(samples)
            cls_kl = F.kl_div(F.log_softmax(logits, dim=-1), F.log_softmax(teacher_logits.float(), dim=-1),
                              reduction="batchmean", log_target=True)
            token_loss = kept_token_mse(outputs["tokens"], teacher_tokens.float(), outputs["decision"])
            loss = loss + self.distill_weight * cls_kl + self.distill_weight * token_loss
            parts.update(cls_kl=cls_kl, token_kl=token_loss)
        for k, mask in enumerate(masks):
            parts[f"keep_{k}"] = mask.float().mean()
        self.last_parts = {name: value.detach() for name, value in parts.items()}
        return loss


def kept_token_mse(tokens: torch.Tensor, teacher_tokens: torch.Tensor, decision: torch.Tensor) -> torch.Tensor:
    """Mean over the kept rows (decision > 0.5, pooled over the batch) and all channels of the
    squared difference; 0 when the decision keeps nothing (official: a batch with `mask.sum() < 0.1`).

    tokens, teacher_tokens `[B, N, C]`; decision `[B, N, 1]` (or `[B, N]`).
    """
    keep = (decision.reshape(tokens.shape[0], tokens.shape[1], 1) > 0.5).to(tokens.dtype)
    squared = ((tokens - teacher_tokens) ** 2 * keep).sum()
    return squared / (keep.sum() * tokens.shape[-1]).clamp_min(1.0)


# ---------------------------------------------------------------------------
# Registration
# ---------------------------------------------------------------------------

# no hub weights: the released checkpoints are loaded from files (--model_path / --resume)
default_cfgs = generate_default_cfgs({
    "dynamicvit_deit_tiny_patch16_224": deit_cfg(),
    "dynamicvit_deit_256_patch16_224": deit_cfg(),
    "dynamicvit_deit_small_patch16_224": deit_cfg(),
    "dynamicvit_deit_base_patch16_224": deit_cfg(),
})


def _create_dynamicvit(variant: str, pretrained: bool = False, **kwargs) -> DynamicViT:
    return build_model_with_cfg(
        DynamicViT, variant, pretrained,
        pretrained_filter_fn=partial(checkpoint_filter_fn, adapt_layer_scale=True),
        **kwargs,
    )


@register_model
def dynamicvit_deit_tiny_patch16_224(pretrained: bool = False, **kwargs) -> DynamicViT:
    model_args = dict(patch_size=16, embed_dim=192, depth=12, num_heads=3)
    return _create_dynamicvit("dynamicvit_deit_tiny_patch16_224", pretrained, **dict(model_args, **kwargs))


@register_model
def dynamicvit_deit_256_patch16_224(pretrained: bool = False, **kwargs) -> DynamicViT:
    model_args = dict(patch_size=16, embed_dim=256, depth=12, num_heads=4)
    return _create_dynamicvit("dynamicvit_deit_256_patch16_224", pretrained, **dict(model_args, **kwargs))


@register_model
def dynamicvit_deit_small_patch16_224(pretrained: bool = False, **kwargs) -> DynamicViT:
    model_args = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6)
    return _create_dynamicvit("dynamicvit_deit_small_patch16_224", pretrained, **dict(model_args, **kwargs))


@register_model
def dynamicvit_deit_base_patch16_224(pretrained: bool = False, **kwargs) -> DynamicViT:
    model_args = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12)
    return _create_dynamicvit("dynamicvit_deit_base_patch16_224", pretrained, **dict(model_args, **kwargs))


# ---------------------------------------------------------------------------
# Official recipe: parameter groups, backbone freeze, teacher, logging (hooks)
# ---------------------------------------------------------------------------

# Official launch names: HEAD `--model` (README model zoo) and the 2021 `--arch`.
OFFICIAL_NAMES = {
    "deit-s": "dynamicvit_deit_small_patch16_224", "deit-256": "dynamicvit_deit_256_patch16_224",
    "deit-b": "dynamicvit_deit_base_patch16_224", "deit_small": "dynamicvit_deit_small_patch16_224",
    "deit_256": "dynamicvit_deit_256_patch16_224", "deit_base": "dynamicvit_deit_base_patch16_224",
}
# The DeiT weights the official trainer reads for both the student's backbone and the teacher, relative
# to the working directory (DeiT-256 has no training branch and no official DeiT weights).
DEIT_WEIGHTS = {
    192: "./pretrained/deit_tiny_patch16_224-a1311bcf.pth",
    384: "./pretrained/deit_small_patch16_224-cd65a155.pth",
    768: "./pretrained/deit_base_patch16_224-b5f2ef4d.pth",
}
_ROLE = "dynamicvit"  # optimizer group key: "predictor" or "backbone" (kept in optimizer checkpoints)


def official_param_groups(model: DynamicViT, weight_decay: float, backbone_scale: float) -> List[dict]:
    """The official optimizer groups (optim_factory.get_parameter_groups).

    `cls_token` and `pos_embed` are left out (frozen: they also stop requiring gradients);
    parameters whose name contains "predictor" train at the full lr, all others (the backbone and
    the head) at `lr_scale = backbone_scale`; weight decay on >= 2-D weights, none on biases and
    1-D parameters. Predictor groups come first (the trainer logs group 0's lr).
    """
    buckets: Dict[Tuple[str, bool], List[torch.Tensor]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name in ("cls_token", "pos_embed"):
            param.requires_grad_(False)
            continue
        role = "predictor" if "predictor" in name else "backbone"
        decay = not (param.ndim == 1 or name.endswith(".bias"))
        buckets.setdefault((role, decay), []).append(param)
    groups = []
    for role in ("predictor", "backbone"):
        for decay in (True, False):
            params = buckets.get((role, decay))
            if params:
                groups.append({"params": params, "weight_decay": weight_decay if decay else 0.0,
                               "lr_scale": 1.0 if role == "predictor" else backbone_scale, _ROLE: role})
    return groups


class DynamicViTHooks(MethodHooks):
    """DynamicViT's training recipe (HEAD main.py of the official code).

    * criterion: `DynamicViTLoss` around the trainer's criterion, with a DeiT teacher read from
      `--teacher-path` (official default: `./pretrained/deit_{tiny,small,base}_patch16_224-*.pth`)
      unless `--distillw 0`;
    * optimizer groups: `official_param_groups`; the backbone groups run at lr 0 for the first
      `--backbone_freeze_epochs` epochs, then at `--lr_scale` times the scheduled lr, set before
      each optimizer step on the groups this family made (tagged in the group dict, so it
      survives a resumed optimizer state);
    * progress lines: the kept fraction at each location and the loss parts.
    """

    def __init__(self, model: DynamicViT, options):
        super().__init__(model, options)
        self.loss: Optional[DynamicViTLoss] = None
        self.epoch = 0
        self.backbone_scale = float(options.lr_scale)
        self.freeze_epochs = int(options.backbone_freeze_epochs)

    def wrap_criterion(self, criterion: nn.Module, model: nn.Module) -> nn.Module:
        distill_weight = float(self.options.distillw)
        teacher = None
        if distill_weight > 0:
            path = self.options.dynamicvit_teacher or DEIT_WEIGHTS.get(model.embed_dim)
            if path is None:
                raise ModelConfigError(f"DynamicViT: no official DeiT weights for a {model.embed_dim}-dim student; "
                                       f"pass --teacher-path FILE (a DeiT checkpoint of its size) or --distillw 0")
            teacher = DeiTTeacher.like(model, load_checkpoint_state(path))
            _logger.info("DynamicViT teacher: DeiT weights from %s", path)
        self.loss = DynamicViTLoss(criterion, teacher, model.token_ratio, ratio_weight=float(self.options.ratio_weight),
                                   distill_weight=distill_weight)
        return self.loss

    def param_groups(self, model: nn.Module, lrs: List[float]) -> Optional[list]:
        if len(lrs) != 1:
            raise ModelConfigError(f"--lr takes one value for DynamicViT, got {len(lrs)}")
        return official_param_groups(model, float(self.options.weight_decay or 0.0),
                                     0.0 if self.freeze_epochs > 0 else self.backbone_scale)

    def before_optimizer_step(self, model: nn.Module, optimizer) -> None:
        self.set_backbone_lr(optimizer.param_groups)

    def set_backbone_lr(self, groups: Sequence[dict]) -> None:
        """Backbone lr = scheduled lr (the predictor groups' lr) x 0 while frozen, else x --lr_scale."""
        lead = next((g for g in groups if g.get(_ROLE) == "predictor"), None)
        if lead is None:
            return
        scheduled = lead["lr"] / lead.get("lr_scale", 1.0)
        scale = 0.0 if self.epoch < self.freeze_epochs else self.backbone_scale
        for group in groups:
            if group.get(_ROLE) == "backbone":
                group["lr_scale"] = scale
                group["lr"] = scheduled * scale

    def on_epoch_start(self, model, epoch):
        self.epoch = epoch

    def on_step_start(self, model, epoch, step, steps_per_epoch):
        self.epoch = epoch

    def log_state(self, model) -> Dict[str, float]:
        parts = self.loss.last_parts if self.loss is not None else {}
        state = {}
        for k, loc in enumerate(getattr(model, "pruning_loc", ())):
            if f"keep_{k}" in parts:
                state[f"keep_b{loc}"] = float(parts[f"keep_{k}"])
        for name in ("ratio_loss", "cls_kl", "token_kl"):
            if name in parts:
                state[name] = float(parts[name])
        return state



def _family_hooks(model, options) -> Optional[DynamicViTHooks]:
    return DynamicViTHooks(model, options) if isinstance(model, DynamicViT) else None


def _checkpoint_filter(state_dict: Dict[str, torch.Tensor], model: DynamicViT) -> Dict[str, torch.Tensor]:
    """timm's ViT filter, then the predictor keys a DeiT checkpoint lacks keep their initialisation
    (how the official training starts: DeiT weights loaded non-strictly into the student)."""
    state_dict = dict(checkpoint_filter_fn(state_dict, model))
    own = model.state_dict()
    missing = [k for k in own if k.startswith("score_predictor.") and k not in state_dict]
    if missing:
        _logger.info("DynamicViT: %d score-predictor keys are not in the checkpoint and keep their "
                     "initialisation (a DeiT checkpoint, as the official training starts)", len(missing))
        state_dict.update({k: own[k] for k in missing})
    return state_dict


# ---------------------------------------------------------------------------
# Official launch lines (infer.py, HEAD main.py, 2021 main_dynamic_vit.py) -> this project's flags
# ---------------------------------------------------------------------------

_TRUE = ("true", "t", "yes", "y", "1")
_FALSE = ("false", "f", "no", "n", "0")
_KEEP = "keep"  # no project equivalent: the option is left for argparse to refuse in one line
# official boolean-valued options -> (flag when true, flag when false); None = nothing
_BOOL_OPTIONS = {
    "--eval": ("--eval", None), "--dist_eval": ("--dist-eval", None), "--dist-eval": ("--dist-eval", None),
    "--model_ema": ("--model-ema", "--no-model-ema"), "--auto_resume": ("--auto-resume", None),
    "--use_amp": ("--amp", None), "--imagenet_default_mean_and_std": (None, _KEEP),
}
_RENAMED = {"--model_path": "--resume", "--model-path": "--resume", "--crop_pct": "--eval-crop-ratio",
            "--ratiow": "--ratio_weight", "--teacher-path": "--dynamicvit-teacher",
            "--teacher_path": "--dynamicvit-teacher", "--update_freq": "--accum-iter"}


def _model_of(items: List[List[str]]) -> Optional[str]:
    name = None
    for item in items:
        if item[0] in ("--model", "--arch") and len(item) > 1:
            name = item[1]
    return name


def translate_official_argv(argv: Sequence[str]) -> List[str]:
    """An official DynamicViT line in this project's flags (other lines are returned unchanged).

    `--model deit-s|deit-256|deit-b` and 2021 `--arch deit_small|deit_256|deit_base` select the
    registered models; `--model_path/--model-path CKPT` (infer.py) means `--eval --resume CKPT`;
    boolean-valued options (`--eval true`, `--dist_eval false`, ...) become switches; `--crop_pct`,
    `--ratiow`, `--update_freq` and `--teacher-path` take this project's names. A training line
    with an official model name and no `--finetune`/`--resume` starts, as the official trainer,
    from the DeiT weights at the official relative path (`--finetune ./pretrained/deit_*.pth`),
    which also feed the teacher unless `--teacher-path` is given.
    """
    items = split_items(argv)
    name = _model_of(items)
    official = name in OFFICIAL_NAMES and (name.startswith("deit-") or any(i[0] == "--arch" for i in items))
    if not (official or (name or "").startswith("dynamicvit_")):
        return list(argv)
    out: List[List[str]] = []
    for item in items:
        option, values = item[0], item[1:]
        if option in ("--model", "--arch") and values:
            out.append(["--model", OFFICIAL_NAMES.get(values[0], values[0])] + values[1:])
        elif option in ("--model_path", "--model-path"):
            out.append(["--eval"])
            out.append(["--resume"] + values)
        elif option in _BOOL_OPTIONS and values and values[0].lower() in _TRUE + _FALSE:
            flag = _BOOL_OPTIONS[option][0 if values[0].lower() in _TRUE else 1]
            if flag == _KEEP:
                out.append(item)
            elif flag is not None:
                out.append([flag] + values[1:])
            elif values[1:]:
                out.append(values[1:])
        elif option in _RENAMED:
            out.append([_RENAMED[option]] + values)
        else:
            out.append(item)
    flat = [token for item in out for token in item]
    options = {item[0] for item in out}
    evaluating = "--eval" in options
    if evaluating:
        return flat
    finetune = next((item[1] for item in out if item[0] == "--finetune" and len(item) > 1), None)
    if official and finetune is None and not options & {"--resume", "--checkpoint"}:
        dim = {"dynamicvit_deit_small_patch16_224": 384, "dynamicvit_deit_base_patch16_224": 768}.get(OFFICIAL_NAMES[name])
        if dim is not None:  # deit-256 has no training branch in the official code
            finetune = DEIT_WEIGHTS[dim]
            flat += ["--finetune", finetune]
    if finetune and "--dynamicvit-teacher" not in options:
        flat += ["--dynamicvit-teacher", finetune]
    return flat


# ---------------------------------------------------------------------------
# The method family
# ---------------------------------------------------------------------------

def _check_options(options) -> None:
    rate = options.base_rate
    if rate is not None and rate != family.AUTO and (isinstance(rate, bool) or not 0 < float(rate) <= 1):
        raise ModelConfigError(f"--base_rate must be in (0, 1], got {rate}; e.g. --base_rate 0.7")
    for dest in ("ratio_weight", "distillw", "lr_scale", "backbone_freeze_epochs"):
        value = getattr(options, dest)
        if value is not None and value < 0:
            raise ModelConfigError(f"--{dest} must be >= 0, got {value}")


def _search_base_rate(build, target, gmacs_of):
    probe = build(1.0)
    n, locations = probe.patch_embed.num_patches, len(probe.pruning_loc)
    # the smallest two-decimal rate that keeps at least one patch at the last location
    low = next(h / 100 for h in range(1, 101) if min(keep_counts(keep_ratios(h / 100, locations), n)) >= 1)
    return family.search_continuous(low, 1.0, build, target, gmacs_of, decimals=3)


_TINY = dict(depth=4, embed_dim=32, num_heads=2, patch_size=8, pruning_loc=(1, 2, 3))

FAMILY = family.register_family(family.MethodFamily(
    name="dynamicvit",
    title="DynamicViT: learned token sparsification (score predictors before blocks 3, 6, 9)",
    owns=family.models_of(__name__),
    flags=(
        family.Flag("--base_rate", type=family.auto_or(float), kwarg="base_rate", metavar="RHO",
                    help="keep ratio rho: the locations keep rho, rho^2, rho^3 of the patches (model default 0.7; "
                         "'auto' with --target-gmacs)"),
        family.Flag("--pruning_loc", type=family.literal("int_tuple"), kwarg="pruning_loc", metavar="BLOCKS",
                    help='blocks before which tokens are pruned, e.g. "(3, 6, 9)" (model default)'),
        family.Flag("--ratio_weight", type=float, default=2.0,
                    help="weight of the keep-ratio loss (official --ratio_weight; 2021 --ratiow)"),
        family.Flag("--distillw", type=float, default=0.5,
                    help="weight of the teacher's logit KL and token MSE (0: no teacher, the 2021 DiffPruningLoss)"),
        family.Flag("--lr_scale", type=float, default=0.01,
                    help="backbone lr multiplier (the predictors train at the full lr)"),
        family.Flag("--backbone_freeze_epochs", type=int, default=5,
                    help="epochs at the start in which the backbone's lr is 0 (the predictors train alone)"),
        family.Flag("--dynamicvit-teacher", dest="dynamicvit_teacher", metavar="FILE",
                    help="DeiT checkpoint of the teacher (on DynamicViT lines --teacher-path means this; default: "
                         "the --finetune file, else the official ./pretrained/deit_*_patch16_224-*.pth)"),
    ),
    check_options=_check_options,
    reduction=family.Reduction("base_rate", _search_base_rate),
    hooks=_family_hooks,
    # HEAD main.py and its README lines (section 6a of docs/methods/dynamicvit.md)
    recipe=dict(lr=1e-3, unscale_lr=True, epochs=30, batch_size=128, warmup_epochs=5, warmup_lr=0.0, min_lr=1e-6,
                warmup_prefix=True, sched_step="iter", cooldown_epochs=0, weight_decay=0.05, drop_path=0.0,
                color_jitter=0.4, repeated_aug=False, model_ema=True, model_ema_decay=0.9999, auto_resume=True),
    translate_argv=translate_official_argv,
    checkpoint_filter_fn=_checkpoint_filter,
    # no DeiT teacher file in the tests (--distillw 0); tests/unit/test_dynamicvit.py trains with one
    examples=(
        family.Example("dynamicvit", model="dynamicvit_deit_tiny_patch16_224", kwargs=dict(_TINY),
                       flags=("--base_rate", "0.7", "--distillw", "0"), invalid={"base_rate": 1.5}),
        # the other sizes are the same class with other dims: compiled once, through the tiny Example
        *(family.Example(f"dynamicvit_{size}", model=f"dynamicvit_deit_{size}_patch16_224", kwargs=dict(_TINY),
                         flags=("--base_rate", "0.5", "--distillw", "0"), compile=(), invalid={"ratio_weight": -1.0})
          for size in ("256", "small", "base")),
    ),
))
