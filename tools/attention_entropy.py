"""Entropy analysis and layer selection for attention shrink (reconstruction of NOSE).

Paper: "MLP Can Be A Good Transformer Learner" (CVPR 2024) picks the attention layers to
remove with NOSE, an entropy-based selection: the combination of layers whose removal
changes the information (entropy) at the output the least. The official repository ships
no selection code, only disabled entropy probes, so this tool is a RECONSTRUCTION
(docs/methods/shrink.md, "Choosing the layers"):

1. per-layer attention entropy: mean Shannon entropy (nats) of every attention
   distribution (one per image, head and query token) of each block;
2. greedy transfer-entropy selection: with H(S) the output entropy when the blocks in S
   run as deployed shrink blocks (`2x` + MLP; done here by setting their lambda to 0),
   repeatedly add the block i minimising TE_i = |H_full - H(S + {i})|, `--budget` times.
   H is `feature` (sum ln std of the final normalised cls features, float64, ddof 0) or
   `head` (sum log2 std of the logits, float32, ddof 1) - the Gaussian approximation of
   differential entropy used by the official probes.

    python -m tools.attention_entropy --model deit_small_patch16_224 --checkpoint deit_small.pth \\
        --data-set IMNET --data-path /data/imagenet --num-images 5000 --ratio 0.3 --plot entropy.png

Cost: 1 + sum_{j < k} (n - j) passes over the data for budget k and n candidates.
"""
from __future__ import annotations

import argparse
import ast
import logging
import math
import sys
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset, TensorDataset

import models  # noqa: F401  (registers the lambda models)
from models.shrink import LambdaVisionTransformer
from utils.errors import UserError

_logger = logging.getLogger("attention_entropy")

# DeiT name -> the lambda model of the same size (identical eval numerics at lambda 1).
LAMBDA_MODEL_FOR = {
    "deit_tiny_patch16_224": "deit_tiny_patch16_224_copy_lambda",
    "deit_small_patch16_224": "deit_small_patch16_224_copy_lambda",
    "deit_base_patch16_224": "deit_base_patch16_224_attn",
}
DEFAULT_RATIO = 0.3
LAMBDA_MODELS = ("deit_tiny_patch16_224_copy_lambda", "deit_small_patch16_224_copy_lambda",
                 "deit_base_patch16_224_copy_lambda", "deit_base_patch16_224_attn")


# ----------------------------------------------------------------------------- estimators (pure)

def attention_probabilities(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Softmax attention maps `[B, H, N, N]` of a timm `Attention` module for its input `x` `[B, N, C]`."""
    from models.token_ops import attention_with_keys
    found = attention_with_keys(attn, x)
    return ((found.q * attn.scale) @ found.k.transpose(-2, -1)).softmax(dim=-1)


def distribution_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (nats) of each distribution along the last dim; 0 log 0 = 0."""
    return -torch.special.xlogy(probs, probs).sum(dim=-1)


def feature_entropy(features: torch.Tensor) -> float:
    """`sum_c ln std_c` over channels of `[S, C]` samples, float64, population std (ddof 0)."""
    return torch.log(features.double().std(dim=0, correction=0)).sum().item()


def head_entropy(logits: torch.Tensor) -> float:
    """`sum_k log2 std_k` over classes of `[S, K]` logits, float32, unbiased std (ddof 1)."""
    return torch.log2(logits.float().std(dim=0, correction=1)).sum().item()


ESTIMATORS = {"feature": feature_entropy, "head": head_entropy}


def budget_from_ratio(ratio: float, depth: int) -> int:
    """Number of blocks for a removal ratio, rounded half up (README: 30% of 12 -> 4, 40% -> 5)."""
    return int(math.floor(ratio * depth + 0.5))


@dataclass(frozen=True)
class Candidate:
    step: int            # greedy step, 1-based
    block: int           # block tried at this step
    entropy: float       # H(S + {block})
    transfer: float      # |H_full - H(S + {block})|
    chosen: bool


def greedy_selection(evaluate: Callable[[tuple[int, ...]], float], candidates: Sequence[int], budget: int,
                     h_full: float) -> tuple[list[int], list[Candidate]]:
    """Greedy NOSE reconstruction: add the block of least transfer entropy, `budget` times.

    `evaluate(removed_blocks)` returns the output entropy with those blocks shrunk.
    Returns (blocks in selection order, every candidate evaluated). Ties go to the lower index.
    """
    if not 0 <= budget <= len(candidates):
        raise UserError(f"budget {budget} must be between 0 and the {len(candidates)} candidate blocks")
    selected: list[int] = []
    rows: list[Candidate] = []
    for step in range(1, budget + 1):
        trials = []
        for block in sorted(set(candidates) - set(selected)):
            entropy = evaluate(tuple(sorted(selected + [block])))
            trials.append((abs(h_full - entropy), block, entropy))
        best_transfer, best_block, _ = min(trials)
        rows += [Candidate(step, block, entropy, transfer, block == best_block) for transfer, block, entropy in trials]
        selected.append(best_block)
    return selected, rows


# ----------------------------------------------------------------------------- model and data

class AttentionEntropyMeter:
    """Forward pre-hooks on every `block.attn` accumulating the mean attention entropy per block."""

    def __init__(self, model: nn.Module):
        self.sums = [0.0] * len(model.blocks)
        self.counts = [0] * len(model.blocks)
        self.handles = [block.attn.register_forward_pre_hook(self._hook(i))
                        for i, block in enumerate(model.blocks) if hasattr(block, "attn")]

    def _hook(self, index: int):
        def hook(attn, inputs):
            entropy = distribution_entropy(attention_probabilities(attn, inputs[0]))
            self.sums[index] += entropy.double().sum().item()
            self.counts[index] += entropy.numel()
        return hook

    def means(self) -> list[float]:
        return [s / c if c else float("nan") for s, c in zip(self.sums, self.counts)]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def build_analysis_model(args) -> LambdaVisionTransformer:
    """Lambda model with every candidate block in `prune_layer`, at lambda 1 (== DeiT)."""
    from tools import _common

    def prune_candidates(name: str, kwargs: dict) -> dict:
        depth = kwargs.get("depth", 12)
        return {"prune_layer": list(range(depth)) if args.candidates is None else list(args.candidates)}

    loaded = _common.build_model(args, DEFAULT_MODEL, supported=list(LAMBDA_MODEL_FOR) + list(LAMBDA_MODELS),
                                 rename=LAMBDA_MODEL_FOR, extra_kwargs=prune_candidates)
    if loaded.checkpoint is None:
        _logger.warning("no --checkpoint: random weights, a dry run only")
    return loaded.model.eval()


def build_loader(args, img_size: int) -> DataLoader:
    if args.random_data:
        generator = torch.Generator().manual_seed(args.seed)
        images = torch.randn(args.random_data, 3, img_size, img_size, generator=generator)
        dataset = TensorDataset(images, torch.zeros(args.random_data, dtype=torch.long))
    else:
        from datasets import build_dataset
        data_args = argparse.Namespace(**vars(args))
        data_args.input_size = img_size
        dataset, _ = build_dataset(False, data_args)
        if args.num_images and args.num_images < len(dataset):
            dataset = Subset(dataset, range(args.num_images))
    return DataLoader(dataset, batch_size=args.batch_size, shuffle=False, num_workers=args.num_workers)


def _images(batch):
    return batch[0] if isinstance(batch, (list, tuple)) else batch


@torch.no_grad()
def collect_outputs(model: nn.Module, loader: Iterable, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(final normalised cls features `[S, C]`, logits `[S, K]`) over the loader."""
    features, logits = [], []
    for batch in loader:
        tokens = model.forward_features(_images(batch).to(device))
        pooled = model.forward_head(tokens, pre_logits=True)
        features.append(pooled.double().cpu())
        logits.append(model.head(pooled).float().cpu())
    return torch.cat(features), torch.cat(logits)


def set_removed_blocks(model: LambdaVisionTransformer, removed: Iterable[int]) -> None:
    """Run `removed` as deployed shrink blocks (lambda 0), the other prune blocks at lambda 1."""
    removed = set(removed)
    for i in model.prune_layer:
        model.blocks[i].set_lambda(0.0 if i in removed else 1.0)


def save_plot(path: str, layer_entropy: Sequence[float], selected: Sequence[int]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2))
    colors = ["tab:red" if i in selected else "tab:blue" for i in range(len(layer_entropy))]
    ax.bar(range(len(layer_entropy)), layer_entropy, color=colors)
    ax.set_xticks(range(len(layer_entropy)))
    ax.set_xlabel("block")
    ax.set_ylabel("mean attention entropy (nats)")
    ax.set_title("attention entropy per block (red: selected for removal)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------- CLI

def _literal(kind: type, flag: str):
    def parse(text: str):
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            raise argparse.ArgumentTypeError(f"{flag} {text!r} is not a Python literal") from None
        if not isinstance(value, kind):
            raise argparse.ArgumentTypeError(f"{flag} {text!r} must be a {kind.__name__}")
        return value
    return parse


DEFAULT_MODEL = "deit_small_patch16_224"


# main.py's data options this tool takes (the evaluation side of datasets.build_dataset)
DATA_OPTIONS = (
    ("--data-set", dict(default="SYNTHETIC", help="main.py's --data-set")),
    ("--data-path", dict(default="", help="dataset root (main.py's --data-path)")),
    ("--num-images", dict(type=int, default=0, help="use only the first N images (default: 0, all)")),
    ("--random-data", dict(type=int, default=0, help="use N Gaussian-noise images instead (default: 0, off)")),
    ("--eval-crop-ratio", dict(type=float, default=0.875, help="centre-crop ratio of the evaluation transform")),
    ("--eval-interpolation", dict(default="bicubic", help="resize interpolation of the evaluation transform")),
    ("--synthetic-val-size", dict(type=int, default=256, help="images of the SYNTHETIC validation set")),
    ("--synthetic-train-size", dict(type=int, default=256, help="images of the SYNTHETIC training set")),
    ("--synthetic-classes", dict(type=int, default=10, help="classes of the SYNTHETIC data set")),
    ("--inat-category", dict(default="name", help="iNaturalist label level (main.py's --inat-category)")),
)


def get_args_parser() -> argparse.ArgumentParser:
    from tools import _common
    flag = _common.spellings
    parser = _common.ToolParser("attention_entropy", __doc__)
    _common.add_model_args(parser, DEFAULT_MODEL, checkpoint_help="DeiT or lambda-model checkpoint",
                           method_flags=False, model_help="DeiT (timm name) or lambda model whose blocks are analysed")
    g = parser.add_argument_group("selection")
    budget = g.add_mutually_exclusive_group()
    budget.add_argument("--budget", type=int, default=None,
                        help=f"number of attention layers to remove (default: from --ratio, else {DEFAULT_RATIO})")
    budget.add_argument("--ratio", type=float, default=None,
                        help="fraction of blocks to remove, rounded half up (0.25/0.3 small and tiny, "
                             f"0.4/0.5 base; default {DEFAULT_RATIO} when --budget is not given)")
    g.add_argument("--candidates", type=_literal(list, "--candidates"), default=None,
                   help="blocks that may be removed, e.g. [0,1,2,3] (default: all)")
    g.add_argument("--estimator", choices=sorted(ESTIMATORS), default="feature", help="output entropy estimator")
    g.add_argument("--plot", default="", help="save a per-block attention entropy plot (PNG) (default: none)")
    g.add_argument("--device", default="cpu", help="torch device")
    g.add_argument(*flag("--batch-size"), "-b", dest="batch_size", type=int, default=64, help="images per pass")
    g.add_argument(*flag("--num_workers", "--workers"), dest="num_workers", type=int, default=2,
                   help="data loader workers")
    g.add_argument("--seed", type=int, default=0, help="seed of --random-data and of torch")
    data = parser.add_argument_group("data (datasets.build_dataset, evaluation transforms)")
    for name, settings in DATA_OPTIONS:
        data.add_argument(*flag(name), dest=name[2:].replace("-", "_"), **settings)
    data.add_argument("--download", action="store_true", help="let torchvision data sets download themselves")
    data.add_argument(*flag("--strict-data"), dest="strict_data", action="store_true",
                      help="fail on unreadable images instead of replacing them")
    return parser


def analyse(args) -> dict:
    from tools._common import check_output_file
    check_output_file(args.plot, "--plot")  # before the analysis, which can take hours
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    model = build_analysis_model(args).to(device)
    depth = len(model.blocks)
    if args.ratio is not None:
        if not 0.0 <= args.ratio < 1.0:
            raise UserError(f"--ratio {args.ratio} must be in [0, 1)")
        budget = budget_from_ratio(args.ratio, depth)
    else:
        budget = budget_from_ratio(DEFAULT_RATIO, depth) if args.budget is None else args.budget
    loader = build_loader(args, model.patch_embed.img_size[0])
    estimator = ESTIMATORS[args.estimator]

    set_removed_blocks(model, ())
    meter = AttentionEntropyMeter(model)
    features, logits = collect_outputs(model, loader, device)
    meter.remove()
    outputs = {"feature": features, "head": logits}
    h_full = estimator(outputs[args.estimator])

    def evaluate(removed: tuple[int, ...]) -> float:
        set_removed_blocks(model, removed)
        features, logits = collect_outputs(model, loader, device)
        return estimator({"feature": features, "head": logits}[args.estimator])

    selected, rows = greedy_selection(evaluate, list(model.prune_layer), budget, h_full)
    set_removed_blocks(model, ())
    return {"layer_entropy": meter.means(), "h_full": h_full, "selected": selected, "rows": rows,
            "num_samples": features.shape[0], "budget": budget}


def format_report(result: dict, estimator: str) -> str:
    lines = ["block  mean attention entropy (nats)"]
    lines += [f"{i:5d}  {h:.4f}" for i, h in enumerate(result["layer_entropy"])]
    lines.append(f"\nH_full ({estimator} estimator, {result['num_samples']} images) = {result['h_full']:.4f}")
    lines.append("step  block  H(S+{block})  transfer entropy  chosen")
    lines += [f"{r.step:4d}  {r.block:5d}  {r.entropy:12.4f}  {r.transfer:16.4f}  {'*' if r.chosen else ''}"
              for r in result["rows"]]
    order = result["selected"]
    lines.append(f"\nselection order: {order}")
    lines.append(f"suggested: --prune_layer [{','.join(str(i) for i in sorted(order))}] --done_layer []")
    return "\n".join(lines)


def run(args) -> int:
    result = analyse(args)
    print(format_report(result, args.estimator))
    if args.plot:
        save_plot(args.plot, result["layer_entropy"], result["selected"])
        _logger.info("saved %s", args.plot)
    return 0


def main(argv=None) -> int:
    from tools import _common
    return _common.run_cli(get_args_parser, run, argv)


if __name__ == "__main__":
    sys.exit(main())
