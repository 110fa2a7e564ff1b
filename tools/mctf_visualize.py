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

import torch
from PIL import Image

from tools._visualize import make_visualization, model_input, side_by_side, to_pictures, unmerged_sources

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
        source = unmerged_sources(x, int(model.patch_embed.patch_size[0]), cfg.protected)
    return list(source)


def visualize(model: torch.nn.Module, images: Sequence[Image.Image], mean=None, std=None) -> List[Image.Image]:
    """One side-by-side picture (input, groups) per image; patches with MCTF's defaults if needed."""
    from models import mctf
    if not mctf.is_patched(model):
        mctf.patch(model)
    patch = int(model.patch_embed.patch_size[0])
    sources = group_sources(model, model_input(images, mean, std, next(model.parameters()).device))
    prefix = model._mctf_cfg.protected
    return [side_by_side([img, make_visualization(img, source, patch, num_prefix_tokens=prefix)])
            for img, source in zip(images, sources)]


def run_command(model: torch.nn.Module, context) -> List[str]:
    """main.py `--mctf_visualize N`: the groups of the first N validation images, written to
    `<output_dir>/mctf_groups/mctf_groups_<i>.png` (the current directory without --output_dir)."""
    wanted = int(context.mctf_visualize)
    images: List[Image.Image] = []
    for batch in context.data_loader:
        images.extend(to_pictures(batch[0]))
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
    from tools import _visualize
    return _visualize.visualizer_parser("mctf_visualize", __doc__, DEFAULT_MODEL, "mctf_groups.png")[0]


def run(args) -> int:
    from tools import _visualize
    model = _visualize.build_model(args, DEFAULT_MODEL).model.eval()
    return _visualize.draw_and_write(args, model, lambda images: visualize(model, images))


def main(argv: Optional[list] = None) -> int:
    from tools import _common
    return _common.run_cli(build_parser, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
