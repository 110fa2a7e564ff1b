"""A toy method family, the worked example of CONTRIBUTING.md's "Adding a method".

It lives outside `models/` on purpose: a researcher's own file plugs in the same way
(`python main.py --plugin toy_family ...`, or import it before calling `main.cli`).

* model family `toy`: `toy_vit` (a tiny timm ViT) with a constructor kwarg `logit_scale`,
  set by the flag `--toy-logit-scale`, and a training hook that records the epochs it saw
  and reports them in the progress line and log.txt;
* patch family `toy_shift`: `--toy-shift S` adds S to every block's output (an in-place,
  reversible patch through a forward hook), applied after the weights are loaded.
"""
from __future__ import annotations

from functools import partial

import torch
from timm.models import build_model_with_cfg, register_model
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from models import family
from models.errors import ModelConfigError
from models.hooks import MethodHooks


class ToyViT(VisionTransformer):
    def __init__(self, *args, logit_scale: float = 1.0, **kwargs):
        if logit_scale <= 0:
            raise ModelConfigError(f"toy_vit logit_scale must be > 0, got {logit_scale}; pass --toy-logit-scale > 0")
        super().__init__(*args, **kwargs)
        self.logit_scale = float(logit_scale)
        self.epochs_seen: list = []

    def forward_head(self, x, pre_logits: bool = False):
        out = super().forward_head(x, pre_logits=pre_logits)
        return out if pre_logits else out * self.logit_scale


@register_model
def toy_vit(pretrained: bool = False, **kwargs) -> ToyViT:
    model_args = dict(patch_size=8, embed_dim=32, depth=2, num_heads=2, img_size=32)
    return build_model_with_cfg(ToyViT, "toy_vit", pretrained, **dict(model_args, **kwargs))


class EpochRecorder(MethodHooks):
    def on_epoch_start(self, model: nn.Module, epoch: int) -> None:
        model.epochs_seen.append(epoch)

    def log_state(self, model: nn.Module) -> dict:
        return {"toy_epochs_seen": len(model.epochs_seen)}


def _hooks(model, options):
    return EpochRecorder() if isinstance(model, ToyViT) else None


TOY = family.register_family(family.MethodFamily(
    name="toy",
    title="toy method (the CONTRIBUTING.md example)",
    owns=family.models_of(__name__),
    flags=(family.Flag("--toy-logit-scale", type=float, kwarg="logit_scale",
                       help="scale of the toy model's logits (model default 1.0)"),),
    hooks=_hooks,
))


def _shift(module, inputs, output, amount):
    return output + amount


def patch(model: nn.Module, shift: float) -> nn.Module:
    for block in model.blocks:
        block._toy_shift = block.register_forward_hook(partial(_shift, amount=shift))
    return model


TOY_SHIFT = family.register_family(family.MethodFamily(
    name="toy_shift",
    title="toy patch: shift every block's output",
    flags=(family.Flag("--toy-shift", type=float, help="add this value to every block's output (default: no patch)"),),
    patch=lambda model, options: patch(model, options.toy_shift),
    active=lambda options: options.toy_shift is not None,
))


def shifted(model: nn.Module) -> bool:
    return all(hasattr(block, "_toy_shift") for block in model.blocks)


__all__ = ["ToyViT", "toy_vit", "patch", "shifted", "TOY", "TOY_SHIFT", "torch"]
