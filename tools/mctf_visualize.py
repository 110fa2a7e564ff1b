"""Visualise MCTF's fused token groups (MCTF, arXiv 2403.10030; docs/methods/mctf.md).

Runs an MCTF-patched model with `trace_source=True` on images and paints the groups after
the last block as the official `make_visualization` does (and `tools/tome_visualize.py` for
ToMe): every group's interior with its mean image colour, its border with a random colour
per group. The groups come from the group map of both matching steps (A -> B, then B -> A),
so a patch fused A -> B -> A is drawn with its final group.

    python -m tools.mctf_visualize --model deit_small_patch16_224 --mctf-r 16 \\
        --activate_layer [1,2,3,4,5,6,7,8,9,10,11] --out groups.png
    python -m tools.mctf_visualize --checkpoint output_dir/checkpoint.pth --images cat.jpg --out groups.png

Without an MCTF flag the model is patched with `models.mctf.patch`'s defaults (r 16 in blocks
1..11). The model name, num_classes and model kwargs default to the checkpoint's saved args.
Without `--images` a synthetic test image is used; several images give `<out stem>_<i>.png`.
From main.py, `--mctf_visualize N` draws N validation images to `<output_dir>/mctf_groups/`.
"""
from __future__ import annotations

import logging
import os
from typing import List, Optional, Sequence

import numpy as np
import torch
from PIL import Image

from tools.tome_visualize import load_image, make_visualization, synthetic_image
from utils.errors import UserError

_logger = logging.getLogger(__name__)

DEFAULT_MODEL = "deit_small_patch16_224"


def group_sources(model: torch.nn.Module, x: torch.Tensor) -> List[torch.Tensor]:
    """Source maps `[T_final, T0]` per image of x `[B, 3, H, W]` (MCTF-patched model, eval mode);
    trace_source is switched on for the run."""
    cfg = model._mctf_cfg
    saved = cfg.trace_source
    cfg.trace_source = True
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(x)
    finally:
        cfg.trace_source = saved
        model.train(was_training)
    source = model._mctf_info["source"]
    if source is None:  # nothing fused: every token is its own group
        patch = int(model.patch_embed.patch_size[0])
        tokens = cfg.protected + (x.shape[-2] // patch) * (x.shape[-1] // patch)
        source = torch.eye(tokens)[None].expand(x.shape[0], -1, -1)
    return list(source)


def _side_by_side(img: Image.Image, vis: Image.Image) -> Image.Image:
    pair = Image.new("RGB", (img.width * 2, img.height))
    pair.paste(img, (0, 0))
    pair.paste(vis, (img.width, 0))
    return pair


def visualize(model: torch.nn.Module, images: Sequence[Image.Image], mean=None, std=None) -> List[Image.Image]:
    """One side-by-side picture (input, groups) per image; patches with MCTF's defaults if needed."""
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    from models import mctf
    if not mctf.is_patched(model):
        mctf.patch(model)
    device = next(model.parameters()).device
    mean = torch.tensor(mean or IMAGENET_DEFAULT_MEAN).view(3, 1, 1)
    std = torch.tensor(std or IMAGENET_DEFAULT_STD).view(3, 1, 1)
    patch = int(model.patch_embed.patch_size[0])
    batch = torch.stack([(torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1) - mean) / std
                         for img in images])
    sources = group_sources(model, batch.to(device))
    prefix = model._mctf_cfg.protected
    return [_side_by_side(img, make_visualization(img, source, patch, num_prefix_tokens=prefix))
            for img, source in zip(images, sources)]


def run_command(model: torch.nn.Module, context) -> List[str]:
    """main.py `--mctf_visualize N`: the groups of the first N validation images, written to
    `<output_dir>/mctf_groups/mctf_groups_<i>.png` (the current directory without --output_dir)."""
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    wanted = int(context.mctf_visualize)
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1)
    images: List[Image.Image] = []
    for batch in context.data_loader:
        pixels = (batch[0].float().cpu() * std + mean).clamp(0, 1)
        for image in pixels:
            images.append(Image.fromarray(np.uint8(image.permute(1, 2, 0).numpy() * 255)))
        if len(images) >= wanted:
            break
    images = images[:wanted]
    folder = os.path.join(context.output_dir or ".", "mctf_groups")
    os.makedirs(folder, exist_ok=True)
    paths = []
    for index, picture in enumerate(visualize(model, images)):
        path = os.path.join(folder, f"mctf_groups_{index}.png")
        picture.save(path)
        paths.append(path)
    _logger.info(f"wrote {len(paths)} pictures of MCTF's token groups to {folder}")
    return paths


def build_parser():
    from tools import _common
    parser = _common.ToolParser("mctf_visualize", __doc__)
    _common.add_model_args(parser, DEFAULT_MODEL, checkpoint_help="weights to load strictly")
    g = parser.add_argument_group("output")
    g.add_argument("--images", nargs="*", default=[], help="image files (default: one synthetic image)")
    g.add_argument("--out", "--output", dest="out", default="mctf_groups.png",
                   help="output PNG; several images give <stem>_<i>.png")
    return parser


def run(args) -> int:
    from tools import _common
    _common.check_output_file(args.out, "--out")
    model = _common.build_model(args, DEFAULT_MODEL).model.eval()
    size = int(model.patch_embed.img_size[0])
    try:
        images = [load_image(p, size) for p in args.images] or [synthetic_image(size)]
    except OSError as err:
        raise UserError(f"cannot read --images file: {err}") from None
    pictures = visualize(model, images)
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
