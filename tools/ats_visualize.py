"""Visualise the tokens ATS keeps (Fayyaz et al., ECCV 2022, arXiv 2111.15667; docs/methods/ats.md).

Runs an ATS-patched ViT in eval mode on images and draws, next to the input, one panel per ATS
block in which the patches dropped so far are greyed out; each panel's title strip gives the
number of tokens the image keeps there (class token included). Every image keeps its own
number of tokens, so the panels of two images differ in how much is grey.

    python -m tools.ats_visualize --model deit_small_patch16_224 --ats-blocks 3 4 5 6 7 8 9 10 11 \\
        --checkpoint deit_small_patch16_224-cd65a155.pth --images cat.jpg dog.jpg --out kept.png

Without an ATS flag the official setting is used (blocks 3 .. depth - 1). The model name,
num_classes and model kwargs default to those a main.py checkpoint's saved args hold (main.py's
flag names). Without `--images` a synthetic test image is used; several images give
`<out stem>_<i>.png`. main.py's `--ats-visualize` writes the same strips for
`--ats-visualize-images` validation images to `<output_dir>/ats_visualize/`.
"""
from __future__ import annotations

import logging
import os
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

from tools._visualize import model_input, side_by_side, to_pictures
from utils.errors import UserError

_logger = logging.getLogger(__name__)

DEFAULT_MODEL = "deit_small_patch16_224"
DROPPED_GREY = 0.85  # dropped patches: this grey blended with a tenth of the image
TITLE_HEIGHT = 14


def kept_masks(model: torch.nn.Module, images: torch.Tensor) -> Dict[int, torch.Tensor]:
    """{ATS block index: `[B, gh, gw]` bool map of the patches still kept after that block}."""
    from models import ats
    if not ats.is_patched(model):
        raise UserError("the model is not patched with ATS; give --ats-blocks (or another ATS flag)")
    was_training = model.training
    model.eval()
    with torch.no_grad():
        model(images)
    model.train(was_training)
    gh, gw = model.patch_embed.dynamic_feat_size(images.shape[-2:])
    masks = {}
    for block, positions in sorted(model._ats_info["kept"].items()):
        mask = torch.zeros(images.shape[0], gh * gw + 1, dtype=torch.bool, device=positions.device)
        mask.scatter_(1, torch.where(positions < 0, gh * gw, positions), True)  # -1 (padding) -> spare column
        masks[block] = mask[:, :-1].view(-1, gh, gw).cpu()
    return masks


def paint(img: Image.Image, keep: torch.Tensor, patch_size: int, title: str = "") -> Image.Image:
    """`img` with the patches where `keep` `[gh, gw]` is False greyed out, under a title strip."""
    pixels = np.asarray(img.convert("RGB"), dtype=np.float64) / 255.0
    full = keep.repeat_interleave(patch_size, 0).repeat_interleave(patch_size, 1).numpy()
    full = np.pad(full, ((0, pixels.shape[0] - full.shape[0]), (0, pixels.shape[1] - full.shape[1])))
    out = pixels.copy()
    out[~full] = 0.9 * DROPPED_GREY + 0.1 * pixels[~full]
    body = Image.fromarray(np.uint8(np.clip(out, 0, 1) * 255))
    panel = Image.new("RGB", (img.width, img.height + TITLE_HEIGHT), "white")
    panel.paste(body, (0, TITLE_HEIGHT))
    ImageDraw.Draw(panel).text((2, 1), title, fill="black")
    return panel


def strips(model: torch.nn.Module, batch: torch.Tensor, images: Sequence[Image.Image]) -> List[Image.Image]:
    """One strip per image: the input, then the kept patches after each ATS block."""
    masks = kept_masks(model, batch)
    patch_size = model.patch_embed.patch_size[0]
    prefix = int(model.num_prefix_tokens)
    out = []
    for i, img in enumerate(images):
        whole = torch.ones(img.height // patch_size, img.width // patch_size, dtype=torch.bool)
        panels = [paint(img, whole, patch_size, f"input: {int(whole.sum()) + prefix}")]
        for block, mask in masks.items():
            panels.append(paint(img, mask[i], patch_size, f"block {block}: {int(mask[i].sum()) + prefix}"))
        out.append(side_by_side(panels))
    return out


def visualize_command(model: torch.nn.Module, context) -> None:
    """main.py's `--ats-visualize`: strips of the first validation images in `<output_dir>/ats_visualize/`."""
    count = int(getattr(context, "ats_visualize_images", None) or 8)
    output_dir = os.path.join(getattr(context, "output_dir", None) or ".", "ats_visualize")
    os.makedirs(output_dir, exist_ok=True)
    written = 0
    for batch in context.data_loader:
        images = batch[0][: count - written].to(context.device)
        pictures = to_pictures(images)
        for strip in strips(model, images, pictures):
            path = os.path.join(output_dir, f"img_{written}.png")
            strip.save(path)
            written += 1
        if written >= count:
            break
    _logger.info("ATS: wrote %d strips of kept tokens to %s", written, output_dir)


def build_parser():
    from tools import _visualize
    return _visualize.visualizer_parser("ats_visualize", __doc__, DEFAULT_MODEL, "ats_kept.png")[0]


def run(args) -> int:
    from models import ats
    from tools import _visualize
    model = _visualize.build_model(args, DEFAULT_MODEL).model
    if not ats.is_patched(model):
        try:
            ats.patch(model)
        except ValueError as err:
            raise UserError(str(err)) from None
    device = next(model.parameters()).device
    return _visualize.draw_and_write(args, model, lambda images: strips(model, model_input(images, device=device),
                                                                        images))


def main(argv: Optional[list] = None) -> int:
    from tools import _common
    return _common.run_cli(build_parser, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
