"""Visualise ToMe's merged token groups (ToMe, arXiv 2210.09461, section 6 of docs/methods/tome.md).

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
from typing import List, Optional, Sequence

import torch
from PIL import Image

# the painting and picture helpers live in tools/_visualize.py; imported from here by the other tools
from tools._visualize import (  # noqa: F401
    group_colours, load_image, make_visualization, model_input, side_by_side, synthetic_image, unmerged_sources)
from utils.errors import UserError


def visualize(model: torch.nn.Module, images: Sequence[Image.Image], r, start_idx: int = 0,
              mean=None, std=None) -> List[Image.Image]:
    """Patch `model` with ToMe (trace_source) and return one side-by-side picture per image."""
    from models import tome
    tome.patch(model, r=r, start_idx=start_idx, trace_source=True)
    model.eval()
    device = next(model.parameters()).device
    patch_size = model.patch_embed.patch_size[0]
    prefix = int(getattr(model, "cls_token", None) is not None) + int(getattr(model, "dist_token", None) is not None)
    results = []
    for img in images:
        x = model_input([img], mean, std, device)
        with torch.no_grad():
            model(x)
        source = model._tome_info["source"]
        if source is None:  # nothing merged: every patch is its own group
            source = unmerged_sources(x, patch_size, prefix)
        vis = make_visualization(img, source, patch_size, num_prefix_tokens=prefix)
        results.append(side_by_side([img, vis]))
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
    from tools import _common, _visualize
    parser, g = _visualize.visualizer_parser("tome_visualize", __doc__, DEFAULT_MODEL, "tome_groups.png",
                                             method_flags=False, title="ToMe and output")
    g.add_argument(*_common.spellings("--tome-r"), dest="tome_r", type=_parse_r, default=13,
                   help="tokens merged per block: int, '(r, inflect)' or a list such as '[25] * 8'")
    g.add_argument(*_common.spellings("--tome-start-idx"), dest="tome_start_idx", type=int, default=0,
                   help="attention blocks left unpatched at the start")
    return parser


DEFAULT_MODEL = "deit_small_patch16_224"


def run(args) -> int:
    from tools import _visualize
    model = _visualize.build_model(args, DEFAULT_MODEL, apply_patches=False).model

    def draw(images):
        try:
            return visualize(model, images, args.tome_r, args.tome_start_idx)
        except ValueError as err:
            raise UserError(f"--tome-r {args.tome_r!r}: {str(err).splitlines()[0]}") from None

    return _visualize.draw_and_write(args, model, draw)


def main(argv: Optional[list] = None) -> int:
    from tools import _common
    return _common.run_cli(build_parser, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
