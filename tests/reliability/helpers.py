"""Shared pieces of the fault-injection tests: tiny runs of main.py in subprocesses,
waiting for a given training step in the per-rank log, and checkpoint comparisons."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PYTHON = sys.executable
MAIN = os.path.join(ROOT, "main.py")

# 2-block ViT, 32-dim tokens, 32 px synthetic shapes: 32 steps of 16 images per epoch.
TINY_MODEL = ["--model", "deit_tiny_patch16_224",
              "--model-kwargs", "{'depth': 2, 'embed_dim': 32, 'num_heads': 2, 'patch_size': 8}",
              "--input-size", "32"]
TINY_FLAGS = TINY_MODEL + [
    "--data-set", "SYNTHETIC", "--synthetic-train-size", "512", "--synthetic-val-size", "64",
    "--batch-size", "16", "--epochs", "2", "--no-model-ema", "--mixup", "0", "--cutmix", "0",
    "--reprob", "0", "--aa", "none", "--num_workers", "0", "--deterministic", "--device", "cpu",
    "--lr", "1e-3", "--unscale-lr", "--warmup-epochs", "1", "--print-freq", "1",
]
STEPS_PER_EPOCH = 512 // 16

# "Epoch: [1] [ 7/32]" progress lines of MetricLogger (logged after the step is complete).
_PROGRESS = re.compile(r"Epoch: \[(\d+)\] \[\s*(\d+)/(\d+)\]")


def subprocess_env(extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID",
                "SLURM_STEP_ID", "SLURM_NTASKS"):
        env.pop(key, None)
    env.update(extra or {})
    return env


def run_main(args, timeout: int = 300, env: dict | None = None, launcher=None) -> subprocess.CompletedProcess:
    """Run main.py to completion; stdout/stderr captured as text."""
    cmd = (launcher or [PYTHON]) + [MAIN] + [str(a) for a in args]
    return subprocess.run(cmd, cwd=ROOT, env=subprocess_env(env), capture_output=True, text=True, timeout=timeout)


def start_main(args, log_path, env: dict | None = None, launcher=None) -> subprocess.Popen:
    """Start main.py in the background in its own process group, console output to `log_path`."""
    cmd = (launcher or [PYTHON]) + [MAIN] + [str(a) for a in args]
    return start_process(cmd, log_path, env)


def start_process(cmd, log_path, env: dict | None = None) -> subprocess.Popen:
    with open(log_path, "w") as console:
        return subprocess.Popen([str(c) for c in cmd], cwd=ROOT, env=subprocess_env(env), stdout=console,
                                stderr=subprocess.STDOUT, start_new_session=True)


def descendants(pid: int) -> list[int]:
    """All processes below `pid` (torchrun starts its workers in their own sessions)."""
    found, queue = [], [pid]
    while queue:
        parent = queue.pop()
        try:
            tasks = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue
        for task in tasks:
            children = [int(c) for c in read_text(f"/proc/{parent}/task/{task}/children").split()]
            found += children
            queue += children
    return found


def kill_process_group(proc: subprocess.Popen) -> None:
    """SIGKILL what is left of a background run (its process group and every descendant), then reap it."""
    for pid in descendants(proc.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass


def assert_ok(proc) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout[-3000:]}\nSTDERR:\n{proc.stderr[-6000:]}"


def global_steps_logged(log_text: str) -> int:
    """Completed training steps (over all epochs) according to the progress lines."""
    done = 0
    for epoch, step, total in _PROGRESS.findall(log_text):
        done = max(done, int(epoch) * int(total) + int(step))
    return done


def read_text(path) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except FileNotFoundError:
        return ""


def wait_for_step(proc: subprocess.Popen, log_path, step: int, timeout: float = 180.0) -> int:
    """Poll `log_path` until `step` training steps are logged; return the count seen.

    Fails if the process exits first. Polls often: a tiny step takes tens of milliseconds.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = global_steps_logged(read_text(log_path))
        if done >= step:
            return done
        if proc.poll() is not None:
            raise AssertionError(f"process exited ({proc.returncode}) before step {step}:\n{read_text(log_path)[-4000:]}")
        time.sleep(0.002)
    raise AssertionError(f"step {step} not reached within {timeout} s:\n{read_text(log_path)[-4000:]}")


def kill_and_reap(proc: subprocess.Popen, sig=signal.SIGKILL, timeout: float = 120.0) -> int:
    proc.send_signal(sig)
    return proc.wait(timeout=timeout)


def load_ckpt(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_tensors(a: dict, b: dict) -> None:
    """Bitwise equality of two state dicts (same keys, same dtypes, same bits)."""
    assert a.keys() == b.keys()
    different = [k for k in a if isinstance(a[k], torch.Tensor) and not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def all_finite(state: dict) -> bool:
    return all(torch.isfinite(v).all() for v in state.values() if isinstance(v, torch.Tensor) and v.is_floating_point())


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if " ERROR " in line]


def files_under(path) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, f), path) for d, _, fs in os.walk(path) for f in fs)
