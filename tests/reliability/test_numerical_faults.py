"""Numerical faults: a non-finite loss stops training (exit 1) with one message naming the
epoch and step, and the last good checkpoint stays; `--skip-nonfinite K` skips up to K bad
steps (no update, counted in the checkpoint) before stopping.

Which comes first when a run diverges, a NaN loss or NaN weights (an update that
overflowed while its loss was finite), depends on the CPU's rounding. So the faults here
are injected at a chosen step, in both orders, and each order must end in exactly one
ERROR line and a finite checkpoint. One run with a real divergence (huge learning rate)
checks only what holds for either order.
"""
import re
import subprocess
import textwrap
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from engine import NonFiniteLossError, RunState, train_one_epoch

from .helpers import PYTHON, ROOT, TINY_FLAGS, all_finite, error_lines, load_ckpt, read_text, run_main, subprocess_env

# ----------------------------------------------------------------------------- engine, in process


def _tiny_training(steps: int = 6):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    loader = [(torch.randn(4, 4), torch.tensor([0, 1, 2, 0])) for _ in range(steps)]
    return model, loader, torch.optim.SGD(model.parameters(), lr=0.1)


def _nan_loss_at(calls: set):
    """A cross-entropy criterion whose loss is NaN on the given (1-based) calls."""
    count = [0]

    def criterion(samples, outputs, targets):
        count[0] += 1
        loss = F.cross_entropy(outputs, targets)
        return loss * float("nan") if count[0] in calls else loss

    return criterion


def _nan_weights_after_update(optimizer, update: int):
    """Overwrite the weight with NaN right after optimizer step `update` (1-based)."""
    done = [0]

    def hook(opt, args, kwargs):
        done[0] += 1
        if done[0] == update:
            with torch.no_grad():
                opt.param_groups[0]["params"][0].fill_(float("nan"))

    optimizer.register_step_post_hook(hook)


def _train(model, loader, optimizer, criterion, saved, **args):
    settings = SimpleNamespace(print_freq=0, save_every_iters=1, skip_nonfinite=0)
    vars(settings).update(args)
    train_one_epoch(model, criterion, loader, optimizer, torch.device("cpu"), 0, None, args=settings,
                    run_state=RunState(), save_mid_epoch=lambda next_step: saved.append(
                        (next_step, all_finite(model.state_dict()))))


def test_loss_first_stops_at_that_step_before_any_bad_checkpoint():
    model, loader, optimizer = _tiny_training()
    saved = []
    with pytest.raises(NonFiniteLossError, match=r"^loss is nan at epoch 0, step 3: training stopped"):
        _train(model, loader, optimizer, _nan_loss_at({4}), saved)
    assert saved == [(1, True), (2, True), (3, True)]
    assert all_finite(model.state_dict())


@pytest.mark.parametrize("train_kwargs,message,checkpoints", [
    # a checkpoint is due after the bad step: training stops before writing it
    ({}, r"^weights became non-finite \(weight\) at epoch 0, step 2 while the loss was finite: training stopped",
     [(1, True), (2, True)]),
    # between checkpoints the next loss is NaN; skipping cannot help, so the skip budget is not spent
    (dict(save_every_iters=10, skip_nonfinite=5),
     r"^loss is nan at epoch 0, step 3 because the weights are already non-finite \(weight\)", []),
], ids=["checkpoint-due", "between-checkpoints-with-skips-left"])
def test_nan_weights_stop_training_without_saving_them(train_kwargs, message, checkpoints):
    model, loader, optimizer = _tiny_training()
    _nan_weights_after_update(optimizer, 3)
    saved = []
    with pytest.raises(NonFiniteLossError, match=message):
        _train(model, loader, optimizer, _nan_loss_at(set()), saved, **train_kwargs)
    assert saved == checkpoints


def test_weights_first_at_the_last_step_stops_before_the_epoch_checkpoint():
    model, loader, optimizer = _tiny_training(steps=3)
    _nan_weights_after_update(optimizer, 3)
    with pytest.raises(NonFiniteLossError, match=r"weights became non-finite \(weight\) at epoch 0, step 2"):
        _train(model, loader, optimizer, _nan_loss_at(set()), [], save_every_iters=0)


def test_skips_then_stops_with_finite_weights():
    model, loader, optimizer = _tiny_training()
    saved = []
    with pytest.raises(NonFiniteLossError, match=r"^loss is nan at epoch 0, step 5: training stopped"):
        _train(model, loader, optimizer, _nan_loss_at({2, 4, 6}), saved, skip_nonfinite=2)
    # Skipped steps make no update and no checkpoint: updates after steps 0, 2 and 4.
    assert saved == [(1, True), (3, True), (5, True)]


# ----------------------------------------------------------------------------- main.py, end to end

# Runs main.cli() with a fault injected at a chosen step: FAULT="loss:6,8,10" makes the loss of
# those training forwards (1-based) NaN; FAULT="weights:6" overwrites one weight tensor with NaN
# right after optimizer step 6 (as an overflowing update would leave it) while its loss was finite.
FAULTY_RUN = textwrap.dedent("""
    import os, sys
    import torch
    import engine
    import main
    kind, steps = os.environ["FAULT"].split(":")
    steps = {int(s) for s in steps.split(",")}
    real_step, real_build_criterion, counts = engine._backward_and_step, main.build_criterion, [0, 0]

    def poisoned_step(loss, optimizer, *args, **kwargs):
        real_step(loss, optimizer, *args, **kwargs)
        counts[0] += 1
        if kind == "weights" and counts[0] in steps:
            with torch.no_grad():
                optimizer.param_groups[0]["params"][0].fill_(float("nan"))

    class PoisonedCriterion:
        def __init__(self, inner):
            self.inner = inner

        def __call__(self, samples, outputs, targets):
            loss = self.inner(samples, outputs, targets)
            if torch.is_grad_enabled():
                counts[1] += 1
                if kind == "loss" and counts[1] in steps:
                    loss = loss * float("nan")
            return loss

        def __getattr__(self, name):
            return getattr(self.inner, name)

    engine._backward_and_step = poisoned_step
    main.build_criterion = lambda *a, **k: PoisonedCriterion(real_build_criterion(*a, **k))
    sys.exit(main.cli(sys.argv[1:]))
""")


def _run_with_fault(fault: str, flags, out):
    args = [str(f) for f in TINY_FLAGS + flags + ["--output_dir", out]]
    return subprocess.run([PYTHON, "-c", FAULTY_RUN] + args, cwd=ROOT, env=subprocess_env({"FAULT": fault}),
                          capture_output=True, text=True, timeout=300)


def _losses_by_step(log: str) -> dict:
    """Step -> loss of that step from the progress lines (print-freq 1)."""
    return {int(step): float(loss) for step, loss in
            re.findall(r"Epoch: \[0\] \[\s*(\d+)/\d+\].*?loss: (\S+) \(", log)}


@pytest.mark.slow
def test_loss_first_one_error_and_the_checkpoint_before_it(tmp_path):
    out = tmp_path / "out"
    proc = _run_with_fault("loss:6", ["--save-every-iters", "1"], out)
    assert proc.returncode == 1, proc.stderr[-3000:]
    errors = error_lines(proc.stderr)
    assert len(errors) == 1, errors
    assert re.search(r"loss is nan at epoch 0, step 5: training stopped .*--skip-nonfinite", errors[0]), errors[0]
    losses = _losses_by_step(read_text(out / "log_rank0.txt"))
    assert sorted(losses) == list(range(1, 5 + 1))  # progress of steps 0..4 (MetricLogger logs from 1)
    last_good = load_ckpt(out / "checkpoint.pth")
    assert (last_good["epoch"], last_good["epoch_step"], last_good["epoch_complete"]) == (0, 5, False)
    assert last_good["run_state"] == {"optimizer_steps": 5, "nonfinite_skipped": 0}
    assert all_finite(last_good["model"]) and all_finite(last_good["optimizer"]["state"][0])


@pytest.mark.slow
def test_weights_first_one_error_and_never_a_nonfinite_checkpoint(tmp_path):
    """A step whose loss was finite can leave NaN weights; the run stops before the checkpoint
    due right after it, so the last checkpoint on disk is the last good one."""
    out = tmp_path / "out"
    proc = _run_with_fault("weights:6", ["--save-every-iters", "1"], out)
    assert proc.returncode == 1, proc.stderr[-3000:]
    errors = error_lines(proc.stderr)
    assert len(errors) == 1, errors
    assert re.search(r"weights became non-finite \(\S+\) at epoch 0, step 5 while the loss was finite: "
                     r"training stopped", errors[0]), errors[0]
    saved = load_ckpt(out / "checkpoint.pth")
    assert (saved["epoch_step"], saved["run_state"]["optimizer_steps"]) == (5, 5)
    assert all_finite(saved["model"])


@pytest.mark.slow
def test_skip_nonfinite_skips_k_steps_then_stops(tmp_path):
    out = tmp_path / "out"
    proc = _run_with_fault("loss:6,8,10", ["--save-every-iters", "1", "--skip-nonfinite", "2"], out)
    assert proc.returncode == 1, proc.stderr[-3000:]
    skipped = re.findall(r"non-finite loss \(nan\) at epoch 0, step (\d+): step skipped \((\d)/2", proc.stderr)
    assert skipped == [("5", "1"), ("7", "2")]
    errors = error_lines(proc.stderr)
    assert len(errors) == 1, errors
    assert "loss is nan at epoch 0, step 9: training stopped" in errors[0]
    saved = load_ckpt(out / "checkpoint.pth")
    assert all_finite(saved["model"])
    # Skipped steps made no update: the optimizer count is the number of finite steps so far.
    assert saved["epoch_step"] == 9 and saved["run_state"] == {"optimizer_steps": 7, "nonfinite_skipped": 2}


@pytest.mark.slow
def test_weights_first_is_not_skipped(tmp_path):
    """With NaN weights the next loss is NaN whatever is skipped: stop there, budget untouched."""
    out = tmp_path / "out"
    proc = _run_with_fault("weights:6", ["--save-every-iters", "4", "--skip-nonfinite", "2"], out)
    assert proc.returncode == 1, proc.stderr[-3000:]
    errors = error_lines(proc.stderr)
    assert len(errors) == 1, errors
    assert "loss is nan at epoch 0, step 6 because the weights are already non-finite" in errors[0]
    assert "step skipped" not in proc.stderr
    saved = load_ckpt(out / "checkpoint.pth")
    assert saved["epoch_step"] == 4 and all_finite(saved["model"])


@pytest.mark.slow
def test_real_divergence_ends_in_one_error_whichever_overflows_first(tmp_path):
    """lr 1e3 without clipping overflows within a few steps; whether the loss or the weights
    go first depends on the CPU, and both give one ERROR line and a finite checkpoint."""
    out = tmp_path / "out"
    proc = run_main(TINY_FLAGS + ["--lr", "1e3", "--warmup-epochs", "0", "--save-every-iters", "1",
                                  "--output_dir", out])
    assert proc.returncode == 1, proc.stderr[-3000:]
    errors = error_lines(proc.stderr)
    assert len(errors) == 1, errors
    match = re.search(r"(?:loss is \S+|weights became non-finite \(\S+\)) at epoch (\d+), step (\d+)", errors[0])
    assert match and "training stopped" in errors[0], errors[0]
    saved = load_ckpt(out / "checkpoint.pth")
    assert all_finite(saved["model"]) and all_finite(saved["optimizer"]["state"][0])
    stop_at = (int(match.group(1)), int(match.group(2)))
    assert (saved["epoch"], saved["epoch_step"]) <= stop_at
