"""End-to-end runs of main.py in subprocesses (tiny model, 32 px synthetic data, CPU)."""
import os
import re

import pytest
import yaml

from e2e_utils import TINY_RUN, assert_ok, load_ckpt, read_log, run_main, state_dicts_equal

LOG_KEYS = ["train_lr", "train_loss", "test_loss", "test_acc1", "test_acc5", "epoch", "n_parameters"]
EXTRA_LOG_KEYS = {"test_loss_per_image", "test_ema_loss", "test_ema_acc1", "test_ema_acc5", "test_ema_loss_per_image",
                  "method", "precision", "fused_attn", "weights", "target_gmacs"}


def _cfg_from_flags(flags):
    """Turn '--a-b v' flag pairs into a YAML mapping (what a recipe file holds)."""
    cfg, i = {}, 0
    while i < len(flags):
        key = flags[i].lstrip("-").replace("-", "_")
        cfg[key] = yaml.safe_load(flags[i + 1]) if not flags[i + 1].startswith("{") else flags[i + 1]
        i += 2
    return cfg


@pytest.mark.slow
def test_cfg_training_run_learns_then_eval_reproduces(tmp_path):
    """A --cfg run: log.txt format (check 11.10), learning, checkpoints; then --eval of the checkpoint."""
    flags = [f for f in TINY_RUN if f != "--unscale-lr"]
    cfg = _cfg_from_flags(flags)
    cfg.update(unscale_lr=True, epochs=6, synthetic_train_size=512, synthetic_val_size=200, model_ema=False,
               checkpoint_hist=2, tensorboard=True)
    cfg_path = tmp_path / "recipe.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "out"
    proc = run_main(["--cfg", cfg_path, "--output_dir", out, "--seed", "1"])
    assert_ok(proc)

    log = read_log(out)
    # DeiT's keys in DeiT's order first; this project's extras (documented in the README) after
    assert [list(rec)[:len(LOG_KEYS)] for rec in log] == [LOG_KEYS] * 6
    assert all(set(rec) - set(LOG_KEYS) <= EXTRA_LOG_KEYS for rec in log)
    assert all(rec["precision"] == "fp32" and rec["fused_attn"] in ("on", "off") for rec in log)
    with open(out / "log.txt") as f:
        first_line = f.readline().strip()
    assert first_line.startswith('{"train_lr": ') and ', "epoch": 0, ' in first_line
    assert log[-1]["train_loss"] < log[0]["train_loss"]
    assert log[-1]["test_loss"] < log[0]["test_loss"]
    assert log[-1]["test_acc1"] > 16.0  # 10 classes: chance is 10 % (a 1-block, 32-dim ViT after 96 steps)

    saved = yaml.safe_load((out / "args.yaml").read_text())
    assert saved["epochs"] == 6 and saved["seed"] == 1 and saved["model_kwargs"]["depth"] == 1
    ckpt = load_ckpt(out / "checkpoint.pth")  # weights_only: tensors and plain values only
    assert ckpt["epoch"] == 5 and ckpt["epoch_complete"] and isinstance(ckpt["args"], dict)
    for name in ("best_checkpoint.pth", "log_rank0.txt", "checkpoint-0004.pth", "checkpoint-0005.pth", "tensorboard"):
        assert os.path.exists(out / name), name
    assert not os.path.exists(out / "checkpoint-0003.pth")  # --checkpoint-hist 2
    assert "final accuracy" in proc.stderr

    proc = run_main(TINY_RUN + ["--eval", "--resume", out / "checkpoint.pth", "--seed", "1",
                                "--synthetic-val-size", "200"])
    assert_ok(proc)
    match = re.search(r"Accuracy of the network on the 200 test images: ([\d.]+)%", proc.stderr)
    assert match and float(match.group(1)) == pytest.approx(round(log[-1]["test_acc1"], 1))


@pytest.mark.slow
def test_preempted_run_resumes_bitwise(tmp_path):
    """Stop mid-epoch (as on SIGUSR1), exit 0, --auto-resume: the same final weights, bit for bit.

    Mixup, drop-path, EMA and two loader workers are on, so RNG streams, EMA, optimizer,
    scheduler and the sampler position must all be restored exactly.
    """
    flags = TINY_RUN + ["--epochs", "2", "--deterministic", "--mixup", "0.8", "--cutmix", "1.0",
                        "--drop-path", "0.1", "--model-ema", "--model-ema-decay", "0.9", "--num_workers", "2",
                        "--warmup-epochs", "1", "--eval-every", "2"]
    full, parts = tmp_path / "full", tmp_path / "parts"
    assert_ok(run_main(flags + ["--output_dir", full]))

    first = run_main(flags + ["--output_dir", parts, "--preempt-at-step", "5"])
    assert_ok(first)
    assert (parts / ".preempted").exists()
    mid = load_ckpt(parts / "checkpoint.pth")
    assert (mid["epoch"], mid["epoch_step"], mid["epoch_complete"]) == (0, 5, False)

    second = run_main(flags + ["--output_dir", parts, "--auto-resume"])
    assert_ok(second)
    assert "resuming at epoch 0, step 5" in second.stderr
    a, b = load_ckpt(full / "checkpoint.pth"), load_ckpt(parts / "checkpoint.pth")
    assert state_dicts_equal(a["model"], b["model"], exact=True)
    assert state_dicts_equal(a["model_ema"], b["model_ema"], exact=True)
    assert a["run_state"] == b["run_state"]
    assert read_log(full)[-1]["test_acc1"] == read_log(parts)[-1]["test_acc1"]

    # Stopped exactly at the end of epoch 0 (8 steps of 32 out of 256), continued with an explicit --resume.
    edge = tmp_path / "edge"
    assert_ok(run_main(flags + ["--output_dir", edge, "--preempt-at-step", "8"]))
    ckpt = load_ckpt(edge / "checkpoint.pth")
    assert (ckpt["epoch"], ckpt["epoch_complete"]) == (0, True)
    resumed = run_main(flags + ["--output_dir", edge, "--resume", edge / "checkpoint.pth"])
    assert_ok(resumed)
    assert "resuming at epoch 1" in resumed.stderr
    assert state_dicts_equal(a["model"], load_ckpt(edge / "checkpoint.pth")["model"], exact=True)


FAMILY_RUN = ["--input-size", "32", "--data-set", "SYNTHETIC", "--synthetic-train-size", "64",
              "--synthetic-val-size", "32", "--device", "cpu", "--batch-size", "32", "--num_workers", "0",
              "--print-freq", "0", "--epochs", "1", "--aa", "none", "--reprob", "0"]
SMALL_VIT = "{'depth': 2, 'embed_dim': 32, 'num_heads': 2, 'patch_size': 8}"


@pytest.mark.slow
def test_shrink_launch_lines(tmp_path):
    """lambda_vit: train a dilution model (main_lambda.py), then test.sh's evaluation of the
    deployed shrink model through --finetune, which drops (and logs) the removed block's 6 keys."""
    out = tmp_path / "lambda"
    assert_ok(run_main(["--model", "deit_tiny_patch16_224_copy_lambda", "--model-kwargs", SMALL_VIT,
                        "--prune_layer", "[0]", "--done_layer", "[]", "--output_dir", out] + FAMILY_RUN,
                       script="main_lambda.py"))
    proc = run_main(["--model", "deit_tiny_patch16_224_shrink", "--model-kwargs", SMALL_VIT, "--prune_layer", "[]",
                     "--done_layer", "[0]", "--finetune", out / "checkpoint.pth", "--eval", "--no-model-ema"]
                    + FAMILY_RUN, script="main_lambda.py")
    assert_ok(proc)
    assert "0 resized, 6 dropped, 0 missing" in proc.stderr
    assert "finetune: dropped blocks.0.norm1.weight, blocks.0.norm1.bias, blocks.0.attn.qkv.weight" in proc.stderr
    assert "Accuracy of the network on the 32 test images" in proc.stderr


@pytest.mark.slow
def test_evit_finetune_and_tome_eval_launch_lines(tmp_path):
    base = tmp_path / "base"
    assert_ok(run_main(["--model", "deit_tiny_patch16_224", "--model-kwargs", SMALL_VIT, "--output_dir", base]
                       + FAMILY_RUN))
    proc = run_main(["--model", "deit_small_patch16_shrink_base", "--model-kwargs", SMALL_VIT, "--fuse_token",
                     "--base_keep_rate", "0.7", "--drop_loc", "(1,)", "--shrink_start_epoch", "0",
                     "--warmup-epochs", "0", "--finetune", base / "checkpoint.pth", "--output_dir", tmp_path / "evit"]
                    + FAMILY_RUN)
    assert_ok(proc)
    assert "model.train(False)" in proc.stderr  # EViT fine-tuning runs in eval mode
    proc = run_main(["--model", "deit_tiny_patch16_224", "--model-kwargs", SMALL_VIT, "--tome-r", "2", "--eval",
                     "--resume", base / "checkpoint.pth"] + FAMILY_RUN)
    assert_ok(proc)
    assert "Accuracy of the network on the 32 test images" in proc.stderr


@pytest.mark.slow
def test_sigusr1_to_process_group_saves_and_exits_0(tmp_path):
    """Slurm signals every process of the step, DataLoader workers included: the workers must
    survive it, the trainer finishes its step, writes checkpoint.pth and exits 0."""
    import signal
    import subprocess
    import time

    from e2e_utils import PYTHON, ROOT
    out = tmp_path / "out"
    flags = [str(f) for f in TINY_RUN] + ["--epochs", "200", "--num_workers", "2", "--output_dir", str(out)]
    proc = subprocess.Popen([PYTHON, os.path.join(ROOT, "main.py")] + flags, cwd=ROOT, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while not (out / "log.txt").exists():  # training is past its first epoch
            assert proc.poll() is None and time.time() < deadline, "training did not start"
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGUSR1)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, stderr[-3000:]
    assert "SIGUSR1" in stderr and "exiting with status 0" in stderr
    assert (out / ".preempted").exists()
    ckpt = load_ckpt(out / "checkpoint.pth")
    assert ckpt["epoch"] < 199
