"""A kill (or a full disk) while `checkpoint.pth` is being written never leaves an unreadable
checkpoint: the writer goes through a temporary file, fsync and rename, so the previous
checkpoint stays valid; `--checkpoint-hist K` keeps exactly the last K epoch copies."""
import errno
import glob
import io
import os
import signal
import subprocess
import textwrap

import pytest
import torch

from utils.checkpoint import load_checkpoint_file, save_checkpoint
from utils.errors import UserError

from .conftest import RESUMABLE_FLAGS, SAVE_EVERY
from .helpers import (PYTHON, ROOT, TINY_FLAGS, assert_ok, assert_same_tensors, error_lines, load_ckpt, run_main,
                      subprocess_env)

# Runs main.cli() with torch.save replaced: save number FAULT_AT_SAVE writes half of its bytes,
# then either the process SIGKILLs itself (a node dying mid-write) or ENOSPC is raised (disk full).
FAULTY_WRITER = textwrap.dedent("""
    import io, os, signal, sys
    import torch
    real_save = torch.save
    fault_at, mode = int(os.environ["FAULT_AT_SAVE"]), os.environ["FAULT_MODE"]
    count = [0]

    def faulty_save(obj, f, *args, **kwargs):
        if not hasattr(f, "fileno") or isinstance(f, io.BytesIO):
            return real_save(obj, f, *args, **kwargs)
        count[0] += 1
        if count[0] != fault_at:
            return real_save(obj, f, *args, **kwargs)
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        data = buffer.getvalue()
        f.write(data[: len(data) // 2])
        f.flush()
        os.fsync(f.fileno())
        if mode == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise OSError(28, "No space left on device")

    torch.save = faulty_save
    import main
    sys.exit(main.cli(sys.argv[1:]))
""")


def _run_with_faulty_writer(args, fault_at: int, mode: str):
    env = subprocess_env({"FAULT_AT_SAVE": str(fault_at), "FAULT_MODE": mode})
    return subprocess.run([PYTHON, "-c", FAULTY_WRITER] + [str(a) for a in args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_kill_during_checkpoint_write_keeps_previous_checkpoint(tmp_path, reference_run):
    out = tmp_path / "run"
    flags = RESUMABLE_FLAGS + ["--output_dir", out]
    # Saves 1 and 2 (after steps 4 and 8) succeed; the process dies halfway through save 3.
    proc = _run_with_faulty_writer(flags, fault_at=3, mode="kill")
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]

    half_written = glob.glob(str(out / ".tmp_checkpoint.pth.*"))
    assert len(half_written) == 1  # the kill really happened inside the write
    with pytest.raises(UserError, match="truncated"):  # empty or cut, wherever the kill landed
        load_checkpoint_file(half_written[0])
    previous = load_checkpoint_file(str(out / "checkpoint.pth"))
    assert (previous["epoch"], previous["epoch_step"], previous["epoch_complete"]) == (0, 2 * SAVE_EVERY, False)

    resumed = run_main(flags + ["--auto-resume"])
    assert_ok(resumed)
    assert f"resuming at epoch 0, step {2 * SAVE_EVERY}" in resumed.stderr
    final = load_ckpt(out / "checkpoint.pth")
    assert_same_tensors(final["model"], reference_run["model"])
    # Leftovers of the killed writer are cleaned up, so repeated kills cannot fill the disk.
    assert not glob.glob(str(out / ".tmp_*"))


SHORT_EPOCHS = ["--synthetic-train-size", "64", "--epochs", "4"]  # 4 steps per epoch


@pytest.mark.slow
def test_disk_full_during_write_keeps_previous_and_training_continues(tmp_path):
    out = tmp_path / "run"
    # The 2nd write of the run (checkpoint.pth or best_checkpoint.pth) hits a full disk.
    proc = _run_with_faulty_writer(TINY_FLAGS + SHORT_EPOCHS + ["--output_dir", out], fault_at=2, mode="enospc")
    assert_ok(proc)
    errors = error_lines(proc.stderr)
    assert len(errors) == 1 and "could not write checkpoint" in errors[0] and "previous checkpoint" in errors[0]
    assert not glob.glob(str(out / ".tmp_*"))
    for path in glob.glob(str(out / "*.pth")):
        load_checkpoint_file(path)
    assert load_ckpt(out / "checkpoint.pth")["epoch"] == 3


@pytest.mark.slow
def test_checkpoint_hist_keeps_last_k_loadable_epoch_copies(tmp_path):
    out = tmp_path / "run"
    assert_ok(run_main(TINY_FLAGS + SHORT_EPOCHS + ["--checkpoint-hist", "2", "--output_dir", out]))
    kept = sorted(os.path.basename(p) for p in glob.glob(str(out / "checkpoint-*.pth")))
    assert kept == ["checkpoint-0002.pth", "checkpoint-0003.pth"]
    older, newest, current = (load_ckpt(out / name) for name in kept + ["checkpoint.pth"])
    assert (older["epoch"], newest["epoch"]) == (2, 3) and older["epoch_complete"]
    assert_same_tensors(newest["model"], current["model"])
    assert not all(torch.equal(older["model"][k], newest["model"][k]) for k in older["model"])


def test_failed_write_leaves_old_file_and_no_temporary(tmp_path, monkeypatch):
    """Fast, in-process: ENOSPC in the middle of the write."""
    path = tmp_path / "checkpoint.pth"
    save_checkpoint({"model": {"w": torch.ones(3)}, "epoch": 1}, str(path))
    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        buffer = io.BytesIO()
        real_save(obj, buffer)
        f.write(buffer.getvalue()[:10])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError):
        save_checkpoint({"model": {"w": torch.zeros(3)}, "epoch": 2}, str(path))
    assert os.listdir(tmp_path) == ["checkpoint.pth"]
    assert load_checkpoint_file(str(path))["epoch"] == 1
