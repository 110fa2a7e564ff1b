"""What every tool shares: main.py's flag names, one-line errors, and one way to build a model.

Flags: `--model`, `--checkpoint` (also main.py's `--resume` / `--finetune`), `--input-size`
(also the tools' old `--img-size`), `--model-kwargs` (a dict literal, as main.py), `--num-classes`
and the method flags of `models.family`; every flag in its `-` and its `_` spelling, every option
with a help text and its default shown.

Models are built by `models.factory.create_model`: a checkpoint written by main.py stores its
`args`, and the model name, num_classes and model kwargs it holds are used unless the command
line gives them. Bad input raises `UserError`; `run_cli` logs it as one line and returns 2.
"""
from __future__ import annotations

import argparse
import ast
import logging
import os
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from utils.cli import OneLineParser, close_matches, import_plugins, spellings
from utils.errors import UserError
from utils.run_dir import check_output_dir, path_problem

_logger = logging.getLogger("tools")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the module docstring's layout and shows every option's default."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text.lower() or action.default is argparse.SUPPRESS or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


class ToolParser(OneLineParser):
    """Errors are one-line UserErrors; a later flag may redefine an earlier one (conflict_handler)."""

    def __init__(self, prog: str, description: str):
        super().__init__(prog=prog, description=description, formatter_class=HelpFormatter,
                         conflict_handler="resolve")


def dict_literal(text: str) -> dict:
    """argparse type for --model-kwargs: a Python dict literal (ast.literal_eval, never eval)."""
    try:
        value = ast.literal_eval(text.strip())
    except (ValueError, SyntaxError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a Python literal (expected a dict such as "
                                         f"\"{{'depth': 2}}\")") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"{text!r} is not a dict such as \"{{'depth': 2}}\"")
    return value


def add_model_args(parser: argparse.ArgumentParser, default_model: str, *, checkpoint_help: str,
                   method_flags: bool = True, model_help: str = "registered model name") -> None:
    """main.py's model flags (see the module docstring)."""
    g = parser.add_argument_group("model (main.py's flag names)")
    g.add_argument("--model", default=None, metavar="MODEL",
                   help=f"{model_help} (default: the checkpoint's model, else {default_model})")
    g.add_argument(*spellings("--checkpoint", "--resume", "--finetune"), dest="checkpoint", default=None,
                   metavar="FILE.pth", help=f"{checkpoint_help} (default: none, random weights)")
    g.add_argument(*spellings("--input-size", "--img-size"), dest="input_size", type=int, default=None,
                   help="image side in pixels (default: the checkpoint's --input-size, else the model's)")
    g.add_argument(*spellings("--model-kwargs"), dest="model_kwargs", type=dict_literal, default=None,
                   help="extra constructor kwargs as a dict literal, e.g. \"{'depth': 2}\" "
                        "(default: the checkpoint's, else none)")
    g.add_argument(*spellings("--num-classes", "--nb-classes"), dest="num_classes", type=int, default=None,
                   help="classifier outputs (default: the checkpoint's classifier, else the model's)")
    if method_flags:
        from models import family
        family.add_family_args(parser, kwargs_only=True, unset_defaults=True)
        for action in parser._actions:  # the family flags' unset default means "the checkpoint's or the model's"
            if action.default is None and action.help and "default" not in action.help.lower():
                action.help += " (default: the checkpoint's, else the model's)"


def check_output_file(path: str, flag: str) -> None:
    """UserError unless `path` can be written as a file; checked before any work is done."""
    if not path:
        return
    if os.path.isdir(path):
        raise UserError(f"{flag} {path} is a directory; give a file name such as {os.path.join(path, 'out.png')}")
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise UserError(f"{flag} {path}: the directory {directory} {path_problem(directory)}; create it or choose "
                        f"another path")
    if not os.access(directory, os.W_OK):
        raise UserError(f"{flag} {path}: the directory {directory} is not writable; choose another path")


def check_model_name(name: str, flag: str = "--model", supported: Optional[Sequence[str]] = None) -> None:
    """UserError with close matches unless `name` is registered (and among `supported`, if given)."""
    import timm

    import models  # noqa: F401  (registers the project's models)
    options = list(supported) if supported is not None else timm.list_models()
    if name in options and timm.is_model(name):
        return
    matches = close_matches(name, options)
    known = "is not supported by this tool" if timm.is_model(name) else "is unknown"
    hint = f"close matches: {', '.join(matches)}" if matches else (
        f"use one of {', '.join(options)}" if supported is not None else "list names with timm.list_models('*part*')")
    raise UserError(f"{flag} {name!r} {known}; {hint}")


@dataclass
class LoadedModel:
    model: torch.nn.Module
    name: str
    checkpoint: Optional[dict]
    saved_args: dict


def read_checkpoint(path: Optional[str]) -> tuple[Optional[dict], dict]:
    """(checkpoint dict or None, its saved args as a dict)."""
    if not path:
        return None, {}
    from utils.checkpoint import load_checkpoint_file, saved_args
    checkpoint = load_checkpoint_file(path)
    if not isinstance(checkpoint, dict):
        raise UserError(f"checkpoint {path} holds a {type(checkpoint).__name__}, expected a dict of tensors")
    return checkpoint, saved_args(checkpoint)


def resolve_name(args, default_model: str, saved: dict, supported: Optional[Sequence[str]] = None,
                 rename: Optional[dict] = None) -> str:
    """--model, else the checkpoint's model, else the tool's default; `rename` maps aliases."""
    name = args.model or saved.get("model") or default_model
    name = (rename or {}).get(name, name)
    check_model_name(name, supported=supported)
    return name


def build_model(args, default_model: str, *, supported: Optional[Sequence[str]] = None,
                rename: Optional[dict] = None, options: Optional[dict] = None,
                extra_kwargs: Optional[Callable[[str, dict], dict]] = None, apply_patches: bool = True) -> LoadedModel:
    """The tool's model with the checkpoint's weights loaded strictly.

    options: method flag values (dest -> value) besides those on `args`; extra_kwargs(name,
    model_kwargs) returns constructor kwargs the tool itself needs (they win over the rest).
    """
    from models.factory import create_model

    checkpoint, saved = read_checkpoint(getattr(args, "checkpoint", None))
    name = resolve_name(args, default_model, saved, supported, rename)
    same_run = saved.get("model") in (name, args.model) or (rename or {}).get(saved.get("model")) == name
    kwargs = dict(saved.get("model_kwargs") or {}) if same_run else {}
    kwargs.update(getattr(args, "model_kwargs", None) or {})
    values = {key: value for key, value in vars(args).items() if value is not None}
    values.update(options or {})
    if same_run:  # the checkpoint's method flags, where the command line leaves them unset
        for key, value in saved.items():
            values.setdefault(key, _literal_or_text(value))
    num_classes = getattr(args, "num_classes", None)
    if num_classes is None and checkpoint is not None and "num_classes" not in kwargs:
        num_classes = classifier_outputs(checkpoint)
    img_size = getattr(args, "input_size", None) or (saved.get("input_size") if same_run else None)
    if extra_kwargs is not None:
        kwargs.update(extra_kwargs(name, kwargs))
    try:
        model = create_model(name, options=values, num_classes=num_classes, img_size=img_size, model_kwargs=kwargs,
                             checkpoint=checkpoint, load="strict", source=f"checkpoint {args.checkpoint}",
                             apply_patches=apply_patches)
    except UserError:
        raise
    except ValueError as err:  # ModelConfigError and constructor checks: one line naming the fix
        raise UserError(str(err).strip().splitlines()[0]) from None
    return LoadedModel(model, name, checkpoint, saved)


def _literal_or_text(value):
    """Official EViT / lambda_vit runs saved list flags as text ("(3, 6, 9)")."""
    if isinstance(value, str) and value.strip()[:1] in ("(", "["):
        try:
            return ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            return value
    return value


def classifier_outputs(checkpoint: dict) -> Optional[int]:
    """Rows of the checkpoint's classifier weight (timm's usual head names), or None."""
    from utils.checkpoint import extract_state_dict
    state = extract_state_dict(checkpoint)
    for key in ("head.weight", "head.fc.weight", "head.l.weight", "classifier.weight", "fc.weight"):
        value = state.get(key)
        if isinstance(value, torch.Tensor) and value.dim() == 2:
            return int(value.shape[0])
    return None


def run_cli(build_parser: Callable[[], argparse.ArgumentParser], run: Callable[[argparse.Namespace], int],
            argv: Optional[Sequence[str]] = None) -> int:
    """`--plugin` imports, then parse (`build_parser()`) and run; bad input is one logged line and
    exit status 2."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = None
    try:
        import_plugins(argv)
        parser = build_parser()
        parser.add_argument("--plugin", action="append", default=[], metavar="MODULE",
                            help="import a module that registers a method family first, as main.py's")
        args = parser.parse_args(argv)
        if getattr(args, "output_dir", None):  # every tool's output folder, checked before any work
            check_output_dir(args.output_dir)
        return run(args)
    except UserError as err:
        text = str(err).strip().splitlines()
        logging.getLogger(parser.prog if parser is not None else "tools").error("%s", text[0] if text else type(err).__name__)
        return 2
