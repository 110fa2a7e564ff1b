"""Distributed setup: environment parsing (fast) and a 2-process CPU (gloo) run that must match
a single process with the same global batch (slow).

Why the two runs can agree: the training sampler's global order depends only on
(seed, epoch) and rank r takes positions r::2, so the union of the two ranks' k-th
batches of 16 is the single process's k-th batch of 32; per-sample augmentation seeds
come from the global position; DDP averages the ranks' mean gradients, which equals
the mean over the big batch; the model has no BatchNorm, dropout or drop-path, there
is no mixup and no repeated augmentation; the lr scaling sees the same global batch.
"""
import argparse
import os

import pytest

from e2e_utils import PYTHON, TINY_RUN, assert_ok, load_ckpt, read_log, run_main, state_dicts_equal
from utils import distributed as dist_utils


def test_first_slurm_host():
    assert dist_utils.first_slurm_host("gpu[003-005,9],cpu1") == "gpu003"
    assert dist_utils.first_slurm_host("node7") == "node7"
    assert dist_utils.first_slurm_host("a-b[10,12]") == "a-b10"


def test_env_layout_torchrun_and_slurm(monkeypatch):
    monkeypatch.setattr(os, "environ", dict(os.environ))  # the layout code writes RANK etc.
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID",
                "MASTER_ADDR", "MASTER_PORT", "SLURM_JOB_NODELIST", "SLURM_NODELIST", "SLURM_STEP_ID",
                "SLURM_STEP_NUM_TASKS"):
        monkeypatch.delenv(key, raising=False)
    assert dist_utils._read_env_layout() is None
    args = argparse.Namespace(device="cpu", dist_backend="auto", dist_url="env://")
    dist_utils.init_distributed_mode(args)
    assert (args.distributed, args.rank, args.world_size) == (False, 0, 1)

    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "gpu[12-13]")
    assert dist_utils._read_env_layout() is None  # the batch script, not an srun task
    monkeypatch.setenv("SLURM_STEP_ID", "0")
    assert dist_utils._read_env_layout() == (5, 8, 1)
    assert os.environ["MASTER_ADDR"] == "gpu12" and os.environ["RANK"] == "5"

    monkeypatch.setenv("RANK", "3")  # torchrun's variables take precedence
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert dist_utils._read_env_layout() == (3, 4, 3)


def test_unwrap_model():
    import torch
    model = torch.nn.Linear(2, 2)
    assert dist_utils.unwrap_model(torch.nn.DataParallel(model)) is model
    assert dist_utils.unwrap_model(model) is model


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
    common = TINY_RUN + ["--epochs", "2", "--no-repeated-aug", "--dist-eval", "--warmup-epochs", "1",
                         "--synthetic-val-size", "63"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert_ok(run_main(common + ["--batch-size", "32", "--output_dir", one]))
    torchrun = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    proc = run_main(common + ["--batch-size", "16", "--output_dir", two], launcher=torchrun, timeout=600)
    assert_ok(proc)
    a, b = load_ckpt(one / "checkpoint.pth"), load_ckpt(two / "checkpoint.pth")
    assert b["world_size"] == 2 and len(b["rng"]) == 2
    assert state_dicts_equal(a["model"], b["model"], exact=False, atol=1e-4)
    # exact sharded evaluation: 63 images over 2 ranks, each counted once
    log_one, log_two = read_log(one), read_log(two)
    assert log_one[-1]["test_acc1"] == pytest.approx(log_two[-1]["test_acc1"])
    assert log_one[-1]["train_lr"] == pytest.approx(log_two[-1]["train_lr"])
    assert os.path.exists(two / "log_rank1.txt")


@pytest.mark.slow
def test_distributed_train_sh_runs_main(tmp_path):
    """timm-style launcher of the LTM scripts: NUM_PROC DATA_DIR then main.py flags."""
    import subprocess

    from e2e_utils import ROOT
    out = tmp_path / "out"
    flags = [str(f) for f in TINY_RUN] + ["--data-set", "SYNTHETIC", "--epochs", "1", "--synthetic-train-size", "64",
                                           "--output", str(out), "--workers", "0", "-b", "32", "--amp"]
    proc = subprocess.run([os.path.join(ROOT, "distributed_train.sh"), "1", str(tmp_path)] + flags, cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHON": PYTHON})
    assert_ok(proc)
    assert read_log(out)[0]["epoch"] == 0
