"""Convert a lambda-dilution checkpoint into a deployed attention-shrink checkpoint.

Attention shrink ("MLP Can Be A Good Transformer Learner", CVPR 2024): once lambda has
reached 0, the blocks of `prune_layer` (and `done_layer`) compute `2x + MLP`, so their 6
attention keys (`norm1.*`, `attn.qkv.*`, `attn.proj.*`) can be deleted. The official code
never writes such a file (it loads non-strictly and drops the keys silently); this tool
removes exactly those keys, says which, loads the result strictly into the `*_shrink`
model and checks on random inputs that its logits equal the lambda model's at lambda 0.

    python -m tools.shrink_convert --input checkpoint.pth --output shrink.pth \\
        --model deit_small_patch16_224_shrink [--prune_layer [0,2,4,6] --done_layer []] \\
        [--model-kwargs "{'depth': 4}"]

Model kwargs a main.py checkpoint saved (`args["model_kwargs"]`) are applied to both models.
"""
from __future__ import annotations

import argparse
import ast
import logging
import math
import sys
from typing import Optional

import torch

import models  # noqa: F401  (registers the shrink models)
from models.shrink import lambda_at_epoch, remove_attention_keys
from models.factory import create_model
from utils.checkpoint import extract_state_dict, load_checkpoint_file, load_model_weights, saved_args, save_checkpoint
from utils.errors import UserError

_logger = logging.getLogger("shrink_convert")

# Lambda model whose lambda-0 logits the deployed model must reproduce (the official
# base results come from the `_attn` model; the `_copy_lambda` base was never tested).
LAMBDA_MODEL_FOR = {
    "deit_tiny_patch16_224_shrink": "deit_tiny_patch16_224_copy_lambda",
    "deit_small_patch16_224_shrink": "deit_small_patch16_224_copy_lambda",
    "deit_base_patch16_224_shrink": "deit_base_patch16_224_attn",
}
DEFAULT_ATOL = 1e-5


def block_list(text: str) -> list[int]:
    """argparse type for '[0,2,4]' (also '0,2,4' or '' for none)."""
    try:
        value = ast.literal_eval(text) if text.strip() else []
    except (ValueError, SyntaxError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of block indices such as [0,2,4]") from None
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(i, int) and not isinstance(i, bool) for i in value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of block indices such as [0,2,4]")
    return list(value)


def get_args_parser() -> argparse.ArgumentParser:
    from tools import _common
    parser = _common.ToolParser("shrink_convert", __doc__)
    parser.add_argument("--input", *_common.spellings("--checkpoint", "--resume"), dest="input", required=True,
                        help="lambda-model checkpoint (this project's or official lambda_vit); required, no default")
    parser.add_argument("--output", required=True, help="where to write the deployed checkpoint; required, no default")
    parser.add_argument("--model", required=True, choices=sorted(LAMBDA_MODEL_FOR), metavar="MODEL",
                        help=f"deployed model the result must load into strictly: {', '.join(sorted(LAMBDA_MODEL_FOR))}"
                             "; required, no default")
    parser.add_argument(*_common.spellings("--prune_layer"), dest="prune_layer", type=block_list, default=None,
                        help="blocks that were diluted to lambda 0 (default: from the checkpoint)")
    parser.add_argument(*_common.spellings("--done_layer"), dest="done_layer", type=block_list, default=None,
                        help="blocks that were already at lambda 0 (default: from the checkpoint)")
    parser.add_argument(*_common.spellings("--lambda_model"), dest="lambda_model", default=None,
                        help="lambda model used for the equivalence check (default: the one of --model's size)")
    parser.add_argument(*_common.spellings("--model-kwargs"), dest="model_kwargs", type=_common.dict_literal,
                        default=None, help="extra constructor kwargs of both models, e.g. \"{'depth': 4}\" "
                                           "(default: the checkpoint's saved --model-kwargs, else none)")
    parser.add_argument(*_common.spellings("--verify-batch"), dest="verify_batch", type=int, default=2,
                        help="random images for the equivalence check")
    parser.add_argument("--atol", type=float, default=DEFAULT_ATOL, help="largest accepted |logit difference|")
    parser.add_argument("--seed", type=int, default=0, help="seed of the equivalence check's images")
    return parser


def _stored_lists(checkpoint: dict) -> tuple[Optional[list], Optional[list], str]:
    """(prune_layer, done_layer, where) recorded in a checkpoint, None where absent."""
    method_state = checkpoint.get("method_state")
    if isinstance(method_state, dict) and "prune_layer" in method_state:
        return list(method_state["prune_layer"]), list(method_state.get("done_layer", [])), "method_state"
    args = checkpoint.get("args")
    if isinstance(args, argparse.Namespace):
        args = vars(args)
    if isinstance(args, dict) and args.get("prune_layer") is not None:
        lists = []
        for name in ("prune_layer", "done_layer"):
            value = args.get(name)
            lists.append(block_list(value) if isinstance(value, str) else list(value or []))
        return lists[0], lists[1], "args"
    return None, None, ""


def stored_lambda(checkpoint: dict) -> tuple[Optional[float], str]:
    """(lambda, how it is known): stored by this project, inferred from the official schedule, or unknown."""
    method_state = checkpoint.get("method_state")
    if isinstance(method_state, dict) and method_state.get("lambda") is not None:
        return float(method_state["lambda"]), "stored in method_state"
    if isinstance(checkpoint.get("epoch"), int) and checkpoint.get("args") is not None:
        epoch = checkpoint["epoch"]
        return lambda_at_epoch(epoch), f"inferred from epoch {epoch} and the official schedule 1 - epoch/299"
    return None, "unknown"


def resolve_layers(checkpoint: dict, prune_arg, done_arg) -> tuple[list[int], list[int]]:
    """Block lists from the command line and/or the checkpoint; a disagreement is an error."""
    stored_prune, stored_done, where = _stored_lists(checkpoint)
    resolved = []
    for flag, given, stored in (("--prune_layer", prune_arg, stored_prune), ("--done_layer", done_arg, stored_done)):
        if given is not None and stored is not None and sorted(given) != sorted(stored):
            raise UserError(f"{flag} {given} differs from the checkpoint's {where} value {stored}; "
                            f"omit {flag} or pass the checkpoint's value")
        resolved.append(sorted(given if given is not None else stored or []))
    if stored_prune is None and (prune_arg is None or done_arg is None):
        raise UserError("the checkpoint does not record prune_layer/done_layer; pass both --prune_layer "
                        "and --done_layer (e.g. --prune_layer [0,2,4,6] --done_layer [])")
    return resolved[0], resolved[1]


def check_lambda(checkpoint: dict, prune_layer: list[int]) -> None:
    lam, how = stored_lambda(checkpoint)
    if lam is None:
        _logger.warning("the checkpoint records no lambda (official lambda_vit file?); assuming it finished "
                        "the dilution (lambda 0, epoch >= 299): the equivalence check below is the safeguard")
    elif lam > 0 and prune_layer:
        raise UserError(f"checkpoint lambda is {lam:.6g} ({how}), not 0: its prune_layer blocks still use "
                        "attention; convert a checkpoint from epoch >= 299 (lambda 0)")
    else:
        _logger.info("checkpoint lambda %g (%s)", lam, how)


def _model_kwargs(state_dict: dict) -> dict:
    """num_classes and img_size the checkpoint was trained with (patch 16, cls token)."""
    kwargs = {}
    head = state_dict.get("head.weight")
    if head is not None and head.dim() == 2:
        kwargs["num_classes"] = head.shape[0]
    pos_embed = state_dict.get("pos_embed")
    if pos_embed is not None and pos_embed.dim() == 3:
        side = math.isqrt(pos_embed.shape[1] - 1)
        if side * side == pos_embed.shape[1] - 1:
            kwargs["img_size"] = side * 16
    return kwargs


@torch.no_grad()
def max_logit_difference(deployed: torch.nn.Module, reference: torch.nn.Module, batch: int, img_size: int,
                         seed: int) -> float:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, img_size, img_size, generator=generator)
    return (deployed.eval()(x) - reference.eval()(x)).abs().max().item()


def convert(args: argparse.Namespace) -> dict:
    """Run the conversion; returns a summary dict. Raises UserError on any refusal."""
    from tools._common import check_output_file
    check_output_file(args.output, "--output")
    checkpoint = load_checkpoint_file(args.input)
    state_dict = extract_state_dict(checkpoint)
    prune_layer, done_layer = resolve_layers(checkpoint if isinstance(checkpoint, dict) else {},
                                             args.prune_layer, args.done_layer)
    check_lambda(checkpoint, prune_layer)
    removed = sorted(set(prune_layer) | set(done_layer))
    try:
        deployed_state, dropped = remove_attention_keys(state_dict, removed)
    except ValueError as err:
        raise UserError(str(err)) from None

    # Both models are loaded strictly below, so timm's (slow) weight init is skipped.
    kwargs = dict(_model_kwargs(state_dict), weight_init="skip")
    kwargs.update(saved_args(checkpoint).get("model_kwargs") or {})
    kwargs.update(args.model_kwargs or {})
    lambda_name = args.lambda_model or LAMBDA_MODEL_FOR[args.model]
    try:
        deployed = create_model(args.model, model_kwargs=dict(kwargs, done_layer=removed))
        reference = create_model(lambda_name, model_kwargs=dict(kwargs, prune_layer=prune_layer, done_layer=done_layer))
    except ValueError as err:
        raise UserError(str(err).splitlines()[0]) from None
    load_model_weights(deployed, deployed_state, strict=True, model_name=args.model)
    load_model_weights(reference, state_dict, strict=True, model_name=lambda_name)
    reference.set_lambda(0.0)
    diff = max_logit_difference(deployed, reference, args.verify_batch, kwargs.get("img_size", 224), args.seed)
    summary = {"dropped_keys": dropped, "removed_blocks": removed, "max_abs_diff": diff,
               "num_keys": len(deployed_state), "lambda_model": lambda_name}
    if not diff <= args.atol:
        raise UserError(f"deployed logits differ from {lambda_name} at lambda 0 by {diff:.3g} > {args.atol:g}; "
                        "the checkpoint or the block lists do not match")
    save_checkpoint({
        "model": deployed_state,
        "args": {"model": args.model, "done_layer": removed, "prune_layer": [], "source": args.input,
                 "source_prune_layer": prune_layer, "source_done_layer": done_layer},
    }, args.output)
    return summary


def run(args) -> int:
    summary = convert(args)
    print(f"dropped {len(summary['dropped_keys'])} keys (blocks {summary['removed_blocks']}):")
    for key in summary["dropped_keys"]:
        print(f"  {key}")
    print(f"{args.model}: {summary['num_keys']} keys, loads strictly; "
          f"max |logit diff| vs {summary['lambda_model']} at lambda 0: {summary['max_abs_diff']:.3g}")
    print(f"wrote {args.output}")
    return 0


def main(argv=None) -> int:
    from tools import _common
    return _common.run_cli(get_args_parser, run, argv)


if __name__ == "__main__":
    sys.exit(main())
