"""Visualise the tokens DynamicViT keeps (Rao et al., NeurIPS 2021, arXiv 2106.02034).

Runs a DynamicViT model in eval mode on images and draws, next to the input, one panel per
pruning location in which the patches dropped so far are greyed out (the kept ones stay as
they are). The kept tokens are held in keep-score order inside the model; the panels map them
back to their original patch positions (`DynamicViT.forward_kept`).

    python -m tools.dynamicvit_visualize --model dynamicvit_deit_small_patch16_224 --base_rate 0.7 \\
        --checkpoint dynamicvit_deit-s.pth --images cat.jpg dog.jpg --out kept.png

The model name, num_classes and model kwargs default to those a main.py checkpoint's saved args
hold (main.py's flag names: --model, --resume/--checkpoint, --input-size, --model-kwargs, --base_rate).
A released checkpoint (a dict with a 'model' entry) loads strictly.

Without `--images` a synthetic test image is used. Several images give `<out stem>_<i>.png`.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import numpy as np
import torch
from PIL import Image

from tools._visualize import model_input, side_by_side

DEFAULT_MODEL = "dynamicvit_deit_small_patch16_224"
DROPPED_GREY = 0.85  # dropped patches are painted with this grey, blended with a tenth of the image


def kept_masks(model: torch.nn.Module, images: torch.Tensor) -> List[torch.Tensor]:
    """Per pruning location that dropped tokens, a `[B, gh, gw]` bool map of the patches still kept."""
    model.eval()
    with torch.no_grad():
        _, kept = model.forward_kept(images)
    gh, gw = model.patch_embed.dynamic_feat_size(images.shape[-2:])
    masks = []
    for ids in kept:
        mask = torch.zeros(images.shape[0], gh * gw, dtype=torch.bool, device=ids.device)
        mask.scatter_(1, ids, True)
        masks.append(mask.view(-1, gh, gw).cpu())
    return masks


def paint(img: Image.Image, keep: torch.Tensor, patch_size: int) -> Image.Image:
    """`img` with the patches where `keep` `[gh, gw]` is False greyed out."""
    pixels = np.asarray(img.convert("RGB"), dtype=np.float64) / 255.0
    full = keep.repeat_interleave(patch_size, 0).repeat_interleave(patch_size, 1).numpy()
    out = pixels.copy()
    out[~full] = 0.9 * DROPPED_GREY + 0.1 * pixels[~full]
    return Image.fromarray(np.uint8(np.clip(out, 0, 1) * 255))


def visualize(model: torch.nn.Module, images: Sequence[Image.Image], mean=None, std=None) -> List[Image.Image]:
    """One strip per image: the input, then the kept patches after each pruning location."""
    patch_size = model.patch_embed.patch_size[0]
    masks = kept_masks(model, model_input(images, mean, std, next(model.parameters()).device))
    return [side_by_side([img] + [paint(img, mask[i], patch_size) for mask in masks]) for i, img in enumerate(images)]


def build_parser():
    from tools import _visualize
    parser, _ = _visualize.visualizer_parser("dynamicvit_visualize", __doc__, DEFAULT_MODEL, "dynamicvit_kept.png")
    return parser


def supported_models() -> List[str]:
    import timm

    import models  # noqa: F401
    return timm.list_models("dynamicvit_*")


def run(args) -> int:
    from tools import _visualize
    model = _visualize.build_model(args, DEFAULT_MODEL, supported=supported_models()).model
    return _visualize.draw_and_write(args, model, lambda images: visualize(model, images))


def main(argv: Optional[list] = None) -> int:
    from tools import _common
    return _common.run_cli(build_parser, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
