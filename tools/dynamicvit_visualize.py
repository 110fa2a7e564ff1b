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

import logging
import os
from typing import List, Optional, Sequence

import numpy as np
import torch
from PIL import Image

from utils.errors import UserError

_logger = logging.getLogger(__name__)

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
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    device = next(model.parameters()).device
    mean = torch.tensor(mean or IMAGENET_DEFAULT_MEAN).view(3, 1, 1)
    std = torch.tensor(std or IMAGENET_DEFAULT_STD).view(3, 1, 1)
    patch_size = model.patch_embed.patch_size[0]
    batch = torch.stack([(torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1) - mean) / std
                         for img in images]).to(device)
    masks = kept_masks(model, batch)
    strips = []
    for i, img in enumerate(images):
        panels = [img] + [paint(img, mask[i], patch_size) for mask in masks]
        strip = Image.new("RGB", (img.width * len(panels), img.height), "white")
        for j, panel in enumerate(panels):
            strip.paste(panel, (img.width * j, 0))
        strips.append(strip)
    return strips


def build_parser():
    from tools import _common
    parser = _common.ToolParser("dynamicvit_visualize", __doc__)
    _common.add_model_args(parser, DEFAULT_MODEL, checkpoint_help="weights to load strictly")
    g = parser.add_argument_group("output")
    g.add_argument("--images", nargs="*", default=[], help="image files (default: one synthetic image)")
    g.add_argument("--out", "--output", dest="out", default="dynamicvit_kept.png",
                   help="output PNG; several images give <stem>_<i>.png")
    return parser


def supported_models() -> List[str]:
    import timm

    import models  # noqa: F401
    return timm.list_models("dynamicvit_*")


def run(args) -> int:
    from tools import _common
    from tools.tome_visualize import load_image, synthetic_image
    _common.check_output_file(args.out, "--out")
    model = _common.build_model(args, DEFAULT_MODEL, supported=supported_models()).model
    size = int(model.patch_embed.img_size[0])
    try:
        images = [load_image(p, size) for p in args.images] or [synthetic_image(size)]
    except OSError as err:
        raise UserError(f"cannot read --images file: {err}") from None
    strips = visualize(model, images)
    stem, ext = os.path.splitext(args.out)
    paths = [args.out] if len(strips) == 1 else [f"{stem}_{i}{ext or '.png'}" for i in range(len(strips))]
    for strip, path in zip(strips, paths):
        strip.save(path)
        _logger.info("wrote %s", path)
    print("\n".join(paths))
    return 0


def main(argv: Optional[list] = None) -> int:
    from tools import _common
    return _common.run_cli(build_parser(), run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
