"""Heat maps of LTM merging weights (Wang & Yang, "Efficient Visual Transformer by Learnable
Token Merging", TPAMI 2025; cf. the paper's token figure, docs/methods/ltm.md fact 2).

For one LTM block and a few images, draws the input image next to, for each of a few target
(merged) tokens j, the weights G[i, t] with which every source token i on the block's (h, w)
grid feeds j. MobileViT runs one sequence per pixel offset of its 2x2 patches; their maps are
averaged.

    python -m tools.ltm_visualize --model ltm_mobilevit_s --checkpoint ltm_mvit_s.pth \\
        --images a.jpg b.jpg --out merge_weights.png

The model, --compression-ratio, num_classes and model kwargs default to those a main.py
checkpoint's saved args hold.

Without --images, random noise images are used (a smoke test of the pipeline).
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import List, Optional, Sequence

import torch

from utils.errors import UserError

_logger = logging.getLogger(__name__)


def target_weight_maps(model: torch.nn.Module, images: torch.Tensor, block_name: str,
                       targets: Sequence[int]) -> dict:
    """Source weights of the given targets in one LTM block.

    Returns {"maps": (n_images, n_targets, h, w) tensor, "grid": (h, w), "merged": (h', w'),
    "targets": list}. Raises ValueError when the block does not merge at this input size.
    """
    from models.ltm import MaskState

    blocks = dict(model.named_modules())
    if block_name not in blocks or not hasattr(blocks[block_name], "mask_module"):
        raise ValueError(f"{block_name!r} is not an LTM block of {type(model).__name__}; "
                         "list them with models.ltm.ltm_blocks(model)")
    captured: List[MaskState] = []

    def keep_first(module, args, state):
        if not captured:
            captured.append(state)

    handle = blocks[block_name].mask_module.register_forward_hook(keep_first)
    try:
        with torch.no_grad():
            model.eval()(images)
    finally:
        handle.remove()
    if not captured:
        raise ValueError(f"block {block_name} does not merge at this input size (its merged grid equals its grid); "
                         "pick another block or a smaller --compression-ratio")
    state = captured[0]
    (h, w), merged = state.table.grid, state.table.merged
    if any(not 0 <= t < merged[0] * merged[1] for t in targets):
        raise ValueError(f"targets must lie in [0, {merged[0] * merged[1]}) for the merged grid {merged}")
    mask = state.mask.float()
    rows_per_image = mask.shape[0] // images.shape[0]
    weights = []
    for target in targets:
        hit = (state.table.index == target) & state.table.valid  # (h*w, 9)
        weights.append((mask * hit).sum(-1))  # (rows, h*w)
    maps = torch.stack(weights, dim=1)  # (rows, n_targets, h*w)
    maps = maps.reshape(images.shape[0], rows_per_image, len(targets), h, w).mean(1)
    return {"maps": maps, "grid": (h, w), "merged": merged, "targets": list(targets)}


def default_targets(merged, count: int) -> List[int]:
    """``count`` targets spread over the merged grid (centre first, then the quarter points)."""
    h2, w2 = merged
    points = [(h2 // 2, w2 // 2), (h2 // 4, w2 // 4), (h2 // 4, 3 * w2 // 4),
              (3 * h2 // 4, w2 // 4), (3 * h2 // 4, 3 * w2 // 4)]
    seen, chosen = set(), []
    for y, x in points:
        index = y * w2 + x
        if index not in seen:
            seen.add(index)
            chosen.append(index)
    return chosen[:max(1, count)]


def plot_weight_maps(images: torch.Tensor, result: dict, path: str, title: str = "") -> None:
    """One row per image: the image, then one heat map per target (its anchor cell marked)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    maps, targets = result["maps"], result["targets"]
    (h, w), (h2, w2) = result["grid"], result["merged"]
    n_images, n_targets = maps.shape[0], len(targets)
    vmax = max(float(maps.max()), 1e-6)  # one colour scale for every panel
    fig, axes = plt.subplots(n_images, n_targets + 1, figsize=(2.2 * (n_targets + 1), 2.2 * n_images),
                             squeeze=False)
    for row in range(n_images):
        image = images[row].float()
        image = (image - image.min()) / (image.max() - image.min()).clamp_min(1e-8)
        axes[row][0].imshow(image.permute(1, 2, 0).cpu().numpy())
        axes[row][0].set_title("input" if row == 0 else "", fontsize=8)
        for col, target in enumerate(targets, start=1):
            ax = axes[row][col]
            shown = ax.imshow(maps[row, col - 1].cpu().numpy(), cmap="viridis", vmin=0.0, vmax=vmax,
                              extent=(0, w, h, 0))
            ty, tx = divmod(target, w2)
            # the target's anchor cell in source coordinates
            ax.add_patch(plt.Rectangle((tx * w / w2, ty * h / h2), w / w2, h / h2,
                                       fill=False, edgecolor="red", linewidth=1.0))
            if row == 0:
                ax.set_title(f"target ({ty},{tx})", fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(shown, ax=axes[:, -1].tolist(), fraction=0.05, label="G weight")
    fig.suptitle(title or f"merging weights G: {h}x{w} -> {h2}x{w2}", fontsize=9)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def load_images(paths: Sequence[str], model: torch.nn.Module, size: Optional[int]) -> torch.Tensor:
    from PIL import Image
    from timm.data import create_transform, resolve_data_config

    config = resolve_data_config({"input_size": (3, size, size)} if size else {}, model=model)
    transform = create_transform(**config)
    return torch.stack([transform(Image.open(p).convert("RGB")) for p in paths])


DEFAULT_MODEL = "ltm_mobilevit_s"


def build_parser() -> argparse.ArgumentParser:
    from tools import _common
    parser = _common.ToolParser("ltm_visualize", __doc__)
    _common.add_model_args(parser, DEFAULT_MODEL, checkpoint_help="LTM checkpoint (model weights), loaded strictly",
                           model_help="an ltm_* model")
    g = parser.add_argument_group("visualisation")
    g.add_argument("--block", default="", help="LTM block name (default: the first one)")
    g.add_argument("--images", nargs="*", default=[], help="image files (default: 2 random images)")
    g.add_argument(*_common.spellings("--num-targets"), dest="num_targets", type=int, default=4,
                   help="merged tokens whose source weights are drawn")
    g.add_argument("--seed", type=int, default=0, help="seed of the random images and weights")
    g.add_argument("--out", "--output", dest="out", default="ltm_merge_weights.png", help="output PNG")
    return parser


def run(args) -> str:
    import timm

    from models.ltm import ltm_blocks
    from tools import _common

    _common.check_output_file(args.out, "--out")
    torch.manual_seed(args.seed)
    import models  # noqa: F401  (registers the LTM models)
    ltm_models = [name for name in timm.list_models("ltm_*")]
    loaded = _common.build_model(args, DEFAULT_MODEL, supported=ltm_models)
    model = loaded.model
    if args.images:
        try:
            images = load_images(args.images, model, args.input_size)
        except OSError as err:
            raise UserError(f"cannot read --images file: {err}") from None
    else:
        size = args.input_size or model.pretrained_cfg["input_size"][-1]
        images = torch.rand(2, 3, size, size)
    block = args.block or ltm_blocks(model)[0][0]
    try:
        probe = target_weight_maps(model, images[:1], block, [0])
        targets = default_targets(probe["merged"], args.num_targets)
        result = target_weight_maps(model, images, block, targets)
    except ValueError as err:
        raise UserError(str(err)) from None
    plot_weight_maps(images, result, args.out, title=f"{loaded.name} {block}: G {result['grid']} -> {result['merged']}")
    _logger.info(f"wrote {args.out}")
    return args.out


def main(argv=None) -> int:
    from tools import _common
    return _common.run_cli(build_parser, lambda args: run(args) and 0, argv)


if __name__ == "__main__":
    sys.exit(main())
