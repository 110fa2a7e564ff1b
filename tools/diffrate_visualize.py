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

from typing import Dict, List, Optional, Sequence

import torch
from PIL import Image

from tools._visualize import make_visualization, model_input, side_by_side
from utils.errors import UserError

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
    return make_visualization(img, source, patch_size, num_prefix_tokens=1, pruned_brightness=PRUNED_BRIGHTNESS)


def visualize(model: torch.nn.Module, images: Sequence[Image.Image], blocks: Sequence[int],
              mean=None, std=None) -> List[Image.Image]:
    """One strip (input | the groups after each block of `blocks`) per image."""
    device = next(model.parameters()).device
    patch_size = int(model.patch_embed.patch_size[0])
    results = []
    for img in images:
        maps = source_maps(model, model_input([img], mean, std, device), blocks)
        results.append(side_by_side([img] + [paint(img, maps[block][0], patch_size) for block in blocks]))
    return results


def build_parser():
    from tools import _visualize
    parser, g = _visualize.visualizer_parser("diffrate_visualize", __doc__, DEFAULT_MODEL, "diffrate_tokens.png")
    g.add_argument("--blocks", type=int, nargs="+", default=[3, 6, 9],
                   help="show the tokens left after each of these numbers of blocks")
    return parser


def run(args) -> int:
    from models import diffrate
    from tools import _visualize

    loaded = _visualize.build_model(args, DEFAULT_MODEL)
    model = loaded.model
    if not diffrate.is_patched(model):
        raise UserError(f"--model {loaded.name} has no DiffRate schedule; use a vit_deit_*_patch16_224 model or "
                        f"give --diffrate-flops F")
    depth = len(model.blocks)
    bad = [block for block in args.blocks if not 1 <= block <= depth]
    if bad:
        raise UserError(f"--blocks {bad[0]} is outside 1..{depth} (the model has {depth} blocks)")
    return _visualize.draw_and_write(args, model, lambda images: visualize(model, images, args.blocks))


def main(argv: Optional[list] = None) -> int:
    from tools import _common
    return _common.run_cli(build_parser, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
