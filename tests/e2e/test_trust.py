"""Numbers a researcher can trust on the first try (issue "trustworthy numbers"): precision
defaults, strict fine-tuning, EMA evaluation, wrong layouts at --eval, stray values, help and
errors, and the logs of a run."""
import argparse
import json
import os

import pytest
import timm
import torch
import yaml

import main
import models  # noqa: F401
from e2e_utils import TINY_MODEL, TINY_RUN, assert_ok, read_log, run_main

TINY_KWARGS = dict(depth=1, embed_dim=32, num_heads=2, patch_size=8, img_size=32)


def _errors(proc) -> list:
    return [line for line in proc.stderr.splitlines() if " ERROR " in line]


def _save(path, model, **extra):
    torch.save({"model": model.state_dict(), **extra}, path)
    return str(path)


# ----------------------------------------------------------------------------- 1. precision

def test_cpu_defaults_to_fp32_and_amp_is_explicit():
    if torch.cuda.is_available():
        pytest.skip("the CPU default is checked on a machine without CUDA")
    assert main.parse_args([]).amp is False
    assert main.parse_args(["--amp"]).amp is True
    assert main.parse_args(["--no-amp"]).amp is False
    assert main.precision_name(main.parse_args([]), torch.device("cpu")) == "fp32"
    assert main.precision_name(main.parse_args(["--amp"]), torch.device("cpu")) == "bf16 autocast"
    assert main.precision_name(main.parse_args(["--amp", "--amp-dtype", "float16"]), torch.device("cpu")) \
        == "fp16 autocast"
    assert main.precision_name(main.parse_args(["--amp", "--amp-dtype", "bfloat16"]), torch.device("cuda")) \
        == "bf16 autocast"


@pytest.mark.slow
def test_eval_names_precision_fused_attention_and_weights(tmp_path):
    out = tmp_path / "train"
    assert_ok(run_main(TINY_RUN + ["--epochs", "1", "--output_dir", out]))
    proc = run_main(TINY_RUN + ["--eval", "--resume", out / "checkpoint.pth", "--output_dir", tmp_path / "ev"])
    assert_ok(proc)
    assert "precision: fp32; fused attention: " in proc.stderr
    record = read_log(tmp_path / "ev")[-1]
    assert record["eval"] is True and record["precision"] == "fp32" and record["weights"] == "model"
    assert record["fused_attn"] in ("on", "off") and "test_acc1" in record
    # an eval run logs no training-only values
    assert "scaled to" not in proc.stderr and "start training" not in proc.stderr
    bf16 = run_main(TINY_RUN + ["--eval", "--resume", out / "checkpoint.pth", "--bf16-weights",
                                "--output_dir", tmp_path / "ev16"])
    assert_ok(bf16)
    assert "precision: bf16 weights" in bf16.stderr and read_log(tmp_path / "ev16")[-1]["precision"] == "bf16 weights"
    logged = json.loads(proc.stderr.split("INFO arguments: ", 1)[1].splitlines()[0])
    assert "mixup" not in logged and "lr" not in logged and "epochs" not in logged and "model" in logged


# ----------------------------------------------------------------------------- 2. --finetune

@pytest.mark.slow
def test_finetune_with_another_architecture_is_an_error_unless_partial(tmp_path):
    other = timm.create_model("deit_tiny_patch16_224", num_classes=10, **dict(TINY_KWARGS, embed_dim=64))
    ckpt = _save(tmp_path / "other.pth", other)
    proc = run_main(TINY_RUN + ["--epochs", "1", "--finetune", ckpt, "--output_dir", tmp_path / "o"])
    assert proc.returncode == 2
    (error,) = _errors(proc)
    assert "keys with other shapes" in error and "blocks.0." in error and "--finetune-partial" in error
    assert not (tmp_path / "o" / "checkpoint.pth").exists()

    proc = run_main(TINY_RUN + ["--epochs", "1", "--finetune", ckpt, "--finetune-partial", "--output_dir",
                                tmp_path / "p"])
    assert_ok(proc)
    summary = [line for line in proc.stderr.splitlines() if "finetune from" in line]
    assert len(summary) == 1 and "loaded" in summary[0] and "resized" in summary[0] and "dropped" in summary[0] \
        and "missing" in summary[0]


@pytest.mark.slow
def test_finetune_drops_only_the_head_and_says_so(tmp_path):
    source = timm.create_model("deit_tiny_patch16_224", num_classes=1000, **TINY_KWARGS)
    ckpt = _save(tmp_path / "src.pth", source)
    proc = run_main(TINY_RUN + ["--epochs", "1", "--finetune", ckpt, "--output_dir", tmp_path / "o"])
    assert_ok(proc)
    n = len(source.state_dict())
    assert (f"finetune from {ckpt}: {n - 2} loaded, 0 resized, 0 dropped, 0 missing, "
            f"2 with another shape (re-initialised)") in proc.stderr


# ----------------------------------------------------------------------------- 3. EMA at --eval

@pytest.mark.slow
def test_eval_of_ema_weights_is_a_flag_and_logged(tmp_path):
    out = tmp_path / "train"
    assert_ok(run_main(TINY_RUN + ["--epochs", "2", "--model-ema", "--model-ema-decay", "0.5", "--output_dir", out]))
    ckpt = out / "checkpoint.pth"
    plain = run_main(TINY_RUN + ["--eval", "--resume", ckpt])
    ema = run_main(TINY_RUN + ["--eval", "--resume", ckpt, "--use-ema"])
    assert_ok(plain)
    assert_ok(ema)
    assert "evaluating the model weights" in plain.stderr
    assert "evaluating the EMA (model_ema) weights" in ema.stderr
    saved = torch.load(ckpt, weights_only=True)
    assert any(not torch.equal(saved["model"][k], saved["model_ema"][k]) for k in saved["model"])

    no_ema = tmp_path / "no_ema"
    assert_ok(run_main(TINY_RUN + ["--epochs", "1", "--no-model-ema", "--output_dir", no_ema]))
    proc = run_main(TINY_RUN + ["--eval", "--resume", no_ema / "checkpoint.pth", "--use-ema"])
    assert proc.returncode == 2 and "holds no EMA weights" in _errors(proc)[0]


def test_bf16_weights_belongs_to_eval():
    with pytest.raises(main.UserError, match="--bf16-weights is for evaluation"):
        main.parse_args(["--bf16-weights"])


def test_use_ema_belongs_to_eval():
    with pytest.raises(main.UserError, match="--use-ema"):
        main.parse_args(["--use-ema"])


# ----------------------------------------------------------------------------- 5. wrong --done_layer

@pytest.mark.slow
def test_wrong_done_layer_at_eval_names_the_blocks_and_the_fitting_option(tmp_path):
    trained = timm.create_model("deit_tiny_patch16_224_shrink", done_layer=[0, 2], num_classes=10)
    ckpt = _save(tmp_path / "shrunk.pth", trained)
    proc = run_main(["--model", "deit_tiny_patch16_224_shrink", "--done_layer", "[0]", "--finetune", ckpt, "--eval",
                     "--data-set", "SYNTHETIC", "--synthetic-val-size", "4", "--synthetic-classes", "10",
                     "--num_workers", "0", "--device", "cpu", "--batch-size", "4"], timeout=600)
    assert proc.returncode == 2
    (error,) = _errors(proc)
    assert "blocks.2.attn" in error and "--model deit_tiny_patch16_224_shrink --done_layer [0,2]" in error


# ----------------------------------------------------------------------------- 8, 9, 11: start-up

def test_architecture_that_cannot_take_the_input_size_fails_at_start_up(tmp_path):
    proc = run_main(["--model", "dwnet_tiny_patch4_window7_224", "--input-size", "48", "--epochs", "1",
                     "--data-set", "SYNTHETIC", "--synthetic-train-size", "8", "--synthetic-val-size", "4",
                     "--num_workers", "0", "--device", "cpu", "--batch-size", "4", "--output_dir", tmp_path / "o"])
    assert proc.returncode == 2
    (error,) = _errors(proc)
    assert "cannot run on 48x48 images" in error and "--input-size" in error
    assert "start training" not in proc.stderr


def test_a_stray_value_after_a_switch_is_named():
    with pytest.raises(main.UserError, match="follows --fuse_token, which takes no value"):
        main.parse_args(["--model", "deit_tiny_patch16_shrink_base", "--fuse_token", "True", "--eval"])


@pytest.mark.slow
def test_training_without_output_dir_warns_at_start():
    proc = run_main(TINY_RUN + ["--epochs", "1"])
    assert_ok(proc)
    warning = [line for line in proc.stderr.splitlines() if "no --output_dir" in line]
    assert len(warning) == 1 and "WARNING" in warning[0]
    assert proc.stderr.index("no --output_dir") < proc.stderr.index("start training")


# ----------------------------------------------------------------------------- 12. command line

def test_every_option_has_help_and_both_spellings():
    parser = main.build_parser([])
    for action in parser._actions:
        if action.dest == "help":
            continue
        assert action.help, f"{action.dest} has no help text"
        for option in action.option_strings:
            if option.startswith("--"):
                other = option[:2] + (option[2:].replace("_", "-") if "_" in option else option[2:].replace("-", "_"))
                assert other in parser._option_string_actions, f"{option} has no {other} spelling"
    args = main.parse_args(["--output-dir", "o", "--num-workers", "3", "--base-keep-rate", "0.5"])
    assert (args.output_dir, args.num_workers, args.base_keep_rate) == ("o", 3, 0.5)


def test_help_shows_defaults_and_a_short_usage(capsys):
    with pytest.raises(SystemExit):
        main.parse_args(["--help"])
    text = capsys.readouterr().out
    assert text.splitlines()[0].startswith("usage: python main.py [--cfg FILE.yaml]")
    assert len(text.splitlines()[0]) < 120
    assert "(default: 300)" in text and "(default: 0.99996)" in text


@pytest.mark.parametrize("argv, words", [
    (["--base_keep_rate", "abc"], ["--base_keep_rate", "'abc'"]),
    (["--no-such-flag"], ["--no-such-flag"]),
])
def test_bad_flag_is_one_line_without_usage(argv, words, caplog):
    assert main.cli(argv + ["--device", "cpu"]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "\n" not in errors[0] and "usage:" not in errors[0]
    assert all(word in errors[0] for word in words) and "--help" in errors[0]


def test_yaml_value_of_the_wrong_type_names_key_and_file(tmp_path):
    cfg = tmp_path / "recipe.yaml"
    cfg.write_text(yaml.safe_dump({"epochs": "ten"}))
    with pytest.raises(main.UserError, match=r"recipe.yaml: key 'epochs' has value 'ten'"):
        main.parse_args(["--cfg", str(cfg)])


# ----------------------------------------------------------------------------- 13. logs

@pytest.mark.slow
def test_logs_name_the_method_state_eta_and_why_no_best_checkpoint(tmp_path):
    out = tmp_path / "o"
    flags = ["--model", "deit_tiny_patch16_224_copy_lambda", "--prune_layer", "[0]",
             "--model-kwargs", "{'depth': 2, 'embed_dim': 32, 'num_heads': 2, 'patch_size': 8}"]
    run = TINY_RUN[len(TINY_MODEL):] + flags + ["--input-size", "32", "--epochs", "2",
                                                                  "--lambda-decay-epochs", "4", "--print-freq", "2",
                                                                  "--num_workers", "64", "--output_dir", out]
    proc = run_main(run)
    assert_ok(proc)
    log = read_log(out)
    assert [rec["method"]["lambda_b0"] for rec in log] == [1.0, pytest.approx(0.75)]
    assert "lambda_b0" in [line for line in proc.stderr.splitlines() if "Epoch: [1]" in line][0]
    assert "epoch 1/2 done; run time left about" in proc.stderr
    assert "no best checkpoint yet" in proc.stderr and "lambda_b0" in proc.stderr
    assert proc.stderr.count("more than the") == 1  # the worker cap warns once


def test_dist_eval_progress_line_says_it_is_one_shard(caplog):
    from engine import evaluate
    model = torch.nn.Linear(4, 3)
    loader = [(torch.randn(2, 4), torch.tensor([0, 1]))]
    caplog.set_level("INFO")
    evaluate(loader, model, torch.device("cpu"), argparse.Namespace(dist_eval=True, print_freq=1, amp=False))
    progress = [r.getMessage() for r in caplog.records if "[1/1]" in r.getMessage()]
    assert progress and "rank 0's shard" in progress[0]
    summary = [r.getMessage() for r in caplog.records if "Acc@1" in r.getMessage()]
    assert summary and "shard" not in summary[0]


@pytest.mark.slow
def test_eval_with_visualize_mask_runs_the_visualisation(tmp_path):
    model = timm.create_model("deit_tiny_patch16_shrink_base", num_classes=10,
                              **dict(TINY_KWARGS, depth=4), drop_loc=(1,))
    ckpt = _save(tmp_path / "evit.pth", model)
    proc = run_main(["--model", "deit_tiny_patch16_shrink_base", "--drop_loc", "(1,)",
                     "--model-kwargs", "{'depth': 4, 'embed_dim': 32, 'num_heads': 2, 'patch_size': 8}",
                     "--input-size", "32", "--eval", "--resume", ckpt, "--visualize_mask", "--n_visualization", "2",
                     "--data-set", "SYNTHETIC", "--synthetic-val-size", "4", "--num_workers", "0", "--device", "cpu",
                     "--batch-size", "2", "--output_dir", tmp_path / "o"])
    assert_ok(proc)
    assert "Accuracy of the network" in proc.stderr
    assert sorted(os.listdir(tmp_path / "o" / "visualize_mask"))
