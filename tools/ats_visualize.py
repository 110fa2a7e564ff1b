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
        strip = Image.new("RGB", (img.width * len(panels), panels[0].height), "white")
        for j, panel in enumerate(panels):
            strip.paste(panel, (img.width * j, 0))
        out.append(strip)
    return out


def _normalise(images: Sequence[Image.Image], device, mean=None, std=None) -> torch.Tensor:
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    mean = torch.tensor(mean or IMAGENET_DEFAULT_MEAN).view(3, 1, 1)
    std = torch.tensor(std or IMAGENET_DEFAULT_STD).view(3, 1, 1)
    return torch.stack([(torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)
                         - mean) / std for img in images]).to(device)


def _to_image(tensor: torch.Tensor, mean=None, std=None) -> Image.Image:
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    mean = torch.tensor(mean or IMAGENET_DEFAULT_MEAN).view(3, 1, 1)
    std = torch.tensor(std or IMAGENET_DEFAULT_STD).view(3, 1, 1)
    pixels = (tensor.detach().float().cpu() * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()
    return Image.fromarray(np.uint8(pixels * 255))


def visualize_command(model: torch.nn.Module, context) -> None:
    """main.py's `--ats-visualize`: strips of the first validation images in `<output_dir>/ats_visualize/`."""
    count = int(getattr(context, "ats_visualize_images", None) or 8)
    output_dir = os.path.join(getattr(context, "output_dir", None) or ".", "ats_visualize")
    os.makedirs(output_dir, exist_ok=True)
    written = 0
    for batch in context.data_loader:
        images = batch[0][: count - written].to(context.device)
        pictures = [_to_image(image) for image in images]
        for strip in strips(model, images, pictures):
            path = os.path.join(output_dir, f"img_{written}.png")
            strip.save(path)
            written += 1
        if written >= count:
            break
    _logger.info("ATS: wrote %d strips of kept tokens to %s", written, output_dir)


def build_parser():
    from tools import _common
    parser = _common.ToolParser("ats_visualize", __doc__)
    _common.add_model_args(parser, DEFAULT_MODEL, checkpoint_help="weights to load strictly")
    g = parser.add_argument_group("output")
    g.add_argument("--images", nargs="*", default=[], help="image files (default: one synthetic image)")
    g.add_argument("--out", "--output", dest="out", default="ats_kept.png",
                   help="output PNG; several images give <stem>_<i>.png")
    return parser


def run(args) -> int:
    from models import ats
    from tools import _common
    from tools.tome_visualize import load_image, synthetic_image
    _common.check_output_file(args.out, "--out")
    model = _common.build_model(args, DEFAULT_MODEL).model
    if not ats.is_patched(model):
        try:
            ats.patch(model)
        except ValueError as err:
            raise UserError(str(err)) from None
    size = int(model.patch_embed.img_size[0])
    try:
        images = [load_image(p, size) for p in args.images] or [synthetic_image(size)]
    except OSError as err:
        raise UserError(f"cannot read --images file: {err}") from None
    results = strips(model, _normalise(images, next(model.parameters()).device), images)
    stem, ext = os.path.splitext(args.out)
    paths = [args.out] if len(results) == 1 else [f"{stem}_{i}{ext or '.png'}" for i in range(len(results))]
    for strip, path in zip(results, paths):
        strip.save(path)
        _logger.info("wrote %s", path)
    return 0


def main(argv: Optional[list] = None) -> int:
    from tools import _common
    return _common.run_cli(build_parser(), run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
