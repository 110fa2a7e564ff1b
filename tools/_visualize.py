"""What the token visualisation tools share (`tools/*_visualize.py`).

Pictures in: `--images` files resized and centre-cropped to the model's input size, or one
synthetic test picture (`read_images`), turned into normalised model inputs (`model_input`);
normalised validation batches turned back into pictures (`to_pictures`).
Pictures out: token groups painted as ToMe's `make_visualization` does (every group's interior
with its mean image colour, its border with a random colour per group, `random.seed(0)`),
panels side by side (`side_by_side`), written to `--out` or `<out stem>_<i>.png` for several
images (`write_pictures`). `visualizer_parser` gives every tool main.py's model flags plus
`--images` and `--out`; `draw_and_write` is the end of every tool's `run`.
"""
from __future__ import annotations

import argparse
import logging
import os
import random
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy.ndimage import binary_erosion

from utils.errors import UserError

_logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------
# Pictures in
# ---------------------------------------------------------------------------

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


def read_images(paths: Sequence[str], size: int) -> List[Image.Image]:
    """The `--images` files at `size` x `size` px, or one synthetic picture when none are given."""
    try:
        return [load_image(p, size) for p in paths] or [synthetic_image(size)]
    except OSError as err:
        raise UserError(f"cannot read --images file: {err}") from None


def model_input(images: Sequence[Image.Image], mean=None, std=None,
                device: Optional[torch.device] = None) -> torch.Tensor:
    """`[B, 3, H, W]` model input of RGB pictures: pixels in [0, 1] normalised by mean / std
    (default: ImageNet's)."""
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    mean = torch.tensor(mean or IMAGENET_DEFAULT_MEAN).view(3, 1, 1)
    std = torch.tensor(std or IMAGENET_DEFAULT_STD).view(3, 1, 1)
    batch = torch.stack([(torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1) - mean) / std
                         for img in images])
    return batch if device is None else batch.to(device)


def to_pictures(batch: torch.Tensor, mean=None, std=None) -> List[Image.Image]:
    """The RGB pictures of normalised model inputs `[B, 3, H, W]` (the inverse of `model_input`,
    pixels clamped to [0, 1]); used to draw validation images that a data loader normalised."""
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    mean = torch.tensor(mean or IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(std or IMAGENET_DEFAULT_STD).view(1, 3, 1, 1)
    pixels = (batch.detach().float().cpu() * std + mean).clamp(0, 1)
    return [Image.fromarray(np.uint8(image.permute(1, 2, 0).numpy() * 255)) for image in pixels]


def unmerged_sources(x: torch.Tensor, patch_size: int, num_prefix_tokens: int) -> torch.Tensor:
    """Source maps `[B, T0, T0]` of a forward that merged nothing: every token is its own group."""
    tokens = num_prefix_tokens + (x.shape[-2] // patch_size) * (x.shape[-1] // patch_size)
    return torch.eye(tokens)[None].expand(x.shape[0], -1, -1)


# ---------------------------------------------------------------------------
# Pictures out
# ---------------------------------------------------------------------------

def group_colours(num_groups: int) -> List[tuple]:
    """One random RGB triple in [0, 1) per group id, seeded like ToMe's (`random.seed(0)`)."""
    random.seed(0)
    return [(random.random(), random.random(), random.random()) for _ in range(num_groups)]


def make_visualization(img: Image.Image, source: torch.Tensor, patch_size: int = 16,
                       class_token: bool = True, num_prefix_tokens: Optional[int] = None,
                       pruned_brightness: float = 0.0) -> Image.Image:
    """Paint the token groups of one image.

    img: the model input as a PIL image (H, W multiples of `patch_size`).
    source: `[T, T0]` (or `[1, T, T0]`) 0/1 map of final groups over original tokens.
    The first `num_prefix_tokens` original tokens (default 1 if `class_token`, else 0;
    2 for a distilled DeiT) are not patches and are left out. A patch in no group (pruned)
    keeps `pruned_brightness` of its pixels.
    """
    pixels = np.asarray(img.convert("RGB"), dtype=np.float64) / 255.0
    height, width, _ = pixels.shape
    source = source.detach().float().cpu()
    if source.dim() == 3:
        source = source[0]
    prefix = (1 if class_token else 0) if num_prefix_tokens is None else num_prefix_tokens
    source = source[:, prefix:]
    group_of_patch = torch.where(source.sum(dim=0) > 0, source.argmax(dim=0),
                                 torch.full_like(source[0], -1).long())  # [P], -1: pruned
    colours = group_colours(max(int(group_of_patch.max()) + 1, 1))
    grid = group_of_patch.view(1, 1, height // patch_size, width // patch_size).float()
    group_map = F.interpolate(grid, size=(height, width), mode="nearest")[0, 0].long().numpy()
    out = pixels * pruned_brightness
    for group in np.unique(group_map):
        if group < 0:
            continue
        mask = group_map == group
        interior = binary_erosion(mask)
        out[interior] = pixels[mask].mean(axis=0)
        out[mask & ~interior] = colours[group]
    return Image.fromarray(np.uint8(np.clip(out, 0, 1) * 255))


def side_by_side(panels: Sequence[Image.Image]) -> Image.Image:
    """The panels (all of one size) in one row, left to right."""
    width, height = panels[0].size
    strip = Image.new("RGB", (width * len(panels), height))
    for i, panel in enumerate(panels):
        strip.paste(panel, (width * i, 0))
    return strip


def write_pictures(pictures: Sequence[Image.Image], out: str) -> List[str]:
    """Save to `out` (one picture) or `<out stem>_<i><ext>`; the paths are printed, one a line."""
    stem, ext = os.path.splitext(out)
    paths = [out] if len(pictures) == 1 else [f"{stem}_{i}{ext or '.png'}" for i in range(len(pictures))]
    for picture, path in zip(pictures, paths):
        picture.save(path)
        _logger.info("wrote %s", path)
    print("\n".join(paths))
    return paths


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------

def visualizer_parser(prog: str, description: str, default_model: str, default_out: str, *,
                      method_flags: bool = True,
                      title: str = "output") -> Tuple[argparse.ArgumentParser, argparse._ArgumentGroup]:
    """(parser, its `title` group): main.py's model flags (`tools._common.add_model_args`),
    `--images` and `--out`; the tool adds its own options to the group."""
    from tools import _common
    parser = _common.ToolParser(prog, description)
    _common.add_model_args(parser, default_model, checkpoint_help="weights to load strictly",
                           method_flags=method_flags)
    group = parser.add_argument_group(title)
    group.add_argument("--images", nargs="*", default=[], help="image files (default: one synthetic image)")
    group.add_argument("--out", "--output", dest="out", default=default_out,
                       help="output PNG; several images give <stem>_<i>.png")
    return parser, group


def build_model(args, default_model: str, **kwargs):
    """`tools._common.build_model`, with `--out` checked first (before any work is done)."""
    from tools import _common
    _common.check_output_file(args.out, "--out")
    check_picture_path(args.out)
    return _common.build_model(args, default_model, **kwargs)


def check_picture_path(out: str) -> None:
    """UserError unless PIL can write `out` (its extension names an image format, e.g. .png)."""
    from PIL import Image
    from utils.errors import UserError

    Image.init()
    extension = os.path.splitext(out)[1].lower()
    if extension not in Image.registered_extensions():
        raise UserError(f"--out {out}: {extension or 'no extension'} is not an image format; "
                        "end the name with .png (or .jpg)")


def draw_and_write(args, model: torch.nn.Module,
                   draw: Callable[[List[Image.Image]], Sequence[Image.Image]]) -> int:
    """The end of a tool's `run`: the `--images` at the model's input size, `draw(images)`, written to `--out`."""
    images = read_images(args.images, int(model.patch_embed.img_size[0]))
    write_pictures(draw(images), args.out)
    return 0
