"""Visualise and export what the TokenReduction models keep or merge (Haurum et al., ICCVW 2023).

Two uses:

* a picture: the input next to one panel per reduction location. Top-K greys out the patches
  dropped so far; the merging methods (K-Medoids, DPC-KNN, Sinkhorn, PatchMerger) paint every
  group of original patches that ended in one token (its interior with the group's mean
  colour, its border with one colour per token), the assignment composed over the locations.
  K-Medoids / DPC-KNN centres (the medoid or density peak of each cluster, traced back to an
  original patch) are marked white.

      python -m tools.tokenreduction_visualize --model kmedoids_small_patch16_224 --keep_rate 0.7 \\
          --checkpoint run/best_checkpoint.pth --images cat.jpg --out clusters.png

  The model name, num_classes and method flags default to those a main.py checkpoint's saved
  args hold (main.py's flag names). Without `--images` a synthetic test image is used; several
  images give `<out stem>_<i>.png`.

* main.py's `--viz_mode` (with `--eval`): the official validate.py JSON, one entry per
  validation image (top-5 predictions, target, the batch's mean loss, and per location the
  kept / centre tokens as original patch indices and the assignment map), written to
  `<output_dir>/<run name>_viz_results.json` with the run name the checkpoint's directory name,
  as validate_dirs.py names it (`viz_results_command`).
"""
from __future__ import annotations

import json
import logging
import os
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy.ndimage import binary_erosion

from tools._visualize import (build_model, draw_and_write, group_colours, model_input, side_by_side,
                               visualizer_parser)
from utils.errors import UserError

_logger = logging.getLogger(__name__)

DEFAULT_MODEL = "kmedoids_small_patch16_224"
DROPPED_GREY = 0.85


# ---------------------------------------------------------------------------
# Which token every original patch ends in
# ---------------------------------------------------------------------------

def viz_forward(model: torch.nn.Module, images: torch.Tensor):
    """(logits, viz_data) of the model's official viz mode, whatever its `viz_mode` was."""
    previous, model.viz_mode = model.viz_mode, True
    model.eval()
    try:
        with torch.no_grad():
            return model(images)
    finally:
        model.viz_mode = previous


def patch_groups(model: torch.nn.Module, viz: dict, num_patches: int) -> Dict[int, np.ndarray]:
    """Per reduction location l, `[B, P]`: the token (after l) holding each original patch, -1 if dropped.

    Top-K composes the kept indices (a patch not kept is dropped for good); the merging methods
    compose the assignment maps (`Assignment_Maps[l]` `[B, N_in]`: each input token's cluster).
    """
    groups: Dict[int, np.ndarray] = {}
    current: Optional[np.ndarray] = None
    for loc in model.get_reduction_count():
        if "Soft_Assignment_Maps" in viz or "Assignment_Maps" in viz:
            assign = viz["Assignment_Maps"][loc]  # [B, N_in]
            if current is None:
                current = np.broadcast_to(np.arange(num_patches), assign.shape).copy()
            current = np.where(current >= 0, np.take_along_axis(assign, np.maximum(current, 0), 1), -1)
        else:
            if loc not in viz["Kept_Tokens"]:  # a location whose count equals the current one: no-op
                continue
            kept = viz["Kept_Tokens"][loc]  # [B, K] indices into the previous tokens
            if current is None:
                current = np.broadcast_to(np.arange(num_patches), (kept.shape[0], num_patches)).copy()
            remap = np.full((kept.shape[0], max(int(current.max()), int(kept.max())) + 1), -1)
            for b in range(kept.shape[0]):
                remap[b, kept[b]] = np.arange(kept.shape[1])
            current = np.where(current >= 0, np.take_along_axis(remap, np.maximum(current, 0), 1), -1)
        groups[loc] = current.copy()
    return groups


def centre_patches(model: torch.nn.Module, viz: dict) -> Dict[int, np.ndarray]:
    """K-Medoids / DPC-KNN: per location `[B, K]` the original patch index of every centre token
    (validate.py's composed "Kept_Token"); Top-K: the kept patches. {} for the soft methods."""
    if "Kept_Tokens" not in viz:
        return {}
    out: Dict[int, np.ndarray] = {}
    previous = None
    for loc in model.get_reduction_count():
        if loc not in viz["Kept_Tokens"]:
            continue
        rel = viz["Kept_Tokens"][loc]
        previous = rel if previous is None else np.take_along_axis(previous, rel, 1)
        out[loc] = previous
    return out


# ---------------------------------------------------------------------------
# Pictures
# ---------------------------------------------------------------------------

def paint(img: Image.Image, group: np.ndarray, grid: tuple, patch_size: int,
          centres: Optional[np.ndarray] = None, merging: bool = True) -> Image.Image:
    """One panel: `group` `[P]` (token of each patch, -1 dropped) drawn on `img`."""
    pixels = np.asarray(img.convert("RGB"), dtype=np.float64) / 255.0
    height, width = grid[0] * patch_size, grid[1] * patch_size
    pixels = pixels[:height, :width]
    full = torch.from_numpy(group.reshape(grid)).float()[None, None]
    full = F.interpolate(full, size=(height, width), mode="nearest")[0, 0].long().numpy()
    out = pixels.copy()
    dropped = full < 0
    out[dropped] = 0.9 * DROPPED_GREY + 0.1 * pixels[dropped]
    if merging:
        colours = group_colours(int(full.max()) + 1)
        for token in np.unique(full[~dropped]):
            mask = full == token
            interior = binary_erosion(mask)
            out[interior] = pixels[mask].mean(axis=0)
            out[mask & ~interior] = colours[token]
    if centres is not None:
        for patch in np.asarray(centres).reshape(-1):
            row, col = divmod(int(patch), grid[1])
            y, x = row * patch_size + patch_size // 2, col * patch_size + patch_size // 2
            r = max(patch_size // 6, 1)
            out[max(y - r, 0):y + r + 1, max(x - r, 0):x + r + 1] = 1.0
    return Image.fromarray(np.uint8(np.clip(out, 0, 1) * 255))


def visualize(model: torch.nn.Module, images: Sequence[Image.Image], mean=None, std=None) -> List[Image.Image]:
    """One strip per image: the input, then one panel per reduction location."""
    device = next(model.parameters()).device
    patch_size = model.patch_embed.patch_size[0]
    batch = model_input(images, mean, std, device)
    grid = tuple(model.patch_embed.dynamic_feat_size(batch.shape[-2:]))
    _, viz = viz_forward(model, batch)
    groups = patch_groups(model, viz, grid[0] * grid[1])
    centres = centre_patches(model, viz)
    merging = "Assignment_Maps" in viz
    return [side_by_side([img] + [paint(img, groups[loc][i], grid, patch_size,
                                        centres[loc][i] if merging and loc in centres else None, merging)
                                  for loc in groups])
            for i, img in enumerate(images)]


# ---------------------------------------------------------------------------
# main.py --viz_mode: validate.py's JSON
# ---------------------------------------------------------------------------

def run_name(context) -> str:
    """validate_dirs.py names the JSON after the run directory holding best_checkpoint.pth."""
    checkpoint = getattr(context, "resume", None) or getattr(context, "finetune", None)
    if checkpoint:
        return os.path.basename(os.path.dirname(os.path.abspath(checkpoint))) or "run"
    return str(getattr(context, "model", "model"))


def viz_results(model: torch.nn.Module, data_loader, device, image_names: Sequence[str], model_name: str,
                keep_rate, reduction_loc, amp: bool = False) -> dict:
    """The official validate.py record of one model over a data loader (a JSON-ready dict)."""
    model.eval()
    record = {"Model": model_name, "Ratio": _plain(keep_rate), "Location": _plain(reduction_loc)}
    correct1 = correct5 = count = 0
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    for batch in data_loader:
        images, target = batch[0].to(device), batch[1].to(device)
        with torch.autocast(device.type, dtype=dtype, enabled=amp):
            logits, viz = viz_forward(model, images)
        logits = logits.float()
        loss = F.cross_entropy(logits, target).item()
        pred = logits.topk(5, dim=1).indices
        correct1 += (pred[:, 0] == target).sum().item()
        correct5 += (pred == target[:, None]).any(dim=1).sum().item()
        centres = centre_patches(model, viz)
        for i in range(images.shape[0]):
            entry = {"Predictions": pred[i].tolist(), "Target": int(target[i]), "Loss": loss}
            for loc in model.get_reduction_count():
                stage = {}
                if loc in centres:
                    stage["Kept_Token"] = centres[loc][i].tolist()
                if "Assignment_Maps" in viz and loc in viz["Assignment_Maps"]:
                    stage["Assignment_Maps"] = viz["Assignment_Maps"][loc][i].tolist()
                entry[f"Stage-{loc}"] = stage
            record[image_names[count + i]] = entry
        count += images.shape[0]
    record["Top1-Acc"] = round(100.0 * correct1 / max(count, 1), 4)
    record["Top5-Acc"] = round(100.0 * correct5 / max(count, 1), 4)
    record["Params"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 2)
    return record


def _plain(value):
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _image_names(dataset, count: int) -> List[str]:
    samples = getattr(dataset, "samples", None)
    if samples is not None:
        return [os.path.basename(path) for path, _ in samples]
    return [str(i) for i in range(count)]


def viz_results_command(model: torch.nn.Module, context) -> None:
    """main.py's `--viz_mode`: write `<output_dir>/<run name>_viz_results.json`."""
    if not context.output_dir:
        raise UserError("--viz_mode writes <output_dir>/<run name>_viz_results.json; give --output_dir")
    loader = context.data_loader
    names = _image_names(loader.dataset, len(loader.dataset))
    record = viz_results(model, loader, context.device, names, context.model, list(model.keep_rate),
                         list(model.get_reduction_count()), bool(getattr(context, "amp", False)))
    path = os.path.join(context.output_dir, f"{run_name(context)}_viz_results.json")
    with open(path, "w") as f:
        json.dump(record, f, indent=4)
    _logger.info(f"--viz_mode: per-image predictions and kept tokens of {len(names)} images -> {path} "
                 f"(Acc@1 {record['Top1-Acc']:.3f})")


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------

def build_parser():
    parser, _ = visualizer_parser("tokenreduction_visualize", __doc__, DEFAULT_MODEL, "tokenreduction_tokens.png",
                                  title="images and output")
    return parser


def run(args) -> int:
    loaded = build_model(args, DEFAULT_MODEL)
    if not hasattr(loaded.model, "get_reduction_count"):
        raise UserError(f"--model {loaded.name} is not a TokenReduction model (topk_/kmedoids_/dpcknn_/sinkhorn_/"
                        f"patchmerger_*)")
    return draw_and_write(args, loaded.model, lambda images: visualize(loaded.model, images))


def main(argv: Optional[list] = None) -> int:
    from tools import _common
    return _common.run_cli(build_parser, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
