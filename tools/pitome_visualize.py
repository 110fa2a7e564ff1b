"""Visualise PiToMe's merged token groups (PiToMe, arXiv 2405.16148; docs/methods/pitome.md).

Runs a PiToMe-patched model with `trace_source=True` on images and paints the groups
after the last block (or after `--blocks` blocks): every group's interior with its mean
image colour, its border with a random colour per group, as `tools/tome_visualize.py`
does for ToMe. Patches that still stand alone (protected or never matched) keep their
own pixels, so the picture shows which regions PiToMe merged and which it kept.

    python -m tools.pitome_visualize --model deit_small_patch16_224 --pitome-ratio 0.9 --out groups.png
    python -m tools.pitome_visualize --checkpoint output_dir/checkpoint.pth --pitome-ratio 0.925 \\
        --images cat.jpg dog.jpg --out groups.png

The model name, num_classes and model kwargs default to those the checkpoint's saved args
hold (main.py's flag names). Without `--images` a synthetic test image is used. The output
shows the input and its visualisation side by side; several images give `<out stem>_<i>.png`.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from PIL import Image

from tools._visualize import make_visualization, model_input, side_by_side, unmerged_sources
from utils.errors import UserError

DEFAULT_MODEL = "deit_small_patch16_224"


def group_maps(model: torch.nn.Module, x: torch.Tensor, blocks: Optional[int] = None) -> List[torch.Tensor]:
    """Source maps `[N_final, N0]` per image of x `[B, 3, H, W]` of a PiToMe-patched model,
    after its first `blocks` blocks (None: all). The patch is switched to trace_source for the run."""
    cfg = model._pitome_cfg
    saved_trace, saved_ratios = cfg.trace_source, list(cfg.ratios)
    cfg.trace_source = True
    if blocks is not None:  # blocks after the cut keep every token
        cfg.ratios = saved_ratios[:blocks] + [1.0] * (len(saved_ratios) - blocks)
    try:
        with torch.no_grad():
            model(x)
    finally:
        cfg.trace_source, cfg.ratios = saved_trace, saved_ratios
    source = model._pitome_info["source"]
    if source is None:  # nothing merged: every token is its own group
        source = unmerged_sources(x, _patch(model), cfg.num_prefix)
    return list(source)


def _patch(model) -> int:
    return int(model.patch_embed.patch_size[0])


def visualize(model: torch.nn.Module, images: Sequence[Image.Image], blocks: Optional[int] = None,
              mean=None, std=None) -> List[Image.Image]:
    """One side-by-side picture (input | groups) per image; `model` must be PiToMe-patched."""
    model.eval()
    device = next(model.parameters()).device
    results = []
    for img in images:
        (source,) = group_maps(model, model_input([img], mean, std, device), blocks)
        vis = make_visualization(img, source, _patch(model), num_prefix_tokens=model._pitome_cfg.num_prefix)
        results.append(side_by_side([img, vis]))
    return results


def build_parser():
    from tools import _visualize
    parser, g = _visualize.visualizer_parser("pitome_visualize", __doc__, DEFAULT_MODEL, "pitome_groups.png")
    g.add_argument("--blocks", type=int, default=None,
                   help="show the groups after this many blocks (default: after the last block)")
    return parser


def run(args) -> int:
    from models import pitome
    from tools import _visualize

    if getattr(args, "pitome_ratio", None) is None:
        args.pitome_ratio = 0.9
    loaded = _visualize.build_model(args, DEFAULT_MODEL)
    model = loaded.model
    if not pitome.is_patched(model):
        raise UserError(f"--model {loaded.name} is not PiToMe-patched; give --pitome-ratio R")
    depth = len(model.blocks)
    if args.blocks is not None and not 0 <= args.blocks <= depth:
        raise UserError(f"--blocks {args.blocks} is outside 0..{depth} (the model has {depth} blocks)")
    return _visualize.draw_and_write(args, model, lambda images: visualize(model, images, args.blocks))


def main(argv: Optional[list] = None) -> int:
    from tools import _common
    return _common.run_cli(build_parser, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
