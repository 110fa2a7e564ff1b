"""Per-method training hooks: how schedules and checkpoint rules reach the engine.

A family module may define `training_hooks(model, args) -> TrainingHooks | None`.
The engine never computes a method's schedule itself; it calls these hooks on the
unwrapped model, and the hooks apply values through explicit setters
(`model.set_lambda(v)`, `model.set_keep_rate(v)`).
"""
from __future__ import annotations

import importlib

from torch import nn

# Family modules asked for hooks, in this order.
_HOOK_FAMILIES = ("models.shrink", "models.evit", "models.ltm")


class TrainingHooks:
    """No-op base. Subclasses override what their method needs."""

    def on_epoch_start(self, model: nn.Module, epoch: int) -> None:
        pass

    def on_step_start(self, model: nn.Module, epoch: int, step: int, steps_per_epoch: int) -> None:
        pass

    def best_checkpoint_allowed(self, model: nn.Module) -> bool:
        return True

    def checkpoint_state(self, model: nn.Module) -> dict:
        return {}


class CombinedHooks(TrainingHooks):
    """Several families' hooks called in order; best-checkpoint needs every one to agree."""

    def __init__(self, hooks: list[TrainingHooks]):
        self.hooks = hooks

    def on_epoch_start(self, model, epoch):
        for hook in self.hooks:
            hook.on_epoch_start(model, epoch)

    def on_step_start(self, model, epoch, step, steps_per_epoch):
        for hook in self.hooks:
            hook.on_step_start(model, epoch, step, steps_per_epoch)

    def best_checkpoint_allowed(self, model):
        return all(hook.best_checkpoint_allowed(model) for hook in self.hooks)

    def checkpoint_state(self, model):
        state = {}
        for hook in self.hooks:
            state.update(hook.checkpoint_state(model))
        return state


def build_training_hooks(model: nn.Module, args) -> TrainingHooks:
    """Collect the hooks every family module offers for `model` (unwrapped, not DDP)."""
    found = []
    for module_name in _HOOK_FAMILIES:
        factory = getattr(importlib.import_module(module_name), "training_hooks", None)
        if factory is None:
            continue
        hook = factory(model, args)
        if hook is not None:
            found.append(hook)
    return CombinedHooks(found)
