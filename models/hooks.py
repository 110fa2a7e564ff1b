"""A method's training-time callbacks: one class with no-op defaults, like a Lightning callback.

A family (`models/family.py`) names a hooks factory, `hooks=MyHooks`, called once per run as
`MyHooks(model, options)`; it may return None when the model is not one it handles. The
trainer calls the combined hooks of every active family on the unwrapped model and never
computes a method's schedule itself: hooks apply values through explicit setters
(`model.set_lambda(v)`, `model.set_keep_rate(v)`).

`options` holds the family's own flag values (by dest) plus `epochs`, `lr`, `weight_decay`,
`input_size` and `seed` (see `family.RUN_FIELDS`), never the trainer's whole namespace.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

from torch import nn

__all__ = ["MethodHooks", "CombinedHooks"]


class MethodHooks:
    """No-op base. A method overrides what it needs."""

    # False: fine-tuning runs with model.train(False) (EViT's official recipe); None: the trainer decides.
    train_mode_when_finetuning: Optional[bool] = None
    # `family.Command`s: extra actions (visualisation, speed test) switched on by the family's flags.
    commands: Sequence[Any] = ()

    def __init__(self, model: Optional[nn.Module] = None, options: Any = None):
        self.options = options

    # -- before training -----------------------------------------------------------------
    def wrap_criterion(self, criterion: nn.Module, model: nn.Module) -> nn.Module:
        """The training loss; called as `criterion(samples, outputs, targets)`."""
        return criterion

    def param_groups(self, model: nn.Module, lrs: List[float]) -> Optional[list]:
        """Optimizer parameter groups, or None for the trainer's default groups. `lrs` are the
        values of `--lr` (one or more), already scaled by the batch-size rule."""
        return None

    def ddp_find_unused_parameters(self, model: nn.Module) -> bool:
        return False

    def prepare_eval(self, model: nn.Module) -> None:
        """Evaluation-time state for `--eval` (the dilution models evaluate at lambda 0)."""

    # -- schedules -----------------------------------------------------------------------
    def on_epoch_start(self, model: nn.Module, epoch: int) -> None:
        pass

    def on_step_start(self, model: nn.Module, epoch: int, step: int, steps_per_epoch: int) -> None:
        pass

    def before_optimizer_step(self, model: nn.Module, optimizer: Any) -> None:
        """Once per optimizer step, before its (last) backward and the step, after the lr scheduler
        set this step's group lrs: the place to scale or zero a group's lr (a frozen backbone)."""

    def after_optimizer_step(self, model: nn.Module) -> None:
        pass

    def log_state(self, model: nn.Module) -> Dict[str, float]:
        """The method's current state for progress lines and log.txt ({name: number})."""
        return {}

    # -- checkpoints and the end of the run -----------------------------------------------
    def best_checkpoint_allowed(self, model: nn.Module) -> bool:
        return True

    def checkpoint_state(self, model: nn.Module) -> dict:
        return {}

    def report(self, model: nn.Module, context: Any) -> Dict[str, Any]:
        """End-of-training numbers, logged and written to log.txt. `context` has `data_loader`
        (validation), `device` and `output_dir`."""
        return {}


class CombinedHooks(MethodHooks):
    """Several families' hooks called in order: the first criterion wrapper is innermost, the
    first non-None param groups win, best-checkpoint needs every one to agree."""

    def __init__(self, hooks: Sequence[MethodHooks] = (), names: Sequence[str] = ()):
        super().__init__()
        self.hooks = list(hooks)
        self.names = list(names) or [type(hook).__name__ for hook in self.hooks]  # the families, for reports
        flags = [h.train_mode_when_finetuning for h in self.hooks if h.train_mode_when_finetuning is not None]
        self.train_mode_when_finetuning = (all(flags) if flags else None)
        self.commands = tuple(command for hook in self.hooks for command in hook.commands)

    def wrap_criterion(self, criterion, model):
        for hook in self.hooks:
            criterion = hook.wrap_criterion(criterion, model)
        return criterion

    def param_groups(self, model, lrs):
        for hook in self.hooks:
            groups = hook.param_groups(model, lrs)
            if groups is not None:
                return groups
        return None

    def ddp_find_unused_parameters(self, model):
        return any(hook.ddp_find_unused_parameters(model) for hook in self.hooks)

    def prepare_eval(self, model):
        for hook in self.hooks:
            hook.prepare_eval(model)

    def on_epoch_start(self, model, epoch):
        for hook in self.hooks:
            hook.on_epoch_start(model, epoch)

    def on_step_start(self, model, epoch, step, steps_per_epoch):
        for hook in self.hooks:
            hook.on_step_start(model, epoch, step, steps_per_epoch)

    def before_optimizer_step(self, model, optimizer):
        for hook in self.hooks:
            hook.before_optimizer_step(model, optimizer)

    def after_optimizer_step(self, model):
        for hook in self.hooks:
            hook.after_optimizer_step(model)

    def log_state(self, model):
        state = {}
        for hook in self.hooks:
            state.update(hook.log_state(model))
        return state

    def best_checkpoint_allowed(self, model):
        return all(hook.best_checkpoint_allowed(model) for hook in self.hooks)

    def checkpoint_state(self, model):
        state = {}
        for hook in self.hooks:
            state.update(hook.checkpoint_state(model))
        return state

    def report(self, model, context):
        result = {}
        for hook in self.hooks:
            result.update(hook.report(model, context))
        return result
