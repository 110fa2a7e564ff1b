"""Distributed faults on CPU (gloo): a rank killed with SIGKILL makes torchrun restart the
group (--max-restarts), which resumes from the checkpoint; --dist-eval gives exactly the
single-process metrics on a data set whose size is not a multiple of the world size."""
import os
import re
import signal
import time

import pytest

from samplers import ExactDistributedEvalSampler

from .helpers import PYTHON, TINY_FLAGS, assert_ok, assert_same_tensors, load_ckpt, read_text, run_main, wait_for_step

WORLD = 2


def _torchrun(max_restarts: int = 0):
    return [PYTHON, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}",
            f"--max-restarts={max_restarts}", "--monitor-interval=0.2"]


def _worker_pid(agent_pid: int, rank: int, timeout: float = 60.0) -> int:
    """PID of the worker with RANK=rank among the torchrun agent's children."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for task in os.listdir(f"/proc/{agent_pid}/task"):
            for child in read_text(f"/proc/{agent_pid}/task/{task}/children").split():
                try:
                    with open(f"/proc/{child}/environ", "rb") as f:
                        env = f.read().split(b"\0")
                except OSError:
                    continue
                if f"RANK={rank}".encode() in env:
                    return int(child)
        time.sleep(0.05)
    raise AssertionError(f"no worker with RANK={rank} under torchrun {agent_pid}")


@pytest.mark.slow
def test_killed_rank_is_restarted_by_torchrun_and_resumes(spawn, tmp_path):
    flags = TINY_FLAGS + ["--save-every-iters", "2", "--no-repeated-aug", "--auto-resume"]
    full, out = tmp_path / "uninterrupted", tmp_path / "out"
    assert_ok(run_main(flags + ["--output_dir", full], launcher=_torchrun()))

    proc = spawn(flags + ["--output_dir", out], tmp_path / "console.txt", launcher=_torchrun(max_restarts=1))
    # 512 images / (2 ranks x 16) = 16 steps per epoch; kill rank 1 in epoch 0 after step 5.
    wait_for_step(proc, out / "log_rank1.txt", 5)
    os.kill(_worker_pid(proc.pid, rank=1), signal.SIGKILL)
    assert proc.wait(timeout=150) == 0, read_text(tmp_path / "console.txt")[-5000:]

    console = read_text(tmp_path / "console.txt")
    assert re.search(r"local_rank: 1 .*exitcode: -9|exitcode: -9.*local_rank: 1", console), console[-3000:]
    for rank in range(WORLD):
        log = read_text(out / f"log_rank{rank}.txt")
        assert log.count("start training") == 2  # the first attempt and the restart
        match = re.search(r"resuming at epoch 0, step (\d+)", log)
        assert match and int(match.group(1)) >= 4 and int(match.group(1)) % 2 == 0, log[-3000:]
    final, reference = load_ckpt(out / "checkpoint.pth"), load_ckpt(full / "checkpoint.pth")
    assert (final["epoch"], final["epoch_complete"], final["world_size"]) == (1, True, WORLD)
    assert final["run_state"] == reference["run_state"] == {"optimizer_steps": 32, "nonfinite_skipped": 0}
    assert_same_tensors(final["model"], reference["model"])


def _eval_line(text: str):
    # DeiT's printed loss averages per-batch means (it depends on how the shards are batched);
    # the per-image loss is the exact mean that sharding must not change.
    match = re.search(r"\* Acc@1 ([\d.]+) Acc@5 ([\d.]+) loss [\d.]+ \((\d+) images\)  per-image loss ([\d.]+)", text)
    assert match, text[-3000:]
    return float(match.group(1)), float(match.group(2)), float(match.group(4)), int(match.group(3))


@pytest.mark.slow
def test_dist_eval_equals_single_process_on_odd_sized_data(reference_dir):
    flags = TINY_FLAGS + ["--eval", "--resume", reference_dir / "checkpoint.pth", "--synthetic-val-size", "63",
                          "--no-amp"]
    single = run_main(flags)
    assert_ok(single)
    sharded = run_main(flags + ["--dist-eval"], launcher=_torchrun())
    assert_ok(sharded)
    acc1, acc5, loss, n = _eval_line(single.stderr)
    d_acc1, d_acc5, d_loss, d_n = _eval_line(sharded.stderr)
    assert n == d_n == 63
    assert (acc1, acc5) == (d_acc1, d_acc5)
    assert loss == pytest.approx(d_loss, rel=1e-5, abs=1e-3)


@pytest.mark.parametrize("size", [1, 2, 7, 63, 64, 1001])
@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_exact_eval_shards_cover_each_sample_once(size, world):
    for contiguous in (True, False):
        shards = [list(ExactDistributedEvalSampler(size, world, r, contiguous=contiguous)) for r in range(world)]
        assert sorted(i for shard in shards for i in shard) == list(range(size))
        assert max(map(len, shards)) - min(map(len, shards)) <= 1


@pytest.mark.slow
def test_a_killed_peer_is_one_line_naming_the_lost_rank(spawn, tmp_path):
    """Issue 18, item 9: rank 0 printed gloo's raw traceback ("Connection closed by peer
    [127.0.0.1]:40101 ... GLHF!") before torchrun's own summary."""
    out = tmp_path / "out"
    proc = spawn(TINY_FLAGS + ["--no-repeated-aug", "--output_dir", out], tmp_path / "console.txt",
                 launcher=_torchrun(max_restarts=0))
    wait_for_step(proc, out / "log_rank1.txt", 5)
    victim = _worker_pid(proc.pid, rank=1)
    os.kill(victim, signal.SIGKILL)
    assert proc.wait(timeout=150) != 0
    console = read_text(tmp_path / "console.txt")
    assert "[rank0]: Traceback" not in console and "GLHF" not in console, console[-4000:]
    log = read_text(out / "log_rank0.txt")
    errors = [line.split(" ERROR ", 1)[1] for line in log.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and f"rank 1 (PID {victim} on " in errors[0] and "--auto-resume" in errors[0], errors


def test_lost_peer_message_names_the_rank_whose_process_is_gone(monkeypatch):
    import socket
    import subprocess

    from utils import distributed as dist_utils

    gone = subprocess.Popen(["true"])
    gone.wait()
    host = socket.gethostname()
    monkeypatch.setattr(dist_utils, "_RANK_PROCESSES", [(host, os.getpid()), (host, gone.pid), (host, os.getppid())])
    gloo = RuntimeError("[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:561] Connection closed by peer "
                        "[127.0.0.1]:40101. This is typically caused by a remote worker crashing.")
    message = dist_utils.lost_peer_message(gloo)
    assert f"rank 1 (PID {gone.pid} on {host}) has exited" in message and "rank 2" not in message
    assert "3-process run" in message and "\n" not in message
    assert dist_utils.lost_peer_message(RuntimeError("Broken pipe")) is None  # not from the process group
    assert dist_utils.lost_peer_message(RuntimeError("CUDA out of memory")) is None
    monkeypatch.setattr(dist_utils, "_RANK_PROCESSES", [])
    assert dist_utils.lost_peer_message(gloo) is None  # not a distributed run
