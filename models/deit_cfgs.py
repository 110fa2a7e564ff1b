"""The pretrained configuration of DeiT v1 checkpoints as the DeiT recipe evaluates them.

DiffRate, EViT, DynamicViT, MCTF, the attention-shrink models and TokenReduction all start
from (or evaluate) DeiT-shaped ViTs at 224 px; they share this one definition of the
evaluation transform and head names. timm's own DeiT cfgs cannot be reused: their
`crop_pct` is 0.9, while DeiT's recipe and the official repositories evaluate at 0.875.
"""
from typing import Optional

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

__all__ = ["deit_cfg"]


def deit_cfg(hub_model: Optional[str] = None, **kwargs) -> dict:
    """A timm pretrained-cfg dict for a DeiT-shaped model at 224 px (crop 0.875, bicubic).

    hub_model: a timm hub tag such as "deit_small_patch16_224.fb_in1k" whose weights the model
    loads (`hf_hub_id` "timm/<hub_model>"); None for a model without hub weights.
    kwargs: keys that extend or override the defaults (`url=...`, `classifier=("head", "head_dist")`).
    """
    cfg = {
        "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": None,
        "crop_pct": 0.875, "interpolation": "bicubic", "fixed_input_size": True,
        "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.proj", "classifier": "head",
    }
    if hub_model is not None:
        cfg["hf_hub_id"] = f"timm/{hub_model}"
    cfg.update(kwargs)
    return cfg
