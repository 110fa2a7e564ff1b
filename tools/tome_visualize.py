"""Visualise ToMe's merged token groups (ToMe, arXiv 2210.09461, section 6 of tome.md).

Runs a ToMe-patched model with `trace_source=True` on images and paints every final
group: its interior with the group's mean image colour, its border (pixels removed
by a binary erosion of the group mask) with a random colour per group
(`random.seed(0)`, one RGB triple per group id).

    python -m tools.tome_visualize --model deit_small_patch16_224 --tome-r 13 --out groups.png
    python -m tools.tome_visualize --checkpoint output_dir/checkpoint.pth \\
        --tome-r "[25] * 8" --images cat.jpg dog.jpg --out groups.png

The model name, num_classes and model kwargs default to those the checkpoint's saved
args hold (main.py's flag names: --model, --resume/--checkpoint, --input-size, --model-kwargs).

Without `--images` a synthetic test image is used. The output shows the input and
its visualisation side by side; several images give `<out stem>_<i>.png`.
"""
from __future__ import annotations

import argparse
import ast
import logging
import os
import random
from typing import List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy.ndimage import binary_erosion

from utils.errors import UserError

_logger = logging.getLogger(__name__)


def group_colours(num_groups: int) -> List[tuple]:
    """One random RGB triple in [0, 1) per group id, seeded like ToMe's (`random.seed(0)`)."""
    random.seed(0)
    return [(random.random(), random.random(), random.random()) for _ in range(num_groups)]


def make_visualization(img: Image.Image, source: torch.Tensor, patch_size: int = 16,
                       class_token: bool = True, num_prefix_tokens: Optional[int] = None) -> Image.Image:
    """Paint the token groups of one image.

    img: the model input as a PIL image (H, W multiples of `patch_size`).
    source: `[T, T0]` (or `[1, T, T0]`) 0/1 map of final groups over original tokens.
    The first `num_prefix_tokens` original tokens (default 1 if `class_token`, else 0;
    2 for a distilled DeiT) are not patches and are left out.
    """
    pixels = np.asarray(img.convert("RGB"), dtype=np.float64) / 255.0
    height, width, _ = pixels.shape
    source = source.detach().float().cpu()
    if source.dim() == 3:
        source = source[0]
    prefix = (1 if class_token else 0) if num_prefix_tokens is None else num_prefix_tokens
    group_of_patch = source[:, prefix:].argmax(dim=0)  # [P]
    colours = group_colours(int(group_of_patch.max()) + 1)
    grid = group_of_patch.view(1, 1, height // patch_size, width // patch_size).float()
    group_map = F.interpolate(grid, size=(height, width), mode="nearest")[0, 0].long().numpy()
    out = np.zeros_like(pixels)
    for group in np.unique(group_map):
        mask = group_map == group
        interior = binary_erosion(mask)
        border = mask & ~interior
        out[interior] = pixels[mask].mean(axis=0)
        out[border] = colours[group]
    return Image.fromarray(np.uint8(np.clip(out, 0, 1) * 255))


def synthetic_image(size: int) -> Image.Image:
    """A deterministic test picture: gradient background with a few flat shapes."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    img = np.stack([xx, yy, 0.5 * (1 - xx)], axis=-1)
    img[size // 8: size // 2, size // 8: size // 2] = (0.9, 0.2, 0.2)
    centre = ((xx - 0.7) ** 2 + (yy - 0.65) ** 2) < 0.04
    img[centre] = (0.1, 0.3, 0.9)
    return Image.fromarray(np.uint8(img * 255))


def load_image(path: str, size: int) -> Image.Image:
    """Resize the short side to `size` and centre-crop to `size` x `size`."""
    img = Image.open(path).convert("RGB")
    scale = size / min(img.size)
    img = img.resize((max(size, round(img.width * scale)), max(size, round(img.height * scale))), Image.BICUBIC)
    left, top = (img.width - size) // 2, (img.height - size) // 2
    return img.crop((left, top, left + size, top + size))


def visualize(model: torch.nn.Module, images: Sequence[Image.Image], r, start_idx: int = 0,
              mean=None, std=None) -> List[Image.Image]:
    """Patch `model` with ToMe (trace_source) and return one side-by-side picture per image."""
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    from models import tome
    tome.patch(model, r=r, start_idx=start_idx, trace_source=True)
    model.eval()
    device = next(model.parameters()).device
    mean = torch.tensor(mean or IMAGENET_DEFAULT_MEAN).view(3, 1, 1)
    std = torch.tensor(std or IMAGENET_DEFAULT_STD).view(3, 1, 1)
    patch_size = model.patch_embed.patch_size[0]
    prefix = int(getattr(model, "cls_token", None) is not None) + int(getattr(model, "dist_token", None) is not None)
    results = []
    for img in images:
        x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
        with torch.no_grad():
            model(((x - mean) / std).unsqueeze(0).to(device))
        source = model._tome_info["source"]
        if source is None:  # nothing merged: every patch is its own group
            tokens = prefix + (img.height // patch_size) * (img.width // patch_size)
            source = torch.eye(tokens)
        vis = make_visualization(img, source, patch_size, num_prefix_tokens=prefix)
        pair = Image.new("RGB", (img.width * 2, img.height))
        pair.paste(img, (0, 0))
        pair.paste(vis, (img.width, 0))
        results.append(pair)
    return results


def _parse_r(text: str):
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        # allow "[25] * 8" style lists
        parts = [p.strip() for p in text.split("*")]
        if len(parts) == 2:
            return ast.literal_eval(parts[0]) * int(parts[1])
        raise argparse.ArgumentTypeError(f"cannot read --tome-r {text!r}; use 13, '(16, -0.5)' or '[25] * 8'")
    return value


def build_parser() -> argparse.ArgumentParser:
    from tools import _common
    parser = _common.ToolParser("tome_visualize", __doc__)
    _common.add_model_args(parser, DEFAULT_MODEL, checkpoint_help="weights to load strictly", method_flags=False)
    g = parser.add_argument_group("ToMe and output")
    g.add_argument(*_common.spellings("--tome-r"), dest="tome_r", type=_parse_r, default=13,
                   help="tokens merged per block: int, '(r, inflect)' or a list such as '[25] * 8'")
    g.add_argument(*_common.spellings("--tome-start-idx"), dest="tome_start_idx", type=int, default=0,
                   help="attention blocks left unpatched at the start")
    g.add_argument("--images", nargs="*", default=[], help="image files (default: one synthetic image)")
    g.add_argument("--out", "--output", dest="out", default="tome_groups.png",
                   help="output PNG; several images give <stem>_<i>.png")
    return parser


DEFAULT_MODEL = "deit_small_patch16_224"


def run(args) -> int:
    from tools import _common
    _common.check_output_file(args.out, "--out")
    loaded = _common.build_model(args, DEFAULT_MODEL, apply_patches=False)
    model = loaded.model
    size = int(model.patch_embed.img_size[0])
    try:
        images = [load_image(p, size) for p in args.images] or [synthetic_image(size)]
    except OSError as err:
        raise UserError(f"cannot read --images file: {err}") from None
    try:
        pictures = visualize(model, images, args.tome_r, args.tome_start_idx)
    except ValueError as err:
        raise UserError(f"--tome-r {args.tome_r!r}: {str(err).splitlines()[0]}") from None
    stem, ext = os.path.splitext(args.out)
    paths = [args.out] if len(pictures) == 1 else [f"{stem}_{i}{ext or '.png'}" for i in range(len(pictures))]
    for picture, path in zip(pictures, paths):
        picture.save(path)
        _logger.info("wrote %s", path)
    print("\n".join(paths))
    return 0


def main(argv: Optional[list] = None) -> int:
    from tools import _common
    return _common.run_cli(build_parser(), run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
