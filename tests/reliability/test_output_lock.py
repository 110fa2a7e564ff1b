"""Issue 18, item 1: one run per output folder. A second run into a folder a run is using exits 2
naming the holder (host, PID, start time) and changes nothing there; a folder left locked by a
killed run is taken over with a warning and --auto-resume continues it."""
import json
import os
import signal
import socket

import pytest

from utils.errors import UserError
from utils.run_dir import LOCK_NAME, OutputDirLock

from .conftest import RESUMABLE_FLAGS
from .helpers import (TINY_FLAGS, assert_ok, assert_same_tensors, files_under, kill_and_reap, load_ckpt, read_text,
                      run_main, wait_for_step)


def _epoch_records(out):
    return [json.loads(line) for line in read_text(out / "log.txt").splitlines() if '"epoch"' in line]


@pytest.mark.slow
def test_a_second_run_into_a_busy_folder_exits_2_and_changes_nothing(spawn, tmp_path):
    out = tmp_path / "out"
    first = spawn(TINY_FLAGS + ["--seed", "1", "--output_dir", out], tmp_path / "first.txt")
    wait_for_step(first, out / "log_rank0.txt", 3)
    holder = json.loads((out / LOCK_NAME).read_text())
    assert holder["pid"] == first.pid and holder["host"] == socket.gethostname()

    first.send_signal(signal.SIGSTOP)  # still running (and holding the folder) however slow the second start is
    try:
        second = run_main(TINY_FLAGS + ["--seed", "2", "--output_dir", out])
    finally:
        first.send_signal(signal.SIGCONT)
    assert second.returncode == 2, second.stderr[-3000:]
    errors = [line.split(" ERROR ", 1)[1] for line in second.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "Traceback" not in second.stderr
    assert f"--output_dir {out} is in use by another run" in errors[0]
    assert f"PID {first.pid} on host {socket.gethostname()}, started {holder['started']}" in errors[0]

    assert first.wait(timeout=300) == 0, read_text(tmp_path / "first.txt")[-3000:]
    # Everything in the folder is the first run's: its arguments, its two epochs, its checkpoints.
    assert "seed: 1" in read_text(out / "args.yaml")
    assert [r["epoch"] for r in _epoch_records(out)] == [0, 1]
    assert load_ckpt(out / "checkpoint.pth")["args"]["seed"] == 1
    assert load_ckpt(out / "best_checkpoint.pth")["args"]["seed"] == 1
    assert "in use by another run" not in read_text(out / "log_rank0.txt")
    assert not (out / LOCK_NAME).exists()  # released when the first run ended


@pytest.mark.slow
def test_a_killed_runs_lock_is_taken_over_and_auto_resume_finishes_the_run(spawn, tmp_path, reference_run):
    out = tmp_path / "out"
    flags = RESUMABLE_FLAGS + ["--output_dir", out]
    first = spawn.resumable_run(out, tmp_path / "first.txt", until_step=10)
    assert kill_and_reap(first, signal.SIGKILL) == -signal.SIGKILL
    assert json.loads((out / LOCK_NAME).read_text())["pid"] == first.pid  # left behind by the killed run

    resumed = run_main(flags + ["--auto-resume"])
    assert_ok(resumed)
    warnings = [line for line in resumed.stderr.splitlines() if "taking over" in line]
    assert len(warnings) == 1 and f"PID {first.pid}" in warnings[0] and "killed or crashed" in warnings[0]
    assert "resuming at epoch 0, step" in resumed.stderr
    assert_same_tensors(load_ckpt(out / "checkpoint.pth")["model"], reference_run["model"])
    assert LOCK_NAME not in files_under(out)


def test_the_lock_in_one_process(tmp_path):
    """Held: a second holder is refused with the first one's PID; released: the file is gone and the
    folder can be taken again; a folder that does not exist yet is not locked (nothing is written)."""
    first = OutputDirLock(str(tmp_path))
    first.acquire()
    first.acquire()  # idempotent
    with pytest.raises(UserError, match=f"in use by another run \\(PID {os.getpid()} on host"):
        OutputDirLock(str(tmp_path)).acquire()
    first.release()
    assert not (tmp_path / LOCK_NAME).exists()
    with OutputDirLock(str(tmp_path)) as again:
        again.acquire()
        assert again.held
    assert not again.held and os.listdir(tmp_path) == []
    OutputDirLock("").acquire()  # no --output_dir: nothing to lock
