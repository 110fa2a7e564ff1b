"""torch.compile with the Dynamo settings a model declares.

A module class may set `dynamo_config = {"name": value}`: the `torch._dynamo.config` values its
forward needs to trace in one graph (the LTMP inference model's data-dependent token counts need
`capture_scalar_outputs`). `compile_model` applies them before compiling. Dynamo reads its config
when it traces, at the first call, so the values are set for the process, not scoped to one
call; the CLIs (`main.py`, `benchmark.py`) compile one model family per process.
`unwrap_model` finds the plain module under torch.compile and DDP wrappers.
"""
from __future__ import annotations

import logging
from typing import Any, Dict

import torch
from torch import nn

from .errors import ModelConfigError

_logger = logging.getLogger(__name__)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module under DDP / DataParallel / torch.compile wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):  # torch.compile
            model = model._orig_mod
        elif isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        else:
            return model


def dynamo_settings(model: nn.Module) -> Dict[str, Any]:
    """The union of the `dynamo_config` declarations of `model`'s modules (conflicts are errors)."""
    settings: Dict[str, Any] = {}
    for module in model.modules():
        for key, value in getattr(type(module), "dynamo_config", {}).items():
            if key in settings and settings[key] != value:
                raise ModelConfigError(f"modules of {type(model).__name__} need torch._dynamo.config.{key} "
                                       f"both {settings[key]!r} and {value!r}; compile them separately")
            settings[key] = value
    return settings


def apply_dynamo_settings(model: nn.Module) -> Dict[str, Any]:
    """Set the Dynamo config values `model` declares (logged when one changes); returns them."""
    settings = dynamo_settings(model)
    for key, value in settings.items():
        if getattr(torch._dynamo.config, key) != value:
            _logger.info("torch.compile: setting torch._dynamo.config.%s = %r (needed by %s)",
                         key, value, type(model).__name__)
            setattr(torch._dynamo.config, key, value)
    return settings


def compile_model(model: nn.Module, **compile_kwargs) -> nn.Module:
    """`torch.compile(model, **compile_kwargs)` after `apply_dynamo_settings(model)`."""
    apply_dynamo_settings(model)
    return torch.compile(model, **compile_kwargs)
