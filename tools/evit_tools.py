"""EViT tools (arXiv 2202.07800): the speed/MACs test and the kept-patch visualisation.

Both are called from `main.py` (`--test_speed` / `--only_test_speed`,
`--visualize_mask --n_visualization N`) and also run standalone:

    python -m tools.evit_tools speed --model deit_small_patch16_shrink_base --fuse_token --output_dir out
    python -m tools.evit_tools visualize --resume output_dir/checkpoint.pth \\
        [--data-path IMAGENET_VAL_FOLDER] --n_visualization 8 --output_dir out

The model name and its options (--base_keep_rate, --drop_loc, --fuse_token, --model-kwargs)
default to those a main.py checkpoint's saved args hold.

Speed test (docs/methods/evit.md): three runs of `passes` forward passes on a random
batch in eval mode (without `no_grad`, like the official code); the first run is a
warm-up; throughput of the last is kept; MACs with torchprofile on one image.
Visualisation: unlike the official script, patches fused into the extra token are
shown in their own colour (the official code maps the fused token to patch 0).
"""
from __future__ import annotations

import argparse
import logging
import os
import warnings
from typing import List, Optional

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn

from models.token_ops import track_token_positions
from utils.distributed import loader_batches, unwrap_model

_logger = logging.getLogger(__name__)

FUSED_COLOUR = (1.0, 0.55, 0.0)  # orange tint for patches held by the fused token
DROPPED_BRIGHTNESS = 0.2


_unwrap = unwrap_model


def _img_size(model: nn.Module, args) -> tuple:
    size = getattr(args, "input_size", None)
    if size:
        return (size, size) if isinstance(size, int) else tuple(size)
    return tuple(_unwrap(model).patch_embed.img_size)


def measure_throughput(model: nn.Module, batch_size: int, img_size: tuple, device: torch.device,
                       passes: int) -> float:
    """Images per second of `passes` forward passes in eval mode (the benchmark's one timer)."""
    from utils.measure import measure_inference
    result = measure_inference(model, batch_size, img_size, torch.device(device), warmup=0, rounds=1,
                               iters_per_round=passes)
    return float(result["throughput"]["median"])


def count_gmacs(model: nn.Module, img_size: tuple, device: torch.device) -> float:
    """GMACs of one image with torchprofile (falls back to `flops.count_flops` if it is missing)."""
    try:
        from torchprofile import profile_macs
    except ImportError:
        from models import flops
        return float(flops.count_flops(model, img_size[0])["gmacs"])
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchprofile warns about ops without MACs (topk, unbind)
        return profile_macs(model, torch.randn(1, 3, *img_size, device=device)) * 1e-9


def run_speed_test(model: nn.Module, args, device) -> dict:
    """EViT's `--test_speed`: log throughput and GMACs and append them to `output_dir/speed_macs.txt`."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    img_size = _img_size(model, args)
    on_gpu = device.type == "cuda"
    batch_size = 64 if on_gpu else 4
    passes = 100 if on_gpu else 5
    throughput = 0.0
    for run in range(3):
        throughput = measure_throughput(model, batch_size, img_size, device, passes)
        _logger.info("speed test run %d%s: %.1f img/s (batch %d, %d passes)", run,
                     " (warm-up, inaccurate)" if run == 0 else "", throughput, batch_size, passes)
    gmacs = count_gmacs(model, img_size, device)
    _logger.info("inference_speed: %.2f img/s, GMACs: %.4f", throughput, gmacs)
    model.train(was_training)
    output_dir = getattr(args, "output_dir", None)
    if output_dir:
        os.makedirs(output_dir, exist_ok=True)
        with open(os.path.join(output_dir, "speed_macs.txt"), "a") as f:
            f.write(f"inference_speed: {throughput} GMACs: {gmacs}\n")
            f.write(f"args: {args}\n")
    return {"inference_speed": throughput, "gmacs": gmacs}


def speed_test_command(model: nn.Module, context) -> None:
    """main.py's `--test_speed` / `--only_test_speed` (a command the EViT family names)."""
    run_speed_test(model, context, context.device)


def visualize_mask_command(model: nn.Module, context) -> None:
    """main.py's `--visualize_mask`."""
    visualize_mask(model, context.data_loader, context, context.device)


def patch_states(idxs: List[torch.Tensor], num_patches: int, fused: bool) -> List[torch.Tensor]:
    """Per drop location, the state of every original patch: `[B, P]` with 1 = kept as
    its own token, 2 = inside a fused token (this location's or an earlier one that was
    kept), 0 = dropped.

    idxs: the `get_idx=True` index tensors (each relative to that block's non-prefix tokens).
    """
    if not idxs:
        return []
    batch = idxs[0].shape[0]
    positions = torch.arange(num_patches, device=idxs[0].device).expand(batch, -1)
    in_fused = torch.zeros(batch, num_patches, dtype=torch.bool, device=positions.device)
    states, num_tokens = [], num_patches
    for idx in idxs:
        positions = track_token_positions(positions, idx, num_tokens, fused)
        keep = idx.shape[1]
        in_fused = (in_fused | (positions == keep)) & (positions >= 0)
        state = torch.where(positions >= 0, 1, 0)
        states.append(torch.where(in_fused, 2, state))
        num_tokens = keep + int(fused)
    return states


def render_patch_state(image: torch.Tensor, state: torch.Tensor, patch_size: int) -> torch.Tensor:
    """image `[3, H, W]` in [0, 1], state `[P]` (see `patch_states`) -> shaded image `[3, H, W]`."""
    _, height, width = image.shape
    grid = state.view(1, 1, height // patch_size, width // patch_size).float()
    mask = torch.nn.functional.interpolate(grid, size=(height, width), mode="nearest")[0]
    colour = torch.tensor(FUSED_COLOUR, device=image.device).view(3, 1, 1)
    out = torch.where(mask == 0, image * DROPPED_BRIGHTNESS, image)
    return torch.where(mask == 2, 0.5 * image + 0.5 * colour, out)


def visualize_mask(model: nn.Module, data_loader, args, device) -> dict:
    """Write `output_dir/visualize_mask/img_{n}.png`: original, then one panel per drop location."""
    from torchvision.utils import save_image
    try:
        from utils.distributed import get_rank, get_world_size
        rank, world = get_rank(), get_world_size()
    except ImportError:
        rank, world = 0, 1
    net = _unwrap(model)
    if not hasattr(net, "forward_features_with_idx"):
        from utils.errors import UserError
        raise UserError(f"--visualize_mask needs an EViT model (*_patch16_shrink_base), got {type(net).__name__}")
    net.eval()
    out_dir = os.path.join(getattr(args, "output_dir", None) or ".", "visualize_mask")
    os.makedirs(out_dir, exist_ok=True)
    limit = getattr(args, "n_visualization", 128)
    patch_size = net.patch_embed.patch_size[0]
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD, device=device).view(1, 3, 1, 1)
    correct = seen = written = 0
    with torch.no_grad(), loader_batches(data_loader) as batches:
        for batch_idx, (images, targets) in enumerate(batches):
            images, targets = images.to(device), targets.to(device)
            logits, idxs = net(images, get_idx=True)
            correct += (logits.argmax(-1) == targets).sum().item()
            seen += targets.numel()
            batch = images.shape[0]
            pixels = (images * std + mean).clamp(0, 1)
            num_patches = (images.shape[2] // patch_size) * (images.shape[3] // patch_size)
            states = patch_states(idxs, num_patches, net.fuse_token)
            for i in range(batch):
                n = world * batch * batch_idx + rank * batch + i
                panels = [pixels[i]] + [render_patch_state(pixels[i], s[i], patch_size) for s in states]
                save_image(torch.stack(panels), os.path.join(out_dir, f"img_{n}.png"), nrow=len(panels), padding=2)
                written += 1
            if world * batch * (batch_idx + 1) >= limit:
                break
    accuracy = 100.0 * correct / max(seen, 1)
    _logger.info("visualize_mask: %d images written to %s; Acc@1 of visited batches %.2f", written, out_dir, accuracy)
    return {"written": written, "acc1": accuracy, "output_dir": out_dir}


# ---------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------

DEFAULT_MODEL = "deit_small_patch16_shrink_base"


def _build_model(args) -> nn.Module:
    from tools import _common
    import timm

    import models  # noqa: F401  (registers the models)
    evit_models = timm.list_models("*_shrink_base")
    return _common.build_model(args, DEFAULT_MODEL, supported=evit_models).model


def _loader(args, img_size: int):
    from torch.utils.data import DataLoader, TensorDataset
    if args.data_path:
        from timm.data import create_transform
        from torchvision.datasets import ImageFolder
        dataset = ImageFolder(args.data_path, transform=create_transform(img_size, is_training=False))
    else:
        generator = torch.Generator().manual_seed(0)
        images = torch.randn(args.n_visualization, 3, img_size, img_size, generator=generator)
        dataset = TensorDataset(images, torch.zeros(args.n_visualization, dtype=torch.long))
    return DataLoader(dataset, batch_size=args.batch_size, shuffle=False)


class _DropLocAction(argparse.Action):
    """--drop_loc "(3, 6, 9)" as main.py takes it, or the old tool spelling --drop_loc 3 6 9."""

    def __call__(self, parser, namespace, values, option_string=None):
        import ast
        joined = " ".join(values)
        for text in (joined, ", ".join(values)):
            try:
                value = ast.literal_eval(text.strip())
            except (ValueError, SyntaxError):
                continue
            value = (value,) if isinstance(value, int) else value
            if isinstance(value, (list, tuple)) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
                setattr(namespace, self.dest, tuple(value))
                return
        parser.error(f"{option_string} {joined!r} is not a tuple of block indices such as \"(3, 6, 9)\"")


def build_parser() -> argparse.ArgumentParser:
    from tools import _common
    parser = _common.ToolParser("evit_tools", __doc__)
    parser.add_argument("command", choices=("speed", "visualize"), help="speed/MACs test or kept-patch pictures")
    _common.add_model_args(parser, DEFAULT_MODEL, checkpoint_help="weights to load strictly",
                           model_help="an EViT model (*_shrink_base)")
    parser.add_argument(*_common.spellings("--drop_loc"), dest="drop_loc", nargs="+", action=_DropLocAction,
                        default=None, metavar="LOC",
                        help='EViT drop locations, "(3, 6, 9)" as in main.py or 3 6 9 '
                             "(default: the checkpoint's, else the model's)")
    g = parser.add_argument_group("run")
    g.add_argument(*_common.spellings("--data-path"), dest="data_path", default=None,
                   help="image folder (default: random images)")
    g.add_argument(*_common.spellings("--batch-size"), "-b", dest="batch_size", type=int, default=8,
                   help="visualisation batch size")
    g.add_argument(*_common.spellings("--n_visualization"), dest="n_visualization", type=int, default=8,
                   help="images to visualise")
    g.add_argument(*_common.spellings("--output_dir"), dest="output_dir", default="evit_tools_out",
                   help="where speed_macs.txt and visualize_mask/ go")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    return parser


def run(args) -> int:
    model = _build_model(args).to(args.device)
    if args.command == "speed":
        result = run_speed_test(model, args, args.device)
        print(f"inference_speed: {result['inference_speed']:.2f} GMACs: {result['gmacs']:.4f}")
    else:
        img_size = args.input_size or int(_unwrap(model).patch_embed.img_size[0])
        result = visualize_mask(model, _loader(args, img_size), args, torch.device(args.device))
        print(f"wrote {result['written']} images to {result['output_dir']}")
    return 0


def main(argv: Optional[list] = None) -> int:
    from tools import _common
    return _common.run_cli(build_parser, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
