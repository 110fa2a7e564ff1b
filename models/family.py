"""Method families: how a method plugs into the trainer, the benchmark, the tools and the tests.

A family declares, at the bottom of its own module, everything the rest of the project needs
to know about the method; `main.py`, `engine.py`, `benchmark.py`, `tools/` and the
parametrized tests ask this registry and name no method. There are two kinds:

* a **model family** owns registered model names (EViT owns `deit_*_patch16_shrink_base`):
  its flags that carry `kwarg=` become constructor kwargs of those models;
* a **patch family** (ToMe, ToFu) has `owns=None` and a `patch`: it is applied, after the
  model is built and its weights loaded, to a model of any family when `active(options)`.

    FAMILY = register_family(MethodFamily(
        name="evit",
        title="EViT: keep the attentive tokens, fuse the rest",
        owns=models_of(__name__),
        flags=(Flag("--base_keep_rate", type=auto_or(float), kwarg="base_keep_rate", help="..."),),
        reduction=Reduction("base_keep_rate", search),
        hooks=KeepRateWarmup,              # (model, options) -> models.hooks.MethodHooks or None
        examples=(Example("evit", model="deit_tiny_patch16_shrink_base", kwargs={...}),),
    ))

`models/__init__.py` imports every module of the package, so a new in-tree family is one new
file; a researcher's own file plugs in the same way with `--plugin my_module` (main.py,
benchmark.py and the tools). Every callback receives an `Options` namespace holding this
family's own flag values (by dest) plus `RUN_FIELDS`, never the trainer's full namespace.
Flags with `kwarg=` default to None ("use the model's default") and are passed only when
given. Callbacks raise `models.errors.ModelConfigError` for bad user input.
"""
from __future__ import annotations

import argparse
import ast
import importlib
import re
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from torch import nn

from .errors import ModelConfigError
from .gmacs_search import search_continuous, search_merge_schedule, search_sequence
from .hooks import CombinedHooks, MethodHooks

__all__ = [
    "Flag", "Command", "Example", "literal", "auto_or", "AUTO", "r_schedule", "Reduction", "MethodFamily",
    "Options", "RUN_FIELDS", "register_family", "families", "get_family", "family_of_model", "patch_families",
    "active_families", "check_all_options", "import_plugins", "translate_argv", "models_of", "add_family_args",
    "options_for", "model_kwargs", "apply_patches", "training_hooks", "example_options", "resolve_command",
    "examples_per_model",
    "search_continuous", "search_sequence", "search_merge_schedule",
]

# Run-level values every callback may read from its Options (besides its own flags).
RUN_FIELDS = ("epochs", "lr", "weight_decay", "input_size", "seed")

Options = SimpleNamespace

_LITERAL_HELP = {"int_list": "a list such as [0,2,4]", "int_tuple": "a tuple such as (3, 6, 9)",
                 "dict": "a dict such as \"{'depth': 2}\""}


def literal(kind: str) -> Callable[[Any], Any]:
    """argparse type: a Python literal read with ast.literal_eval (never eval), checked for `kind`.

    kind: 'int_list' -> list of ints, 'int_tuple' -> tuple of ints, 'dict' -> dict. A single
    int is a one-element list/tuple; space-separated ints ("3 6 9") are accepted too.
    """
    def parse(text):
        value = text
        if isinstance(text, str):
            stripped = text.strip()
            if kind != "dict" and re.fullmatch(r"-?\d+(\s+-?\d+)+", stripped):
                stripped = "[" + ",".join(stripped.split()) + "]"
            try:
                value = ast.literal_eval(stripped)
            except (ValueError, SyntaxError):
                raise argparse.ArgumentTypeError(f"{text!r} is not a Python literal (expected {_LITERAL_HELP[kind]})")
        if kind == "dict":
            if not isinstance(value, dict):
                raise argparse.ArgumentTypeError(f"{text!r} is not {_LITERAL_HELP[kind]}")
            return value
        if isinstance(value, int) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise argparse.ArgumentTypeError(f"{text!r} is not {_LITERAL_HELP[kind]} of integers")
        return list(value) if kind == "int_list" else tuple(value)
    parse.__name__ = kind
    return parse


@dataclass(frozen=True)
class Flag:
    """One command-line option of a family: argparse names and keywords, and the kwarg it feeds.

    `kwarg`: the constructor kwarg of the family's models this option becomes when given
    (not None). The default is shown in `--help`.
    """
    names: Tuple[str, ...]
    dest: str
    help: str
    type: Optional[Callable] = None
    default: Any = None
    action: Optional[str] = None
    nargs: Any = None
    choices: Optional[Sequence] = None
    metavar: Optional[str] = None
    kwarg: Optional[str] = None

    def __init__(self, *names: str, help: str, dest: Optional[str] = None, type=None, default=None,
                 action=None, nargs=None, choices=None, metavar=None, kwarg=None):
        if not names or not all(n.startswith("--") for n in names):
            raise ValueError(f"Flag needs long option names, got {names!r}")
        spellings = list(names)
        for name in names:  # every flag is accepted with '-' and with '_'
            for other in (name[:2] + name[2:].replace("_", "-"), name[:2] + name[2:].replace("-", "_")):
                if other not in spellings:
                    spellings.append(other)
        object.__setattr__(self, "names", tuple(spellings))
        object.__setattr__(self, "dest", dest or names[0][2:].replace("-", "_"))
        for key, value in dict(help=help, type=type, default=default, action=action, nargs=nargs,
                               choices=choices, metavar=metavar, kwarg=kwarg).items():
            object.__setattr__(self, key, value)

    def add_to(self, group) -> None:
        keywords: Dict[str, Any] = dict(dest=self.dest, default=self.default, help=self.help)
        if self.action:
            keywords["action"] = self.action
        else:
            keywords.update({k: v for k, v in dict(type=self.type, nargs=self.nargs, choices=self.choices,
                                                    metavar=self.metavar).items() if v is not None})
        group.add_argument(*self.names, **keywords)


@dataclass(frozen=True)
class Command:
    """An extra action a family offers instead of (or before) training, switched on by a flag.

    `run(model, context)` gets a `SimpleNamespace` with `data_loader` (validation), `device`,
    `output_dir`, `batch_size`, `input_size`, `options`. With `exits=True` the run ends
    after the command (status 0); otherwise training or evaluation continues. `run` may be
    a "module:function" string naming an implementation outside `models/` (a tool that
    draws images or times the model), which the trainer imports when the flag is given, so
    this library never imports the layers above it.
    """
    dest: str
    run: Any
    exits: bool = True
    main_process_only: bool = True
    needs_data: bool = True


@dataclass(frozen=True)
class Reduction:
    """The family's reduction parameter, for `--target-gmacs` (the value `auto`).

    `dest`: the flag whose value `auto` asks for a search; `search(build, target_gmacs, gmacs_of)`
    returns (value, gmacs) where `build(value) -> model` builds the model with that value and
    `gmacs_of(model) -> float` counts it. The family knows its granularity (a keep rate, an r
    schedule, a ratio) and returns the closest value it can reach.
    """
    dest: str
    search: Callable[[Callable[[Any], nn.Module], float, Callable[[nn.Module], float]], Tuple[Any, float]]


@dataclass(frozen=True)
class Example:
    """A tiny configuration of the family that the parametrized tests read.

    `model`: a registered name (for a patch family, the model it patches); `kwargs`:
    constructor kwargs that make it tiny; `flags`: main.py flags of the family's options
    (e.g. `("--tome-r", "2")`); `train`: one synthetic epoch through main.py
    (`tests/e2e/test_train_every_model.py`); `compile`: the modes in which `torch.compile` must
    trace it without graph breaks and match eager (`tests/unit/test_compile.py`); `invalid`: option
    values (by flag dest) or constructor kwargs that must raise ModelConfigError
    (`tests/unit/test_model_contract.py`, which also checks forward hooks and forward_intermediates).
    """
    name: str
    model: str
    kwargs: Dict[str, Any] = field(default_factory=dict)
    flags: Tuple[str, ...] = ()
    input_size: int = 32
    train: bool = True
    compile: Tuple[str, ...] = ("eval", "train")
    invalid: Dict[str, Any] = field(default_factory=dict)


@dataclass
class MethodFamily:
    """Everything the trainer, benchmark, tools and tests need from one method (module docstring)."""
    name: str
    title: str
    flags: Tuple[Flag, ...] = ()
    # Model family: which registered names it builds (`models_of(__name__)`).
    owns: Optional[Callable[[str], bool]] = None
    # Patch family: patch(model, options) after the weights are loaded, when active(options).
    patch: Optional[Callable[[nn.Module, Options], None]] = None
    active: Optional[Callable[[Options], bool]] = None
    # Checks of flag values and combinations before anything is built (raise ModelConfigError).
    check_options: Optional[Callable[[Options], None]] = None
    # The knob `--target-gmacs` solves for.
    reduction: Optional[Reduction] = None
    # (model, options) -> MethodHooks or None: every training-time callback.
    hooks: Optional[Callable[[nn.Module, Options], Optional[MethodHooks]]] = None
    # Trainer defaults (dest -> value) for this family's models: the official recipe when the
    # official trainer is not DeiT's main.py. --cfg and the command line still win.
    recipe: Dict[str, Any] = field(default_factory=dict)
    # An official launch line's argv rewritten into this project's flags, before parsing.
    translate_argv: Optional[Callable[[List[str]], List[str]]] = None
    # State-dict filter for --finetune / --pretrained; default: the filter of the timm module
    # that defines the base architecture.
    checkpoint_filter_fn: Optional[Callable[[dict, nn.Module], dict]] = None
    # The official code's own FLOP count of a built model (an analytic formula, its counter's
    # convention): (model, (height, width)) -> {name: value}; benchmark.py records it beside fvcore's.
    official_flops: Optional[Callable[[nn.Module, Tuple[int, int]], Dict[str, float]]] = None
    # Extra actions switched on by the family's flags (a visualisation, a speed test).
    commands: Tuple[Command, ...] = ()
    examples: Tuple[Example, ...] = ()
    module: str = field(default="")

    def is_patch(self) -> bool:
        return self.owns is None

    def kwarg_flags(self) -> List[Flag]:
        return [flag for flag in self.flags if flag.kwarg]


# The registry: family name -> family. Filled by imports, like timm's model registry.
_FAMILIES: Dict[str, MethodFamily] = {}


def register_family(family: MethodFamily) -> MethodFamily:
    """Add `family` (re-registering the same name replaces it, so a reloaded module stays valid)."""
    if not family.module:
        family.module = _caller_module()
    dests = {flag.dest: name for name, other in _FAMILIES.items() if name != family.name for flag in other.flags}
    for flag in family.flags:
        if flag.dest in dests:
            raise ValueError(f"family {family.name!r}: flag dest {flag.dest!r} is already declared by "
                             f"family {dests[flag.dest]!r}")
    _FAMILIES[family.name] = family
    return family



def _caller_module() -> str:
    import inspect
    frame = inspect.currentframe()
    try:
        caller = frame.f_back.f_back if frame and frame.f_back else None
        return caller.f_globals.get("__name__", "") if caller else ""
    finally:
        del frame


def families() -> List[MethodFamily]:
    return list(_FAMILIES.values())


def get_family(name: str) -> MethodFamily:
    return _FAMILIES[name]


def models_of(module_name: str) -> Callable[[str], bool]:
    """`owns` predicate: the models registered by `module_name` (timm's registry knows the module)."""
    def owns(model_name: str) -> bool:
        import timm
        try:
            return timm.models.model_entrypoint(model_name).__module__ == module_name
        except (RuntimeError, KeyError):
            return False
    owns.__name__ = f"models_of_{module_name.replace('.', '_')}"
    return owns


def family_of_model(model_name: str) -> Optional[MethodFamily]:
    """The model family that owns `model_name`, or None (timm's own models)."""
    for family in _FAMILIES.values():
        if family.owns is not None and family.owns(model_name):
            return family
    return None



def patch_families() -> List[MethodFamily]:
    return [family for family in _FAMILIES.values() if family.is_patch()]



def add_family_args(parser: argparse.ArgumentParser, kwargs_only: bool = False,
                    unset_defaults: bool = False) -> argparse.ArgumentParser:
    """One argument group per registered family. `kwargs_only`: only the flags that shape the
    model (constructor kwargs, patch flags), as benchmark.py's model specs take them."""
    for family in _FAMILIES.values():
        flags = [f for f in family.flags if not kwargs_only or f.kwarg or family.is_patch()]
        if not flags:
            continue
        group = parser.add_argument_group(f"{family.title} [{family.name}]")
        for flag in flags:
            if unset_defaults and flag.action not in ("store_true", "store_false"):
                flag = _with_default(flag, None)
            flag.add_to(group)
    return parser


def _with_default(flag: Flag, default) -> Flag:
    copy = object.__new__(Flag)
    for key in Flag.__dataclass_fields__:
        object.__setattr__(copy, key, getattr(flag, key))
    object.__setattr__(copy, "default", default)
    return copy


def options_for(family: MethodFamily, values) -> Options:
    """The family's own flag values (and RUN_FIELDS) from an argparse Namespace or a dict."""
    get = values.get if isinstance(values, dict) else (lambda key, default=None: getattr(values, key, default))
    data = {field_name: get(field_name, None) for field_name in RUN_FIELDS}
    for flag in family.flags:
        value = get(flag.dest, None)  # benchmark specs leave unset flags at None: the family's default
        data[flag.dest] = flag.default if value is None else value
    return Options(**data)


def model_kwargs(model_name: str, values) -> Tuple[Dict[str, Any], List[str]]:
    """(constructor kwargs of `model_name` from the given flag values, dests of other families'
    kwarg flags that are set to something other than their default and have no effect on this model)."""
    owner = family_of_model(model_name)
    get = values.get if isinstance(values, dict) else (lambda key, default=None: getattr(values, key, default))
    kwargs: Dict[str, Any] = {}
    ignored: List[str] = []
    for family in _FAMILIES.values():
        for flag in family.kwarg_flags():
            value = get(flag.dest, None)
            if value is None:
                continue
            if family is owner:
                kwargs[flag.kwarg] = value
            elif value != flag.default:
                ignored.append(flag.dest)
    return kwargs, ignored


def active_families(model_name: str, values) -> List[MethodFamily]:
    """The model's own family (if any) and every patch family that the values switch on."""
    found = []
    owner = family_of_model(model_name)
    if owner is not None:
        found.append(owner)
    for family in patch_families():
        if family.active is not None and family.active(options_for(family, values)):
            found.append(family)
    return found


def _switch_flag(family: MethodFamily) -> str:
    dest = family.reduction.dest if family.reduction is not None else family.flags[0].dest
    return "--" + dest.replace("_", "-")


def check_all_options(model_name: str, values) -> None:
    """Each active family's own checks; and at most one patch family, since each replaces the
    blocks' forward and a second patch would silently undo the first."""
    patches = [f for f in active_families(model_name, values) if f.patch is not None]
    if len(patches) > 1:
        raise ModelConfigError(f"{' and '.join(f.name for f in patches)} both patch the model's blocks and "
                               f"cannot be combined ({' with '.join(_switch_flag(f) for f in patches)}); "
                               "give one of them")
    for family in active_families(model_name, values):
        if family.check_options is not None:
            family.check_options(options_for(family, values))


def apply_patches(model: nn.Module, model_name: str, values) -> List[str]:
    """Apply every active patch family to `model` in place; returns their names."""
    applied = []
    for family in patch_families():
        options = options_for(family, values)
        if family.patch is not None and family.active is not None and family.active(options):
            family.patch(model, options)
            applied.append(family.name)
    return applied


def training_hooks(model: nn.Module, model_name: str, values) -> CombinedHooks:
    """The combined hooks of the model's active families."""
    found: List[MethodHooks] = []
    names: List[str] = []
    for family in active_families(model_name, values):
        if family.hooks is not None:
            hook = family.hooks(model, options_for(family, values))
            if hook is not None:
                found.append(hook)
                names.append(family.name)
    return CombinedHooks(found, names)


def translate_argv(argv: Sequence[str]) -> List[str]:
    """An official launch line's argv in this project's flags: every family's translator in turn."""
    argv = list(argv)
    for family in _FAMILIES.values():
        if family.translate_argv is not None:
            argv = list(family.translate_argv(argv))
    return argv


def resolve_command(command: Command) -> Callable[[nn.Module, SimpleNamespace], None]:
    """The callable of `command.run` ("module:function" strings are imported now)."""
    if callable(command.run):
        return command.run
    module_name, _, function = str(command.run).partition(":")
    return getattr(importlib.import_module(module_name), function)


def examples_per_model(names: Sequence[str], kwargs: Callable[[str], Dict[str, Any]], compiled: int = 1,
                       **common) -> Tuple[Example, ...]:
    """One Example per registered model (train-every-model covers each), named after it, with
    `kwargs(name)` making it tiny; the first `compiled` are also compile-checked (eval and train).
    `common`: the other Example fields, the same for all."""
    return tuple(Example(name, model=name, kwargs=kwargs(name), compile=("eval", "train") if i < compiled else (),
                         **common) for i, name in enumerate(names))


def example_options(example: Example) -> Dict[str, Any]:
    """The method option values (by dest) that an Example's flags give, every other method flag at
    its default; trainer flags among them (`--lr`) are main.py's and ignored here."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    add_family_args(parser)
    values, _trainer_flags = parser.parse_known_args(list(example.flags))
    return vars(values)


def import_plugins(module_names: Sequence[str]) -> None:
    """Import researchers' own family modules (`--plugin`); an unknown module is a ModelConfigError."""
    for name in module_names:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name and name.startswith(err.name):
                raise ModelConfigError(f"--plugin {name}: no such module on the Python path; "
                                       f"pass an importable module name (a file my_method.py -> my_method)") from None
            raise


AUTO = "auto"


def auto_or(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    """argparse type: `kind(text)`, or the string 'auto' (a reduction chosen by --target-gmacs)."""
    def parse(text):
        if isinstance(text, str) and text.strip().lower() == AUTO:
            return AUTO
        try:
            return kind(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"{text!r} is neither a {getattr(kind, '__name__', 'value')} nor 'auto'")
    parse.__name__ = f"{getattr(kind, '__name__', 'value')} or auto"
    return parse


def r_schedule(text) -> Any:
    """argparse type for a merge schedule r: an int, a per-block list "[8,8,6]", or 'auto'."""
    if isinstance(text, str):
        stripped = text.strip()
        if stripped.lower() == AUTO:
            return AUTO
        try:
            value = ast.literal_eval(stripped)
        except (ValueError, SyntaxError):
            raise argparse.ArgumentTypeError(f"{text!r} is not an int, a list of ints such as [8,8,6], or 'auto'")
    else:
        value = text
    if isinstance(value, bool) or not isinstance(value, (int, list, tuple)):
        raise argparse.ArgumentTypeError(f"{text!r} is not an int, a list of ints such as [8,8,6], or 'auto'")
    if isinstance(value, (list, tuple)) and not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise argparse.ArgumentTypeError(f"{text!r}: every per-block r must be an int")
    if (isinstance(value, int) and value < 0) or (isinstance(value, (list, tuple)) and any(v < 0 for v in value)):
        raise argparse.ArgumentTypeError(f"{text!r}: r must be >= 0")
    return list(value) if isinstance(value, (list, tuple)) else value
