"""Per-method training hooks: how schedules and checkpoint rules reach the engine.

A method family (`models/family.py`) may give `training_hooks(model, options)`; the
registry combines the hooks of the model's active families (with their `log_state` and
`after_optimizer_step` callbacks) into one `CombinedHooks`. The engine never computes a
method's schedule itself; it calls these hooks on the unwrapped model, and the hooks apply
values through explicit setters (`model.set_lambda(v)`, `model.set_keep_rate(v)`).
"""
from __future__ import annotations

from typing import Callable, Optional

from torch import nn


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

    def after_optimizer_step(self, model: nn.Module) -> None:
        pass

    def log_state(self, model: nn.Module) -> dict:
        """The method's current state for progress lines and log.txt ({name: number})."""
        return {}


class CallbackHooks(TrainingHooks):
    """A family's `log_state` / `after_optimizer_step` callbacks as hooks."""

    def __init__(self, log_state: Optional[Callable] = None, after_optimizer_step: Optional[Callable] = None):
        self._log_state = log_state
        self._after_step = after_optimizer_step

    def after_optimizer_step(self, model):
        if self._after_step is not None:
            self._after_step(model)

    def log_state(self, model):
        return dict(self._log_state(model)) if self._log_state is not None else {}


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

    def after_optimizer_step(self, model):
        for hook in self.hooks:
            hook.after_optimizer_step(model)

    def log_state(self, model):
        state = {}
        for hook in self.hooks:
            state.update(hook.log_state(model))
        return state


def build_training_hooks(model: nn.Module, args) -> TrainingHooks:
    """The hooks of every registered family that recognises `model` (families ignore other
    models), from an argparse-like namespace of flag values. The trainer uses
    `models.family.training_hooks(model, name, args)`, which also knows the model's name."""
    from .family import families, options_for

    found = []
    for family in families():
        if family.training_hooks is not None:
            hook = family.training_hooks(model, options_for(family, args))
            if hook is not None:
                found.append(hook)
    return CombinedHooks(found)
