"""Numerical faults: a non-finite loss stops training (exit 1) with a message naming the
epoch and step, and the last good checkpoint stays; `--skip-nonfinite K` skips up to K bad
steps (no update, counted in the checkpoint) before stopping. The fault is real: a huge
learning rate without clipping makes the tiny ViT's activations overflow within a few steps.
Non-finite weights after a step with a finite loss are never written to a checkpoint."""
import re
import subprocess
import textwrap

import pytest

from .helpers import PYTHON, ROOT, TINY_FLAGS, all_finite, error_lines, load_ckpt, read_text, run_main, subprocess_env

EXPLODING = TINY_FLAGS + ["--lr", "1e3", "--warmup-epochs", "0", "--save-every-iters", "1"]


def _losses_by_step(log: str) -> dict:
    """Step -> loss of that step from the progress lines (print-freq 1)."""
    return {int(step): float(loss) for step, loss in
            re.findall(r"Epoch: \[0\] \[\s*(\d+)/\d+\].*?loss: (\S+) \(", log)}


@pytest.mark.slow
def test_nonfinite_loss_stops_naming_the_step_and_keeps_last_good_checkpoint(tmp_path):
    out = tmp_path / "out"
    proc = run_main(EXPLODING + ["--output_dir", out])
    assert proc.returncode == 1, proc.stderr[-3000:]
    errors = error_lines(proc.stderr)
    assert len(errors) == 1, errors
    match = re.search(r"loss is (nan|inf|-inf) at epoch 0, step (\d+): training stopped", errors[0])
    assert match, errors[0]
    bad_step = int(match.group(2))
    assert bad_step >= 1 and "--skip-nonfinite" in errors[0]
    # Every logged step before it was finite, and the checkpoint is the one written after it.
    losses = _losses_by_step(read_text(out / "log_rank0.txt"))
    assert sorted(losses) == list(range(1, bad_step + 1))
    last_good = load_ckpt(out / "checkpoint.pth")
    assert (last_good["epoch"], last_good["epoch_step"], last_good["epoch_complete"]) == (0, bad_step, False)
    assert last_good["run_state"] == {"optimizer_steps": bad_step, "nonfinite_skipped": 0}
    assert all_finite(last_good["model"]) and all_finite(last_good["optimizer"]["state"][0])


@pytest.mark.slow
def test_skip_nonfinite_skips_k_steps_then_stops(tmp_path):
    out = tmp_path / "out"
    proc = run_main(EXPLODING + ["--skip-nonfinite", "2", "--output_dir", out])
    assert proc.returncode == 1, proc.stderr[-3000:]
    skipped = re.findall(r"non-finite loss \((?:nan|inf|-inf)\) at epoch 0, step (\d+): step skipped \((\d)/2",
                         proc.stderr)
    assert [n for _, n in skipped] == ["1", "2"]
    errors = error_lines(proc.stderr)
    assert len(errors) == 1
    stop_step = int(re.search(r"at epoch 0, step (\d+)", errors[0]).group(1))
    assert stop_step > int(skipped[-1][0]) > int(skipped[0][0])
    saved = load_ckpt(out / "checkpoint.pth")
    assert all_finite(saved["model"])
    # Skipped steps made no update: the optimizer count is the number of finite steps so far.
    assert saved["run_state"]["optimizer_steps"] == stop_step - 2


# Runs main.cli() with one weight tensor overwritten by NaN right after optimizer step
# POISON_AT (as an overflowing update would leave it) while that step's loss was finite.
POISONED_UPDATE = textwrap.dedent("""
    import os, sys
    import torch
    import engine
    real_step, poison_at, done = engine._backward_and_step, int(os.environ["POISON_AT"]), [0]

    def poisoned_step(loss, optimizer, *args, **kwargs):
        real_step(loss, optimizer, *args, **kwargs)
        done[0] += 1
        if done[0] == poison_at:
            with torch.no_grad():
                optimizer.param_groups[0]["params"][0].fill_(float("nan"))

    engine._backward_and_step = poisoned_step
    import main
    sys.exit(main.cli(sys.argv[1:]))
""")


@pytest.mark.slow
def test_nonfinite_weights_are_never_checkpointed(tmp_path):
    """A step whose loss was finite can still leave NaN weights; the checkpoint due right after
    it is not written, so the last checkpoint on disk is the last good one."""
    out = tmp_path / "out"
    flags = TINY_FLAGS + ["--save-every-iters", "1", "--output_dir", out]
    proc = subprocess.run([PYTHON, "-c", POISONED_UPDATE] + [str(f) for f in flags], cwd=ROOT,
                          env=subprocess_env({"POISON_AT": "6"}), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "loss is nan at epoch 0, step 6" in proc.stderr
    assert re.search(r"not writing .*checkpoint\.pth.*non-finite", proc.stderr), proc.stderr[-3000:]
    saved = load_ckpt(out / "checkpoint.pth")
    assert (saved["epoch_step"], saved["run_state"]["optimizer_steps"]) == (5, 5)
    assert all_finite(saved["model"])
