"""Visualise DiffRate's kept and merged tokens (DiffRate, arXiv 2305.17997; docs/methods/diffrate.md).

Runs a DiffRate model (a `vit_deit_*_patch16_224` model or a timm ViT patched with
`--diffrate-flops` / `--diffrate-prune-kept`) with `trace_source=True` on images and paints,
after each of the `--blocks` given (default 3, 6 and 9), what is left of the patch grid: every
group of merged patches with its mean image colour inside and a random colour per group on
its border (as `tools/tome_visualize.py`), and every pruned patch darkened.

    python -m tools.diffrate_visualize --model vit_deit_small_patch16_224 --target_flops 2.9 \\
        --load_compression_rate --out diffrate.png
    python -m tools.diffrate_visualize --model deit_small_patch16_224 --diffrate-flops 2.9 \\
        --checkpoint deit_small.pth --images cat.jpg dog.jpg --out diffrate.png

The model name, num_classes and model kwargs default to those the checkpoint's saved args
hold (main.py's flag names); a search checkpoint shows the schedule its proxies encode.
Without `--images` a synthetic test image is used. The output shows the input and one panel
per block side by side; several images give `<out stem>_<i>.png`.
"""
from __future__ import annotations

import logging
import os
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy.ndimage import binary_erosion

from tools.tome_visualize import group_colours, load_image, synthetic_image
from utils.errors import UserError

_logger = logging.getLogger(__name__)

DEFAULT_MODEL = "vit_deit_small_patch16_224"
PRUNED_BRIGHTNESS = 0.2


def source_maps(model: torch.nn.Module, x: torch.Tensor, blocks: Sequence[int]) -> Dict[int, torch.Tensor]:
    """{block: source map `[B, T, T0]` after that block (1-based count of blocks run)} for a
    DiffRate model in evaluation; `source[b, g, p] = 1` iff original token p is in group g."""
    cfg = model._diffrate_cfg
    saved, cfg.trace_source = cfg.trace_source, True
    maps: Dict[int, torch.Tensor] = {}
    handles = [model.blocks[block - 1].register_forward_hook(
        lambda module, args, out, block=block: maps.__setitem__(block, cfg.slot.state.source.clone()))
        for block in blocks]
    try:
        with torch.no_grad():
            model.eval()(x)
    finally:
        cfg.trace_source = saved
        for handle in handles:
            handle.remove()
    return maps


def paint(img: Image.Image, source: torch.Tensor, patch_size: int) -> Image.Image:
    """One image's groups: `source` `[T, T0]` (class token first); pruned patches darkened."""
    pixels = np.asarray(img.convert("RGB"), dtype=np.float64) / 255.0
    height, width, _ = pixels.shape
    source = source.detach().float().cpu()[:, 1:]
    group = torch.where(source.sum(dim=0) > 0, source.argmax(dim=0), torch.full_like(source[0], -1).long())
    grid = group.view(1, 1, height // patch_size, width // patch_size).float()
    group_map = F.interpolate(grid, size=(height, width), mode="nearest")[0, 0].long().numpy()
    colours = group_colours(max(int(group.max()) + 1, 1))
    out = pixels * PRUNED_BRIGHTNESS
    for g in np.unique(group_map):
        if g < 0:
            continue
        mask = group_map == g
        interior = binary_erosion(mask)
        out[interior] = pixels[mask].mean(axis=0)
        out[mask & ~interior] = colours[g]
    return Image.fromarray(np.uint8(np.clip(out, 0, 1) * 255))


def visualize(model: torch.nn.Module, images: Sequence[Image.Image], blocks: Sequence[int],
              mean=None, std=None) -> List[Image.Image]:
    """One strip (input | the groups after each block of `blocks`) per image."""
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    device = next(model.parameters()).device
    mean = torch.tensor(mean or IMAGENET_DEFAULT_MEAN).view(3, 1, 1)
    std = torch.tensor(std or IMAGENET_DEFAULT_STD).view(3, 1, 1)
    patch_size = int(model.patch_embed.patch_size[0])
    results = []
    for img in images:
        x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
        maps = source_maps(model, ((x - mean) / std).unsqueeze(0).to(device), blocks)
        strip = Image.new("RGB", (img.width * (1 + len(blocks)), img.height))
        strip.paste(img, (0, 0))
        for i, block in enumerate(blocks):
            strip.paste(paint(img, maps[block][0], patch_size), (img.width * (i + 1), 0))
        results.append(strip)
    return results


def build_parser():
    from tools import _common
    parser = _common.ToolParser("diffrate_visualize", __doc__)
    _common.add_model_args(parser, DEFAULT_MODEL, checkpoint_help="weights to load strictly")
    g = parser.add_argument_group("output")
    g.add_argument("--blocks", type=int, nargs="+", default=[3, 6, 9],
                   help="show the tokens left after each of these numbers of blocks")
    g.add_argument("--images", nargs="*", default=[], help="image files (default: one synthetic image)")
    g.add_argument("--out", "--output", dest="out", default="diffrate_tokens.png",
                   help="output PNG; several images give <stem>_<i>.png")
    return parser


def run(args) -> int:
    from models import diffrate
    from tools import _common

    _common.check_output_file(args.out, "--out")
    loaded = _common.build_model(args, DEFAULT_MODEL)
    model = loaded.model
    if not diffrate.is_patched(model):
        raise UserError(f"--model {loaded.name} has no DiffRate schedule; use a vit_deit_*_patch16_224 model or "
                        f"give --diffrate-flops F")
    depth = len(model.blocks)
    bad = [block for block in args.blocks if not 1 <= block <= depth]
    if bad:
        raise UserError(f"--blocks {bad[0]} is outside 1..{depth} (the model has {depth} blocks)")
    size = int(model.patch_embed.img_size[0])
    try:
        images = [load_image(p, size) for p in args.images] or [synthetic_image(size)]
    except OSError as err:
        raise UserError(f"cannot read --images file: {err}") from None
    pictures = visualize(model, images, args.blocks)
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
