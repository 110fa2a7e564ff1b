"""Slurm preemption: SIGTERM / SIGUSR1 make the trainer finish the current step, write a
mid-epoch checkpoint, leave `.preempted` and exit 0; `scripts/slurm_train.sbatch` then
requeues the job (run here through bash with fake `srun` / `scontrol` on PATH)."""
import os
import signal
import stat
import time

import pytest

from .conftest import RESUMABLE_FLAGS
from .helpers import (PYTHON, ROOT, TINY_FLAGS, assert_ok, assert_same_tensors, global_steps_logged, load_ckpt,
                      read_text, run_main, wait_for_step)

SBATCH = os.path.join(ROOT, "scripts", "slurm_train.sbatch")
JOB_ID = "4242"


@pytest.mark.slow
def test_sigterm_saves_exits_zero_and_resume_is_bitwise_identical(spawn, tmp_path, reference_run):
    out = tmp_path / "run"
    proc = spawn.resumable_run(out, tmp_path / "console.txt", until_step=6)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0, read_text(tmp_path / "console.txt")[-3000:]

    log = read_text(out / "log_rank0.txt")
    assert "stopped by SIGTERM" in log and "exiting with status 0" in log
    assert (out / ".preempted").read_text().startswith("stopped by SIGTERM")
    saved = load_ckpt(out / "checkpoint.pth")
    # Nothing is lost: the checkpoint holds every step logged as done, plus the step that
    # was running when the signal came (finished, saved, but not logged).
    assert saved["run_state"]["optimizer_steps"] - global_steps_logged(log) in (0, 1)
    assert not saved["epoch_complete"] and saved["epoch_step"] == saved["run_state"]["optimizer_steps"]

    resumed = run_main(RESUMABLE_FLAGS + ["--output_dir", out, "--auto-resume"])
    assert_ok(resumed)
    assert f"resuming at epoch 0, step {saved['epoch_step']}" in resumed.stderr
    assert not (out / ".preempted").exists()  # a finished run must not be requeued
    final = load_ckpt(out / "checkpoint.pth")
    assert_same_tensors(final["model"], reference_run["model"])
    assert final["run_state"] == reference_run["run_state"]


# ----------------------------------------------------------------------------- the Slurm script

def _fake_slurm_bin(tmp_path):
    """`srun` runs its task in place (options dropped); `scontrol` records its arguments."""
    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir()
    scripts = {
        "srun": '#!/usr/bin/env bash\nwhile [[ $# -gt 0 && $1 == --* ]]; do shift; done\nexec "$@"\n',
        "scontrol": '#!/usr/bin/env bash\necho "$*" >> "$SCONTROL_LOG"\n'
                    'if [[ $1 == show && $2 == hostnames ]]; then echo localhost; fi\n',
    }
    for name, text in scripts.items():
        path = bin_dir / name
        path.write_text(text)
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return bin_dir


def _slurm_env(tmp_path, out):
    bin_dir = _fake_slurm_bin(tmp_path)
    return {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "OUTPUT_DIR": str(out), "PYTHON": PYTHON,
        "SLURM_JOB_ID": JOB_ID, "SLURM_JOB_NODELIST": "node001", "SLURM_SUBMIT_DIR": ROOT,
        "SLURM_CPUS_PER_TASK": "0", "SCONTROL_LOG": str(tmp_path / "scontrol.log"),
    }


def _start_sbatch(spawn, tmp_path, out, extra_flags=()):
    cmd = ["bash", SBATCH] + TINY_FLAGS + list(extra_flags)
    return spawn.process(cmd, tmp_path / "slurm.out", env=_slurm_env(tmp_path, out))


def _trainer_pid(bash_pid: int, timeout: float = 30.0) -> int:
    """The Python process the batch script started (srun exec's into it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for task in os.listdir(f"/proc/{bash_pid}/task"):
            children = read_text(f"/proc/{bash_pid}/task/{task}/children").split()
            for child in children:
                if "main.py" in read_text(f"/proc/{child}/cmdline"):
                    return int(child)
        time.sleep(0.05)
    raise AssertionError("the batch script did not start the trainer")


@pytest.mark.slow
@pytest.mark.parametrize("how", ["SIGUSR1 to the job step", "SIGTERM to every process of the job"])
def test_slurm_script_requeues_after_preemption(spawn, tmp_path, how):
    """--signal=USR1@120 reaches only the srun tasks; preemption sends SIGTERM to the whole
    job, batch shell included: in both cases the job is requeued and the script exits 0."""
    out = tmp_path / "out"
    proc = _start_sbatch(spawn, tmp_path, out)
    trainer = _trainer_pid(proc.pid)
    wait_for_step(proc, out / "log_rank0.txt", 3)
    if how.startswith("SIGUSR1"):
        os.kill(trainer, signal.SIGUSR1)
    else:
        os.killpg(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=120) == 0, read_text(tmp_path / "slurm.out")[-4000:]

    console = read_text(tmp_path / "slurm.out")
    calls = read_text(tmp_path / "scontrol.log").splitlines()
    assert calls == ["show hostnames node001", f"requeue {JOB_ID}"]
    assert f"requeueing job {JOB_ID}" in console
    assert not (out / ".preempted").exists()  # consumed, so the requeued job starts clean
    saved = load_ckpt(out / "checkpoint.pth")
    assert not saved["epoch_complete"] and saved["run_state"]["optimizer_steps"] >= 3
    assert "--auto-resume" in read_text(f"{out}/log_rank0.txt")  # the requeued job resumes


@pytest.mark.slow
def test_slurm_script_does_not_requeue_a_failed_run(spawn, tmp_path):
    """A run that fails (here: a bad command line) is not requeued: its status is the job's."""
    out = tmp_path / "out"
    proc = _start_sbatch(spawn, tmp_path, out, ["--model", "no_such_model"])
    assert proc.wait(timeout=120) == 2, read_text(tmp_path / "slurm.out")[-4000:]
    assert "requeue" not in read_text(tmp_path / "scontrol.log")


@pytest.mark.slow
def test_ctrl_c_saves_like_sigterm_and_the_run_resumes(spawn, tmp_path, reference_run):
    """SIGINT (Ctrl-C) during training: finish the step, write the mid-epoch checkpoint, print
    the resume line, exit 0; no KeyboardInterrupt traceback, nothing lost."""
    out = tmp_path / "run"
    proc = spawn.resumable_run(out, tmp_path / "console.txt", until_step=6)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == 0, read_text(tmp_path / "console.txt")[-3000:]
    console = read_text(tmp_path / "console.txt")
    assert "Traceback" not in console and "KeyboardInterrupt" not in console
    log = read_text(out / "log_rank0.txt")
    assert "stopped by SIGINT" in log and "resume with --auto-resume" in log
    saved = load_ckpt(out / "checkpoint.pth")
    assert not saved["epoch_complete"] and saved["run_state"]["optimizer_steps"] - global_steps_logged(log) in (0, 1)
    resumed = run_main(RESUMABLE_FLAGS + ["--output_dir", out, "--auto-resume"])
    assert_ok(resumed)
    assert_same_tensors(load_ckpt(out / "checkpoint.pth")["model"], reference_run["model"])


def test_a_second_ctrl_c_aborts_at_once():
    from utils.distributed import StopRequest
    request = StopRequest()
    request._on_signal("SIGINT")
    assert request.is_set() and request.signal_name == "SIGINT"
    with pytest.raises(KeyboardInterrupt):
        request._on_signal("SIGINT")
    other = StopRequest()
    other._on_signal("SIGTERM")
    other._on_signal("SIGTERM")  # repeated preemption signals never abort
    assert other.is_set()


def test_interrupt_outside_training_is_one_line_and_status_130(monkeypatch, caplog):
    import main

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(main, "main", interrupted)
    assert main.cli(["--device", "cpu"]) == 130
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "Ctrl-C" in errors[0]


@pytest.mark.slow
def test_ctrl_c_pressed_again_after_the_checkpoint_keeps_the_announced_status_0(spawn, tmp_path):
    """Issue 18, item 9: a second Ctrl-C after "checkpoint written ... exiting with status 0" made the
    process die of SIGINT (status 130) or print a KeyboardInterrupt traceback while shutting down."""
    out = tmp_path / "run"
    console = tmp_path / "console.txt"
    proc = spawn(RESUMABLE_FLAGS + ["--output_dir", out, "--num_workers", "2"], console)
    wait_for_step(proc, out / "log_rank0.txt", 6)
    proc.send_signal(signal.SIGINT)
    deadline = time.monotonic() + 120
    while "exiting with status 0" not in read_text(console) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.001)
    while proc.poll() is None and time.monotonic() < deadline:  # keep pressing Ctrl-C until it has exited
        proc.send_signal(signal.SIGINT)
        time.sleep(0.01)
    assert proc.wait(timeout=30) == 0, read_text(console)[-3000:]
    text = read_text(console)
    assert "exiting with status 0" in text and "Traceback" not in text and "KeyboardInterrupt" not in text
    assert not load_ckpt(out / "checkpoint.pth")["epoch_complete"]
