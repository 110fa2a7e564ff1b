"""ToFu: "Token Fusion: Bridging the Gap between Token Pruning and Token Merging"
(Kim et al., WACV 2024, arXiv 2312.01026). No official code; docs: docs/methods/tofu.md.

ToFu keeps ToMe's bipartite soft matching (which tokens go) and changes what happens to
the matched tokens, by depth:

* blocks in `prune_layers` (default: the first `L // 2` transformer blocks, the paper's
  "the first d layers prune" with d = 6 for a 12-block ViT) drop the r matched A tokens
  (`token_ops.prune_tokens`); every surviving token is an input token unchanged;
* the other blocks merge each destination with its sources by MLERP
  (`token_ops.mlerp_merge`): `mlerp="paper"` is the paper's `mean / ||mean|| * max ||x_k||`,
  `mlerp="opentome"` the third-party OpenToMe / PiToMe variant that divides by the original
  destination's norm instead of the mean's, `mlerp="mean"` plain unweighted averaging
  (the paper's "ToFu AVG").

The mean is unweighted and sizes are never updated (the paper's formula and both
references), so `prop_attn` has no effect; it is accepted for the same signature as ToMe.

This module only supplies the fusion rule: patching, per-forward state, `model.r`,
`start_idx`, shrink/lambda handling and the hybrid backbones (MobileViT, EfficientViT,
unmerge through the group map before convolutions; docs/hybrid_merging.md) are ToMe's
machinery in `models/tome.py`, shared as is. On hybrids a pruned token's grid positions
receive its destination's value when the stage unmerges.
"""
from __future__ import annotations

from dataclasses import dataclass
from numbers import Integral
from typing import FrozenSet, Iterable, List, Optional

import torch
from torch import nn

from . import tome
from .errors import ModelConfigError
from .token_ops import BipartiteMatch, RSchedule, merge_tokens, mlerp_merge, prune_tokens

__all__ = ["patch", "unpatch", "is_patched", "prune_layer_indices", "MLERP_MODES", "ToFuFusion"]

MLERP_MODES = ("paper", "opentome", "mean")


@dataclass(frozen=True)
class ToFuFusion:
    """ToFu's fusion step for `tome.apply_patch`: prune in `prune_layers`, merge elsewhere."""
    prune_layers: FrozenSet[int]
    mlerp: str

    def __call__(self, block_index: int, match: BipartiteMatch, x: torch.Tensor, size: Optional[torch.Tensor]):
        if block_index in self.prune_layers:
            return prune_tokens(x, match), size
        if self.mlerp == "mean":
            return merge_tokens(x, match, mode="mean"), size
        return mlerp_merge(x, match, form=self.mlerp), size


def _prune_set(prune_layers: Optional[Iterable[int]], num_layers: int) -> FrozenSet[int]:
    if prune_layers is None:
        return frozenset(range(num_layers // 2))
    if isinstance(prune_layers, (str, bytes)) or not isinstance(prune_layers, Iterable):
        raise ModelConfigError(f"ToFu prune_layers must be a list of block indices, got {prune_layers!r}; "
                               f"e.g. prune_layers=range(6).")
    layers = list(prune_layers)
    bad = [i for i in layers if isinstance(i, bool) or not isinstance(i, Integral) or not 0 <= i < num_layers]
    if bad:
        raise ModelConfigError(f"ToFu prune_layers entries must be block indices in [0, {num_layers}), "
                               f"got {bad[0]!r}.")
    return frozenset(int(i) for i in layers)


def patch(model: nn.Module, r: RSchedule = 0, prune_layers: Optional[Iterable[int]] = None, mlerp: str = "paper",
          prop_attn: bool = True, start_idx: int = 0, trace_source: bool = False) -> nn.Module:
    """Apply ToFu to `model` in place (replacing any ToMe/ToFu patch); returns the model.

    r: ToMe's schedule (int, (r, inflect) or per-block list), changeable later via `model.r`.
    prune_layers: transformer-block indices that prune (None: `range(L // 2)`, L the number of
    transformer blocks; `range(L // 2 + 1)` with mlerp="opentome" is OpenToMe's / PiToMe's rule).
    mlerp: "paper", "opentome" or "mean".
    """
    if mlerp not in MLERP_MODES:
        raise ModelConfigError(f"ToFu mlerp must be one of {', '.join(MLERP_MODES)}, got {mlerp!r}.")
    num_layers = len(tome.transformer_blocks(model, tome.model_family(model)))
    fusion = ToFuFusion(_prune_set(prune_layers, num_layers), mlerp)
    return tome.apply_patch(model, r=r, prop_attn=prop_attn, start_idx=start_idx, trace_source=trace_source,
                            method="tofu", fusion=fusion)


unpatch = tome.unpatch


def is_patched(model: nn.Module) -> bool:
    return isinstance(model, tome.ToMeModelMixin) and model._tome_cfg.method == "tofu"


def prune_layer_indices(model: nn.Module) -> List[int]:
    """Transformer-block indices that prune in a ToFu-patched model (the others merge)."""
    return sorted(model._tome_cfg.fusion.prune_layers)


# ---------------------------------------------------------------------------
# Method family: ToFu is a patch family, applied after any supported model is built
# ---------------------------------------------------------------------------

from . import family as _family  # noqa: E402  (the declaration below is the module's public contract)


def _family_active(options) -> bool:
    return options.tofu_r is not None


def _family_check(options) -> None:
    if options.tofu_r is None and (options.tofu_start_idx or options.tofu_mlerp != "paper"):
        raise ModelConfigError("--tofu-start-idx / --tofu-mlerp need --tofu-r R")


def _family_patch(model: nn.Module, options) -> None:
    patch(model, r=options.tofu_r, start_idx=int(options.tofu_start_idx or 0), mlerp=options.tofu_mlerp)


FAMILY = _family.register_family(_family.MethodFamily(
    name="tofu",
    title="ToFu: token fusion, prune early and MLERP-merge late (a patch applied to supported models)",
    flags=(
        *tome.schedule_flags("tofu", "ToFu", "reducing"),
        _family.Flag("--tofu-mlerp", choices=MLERP_MODES, default="paper",
                     help="merge rule of the merging blocks: the paper's MLERP, OpenToMe's variant, or plain mean"),
    ),
    patch=_family_patch,
    active=_family_active,
    check_options=_family_check,
    hooks=tome.MergeScheduleHooks,
    reduction=_family.Reduction("tofu_r", tome._search_r),
    examples=(
        _family.Example("tofu", model="deit_tiny_patch16_224", kwargs=dict(depth=4, embed_dim=32, num_heads=2,
                                                                          patch_size=8), flags=("--tofu-r", "3"),
                        invalid=dict(tofu_mlerp="no_such_rule")),
    ),
))
