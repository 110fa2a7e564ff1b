"""PiToMe's official launch lines (main_ic.py, docs/methods/pitome.md "Launch lines") run as
`python main.py <same flags>` unchanged apart from paths, and bad PiToMe flags are one line
and exit status 2.

main_ic.py always builds the model with `pretrained=True`; the evaluation line therefore
runs on a fake local Hugging Face cache holding (random) weights for timm's
`deit_small_patch16_224.fb_in1k`, which is where `--pretrained` reads them offline.
"""
import shlex

import pytest
import timm
import torch

import main
import models  # noqa: F401
from e2e_utils import (
    assert_ok, assert_printed_eval, pretrained_deit_small, read_log, reference_eval, run_main, save_official_checkpoint)
from models import family, pitome
from models.errors import ModelConfigError

EVAL_LINE = "--batch-size 256 --model DEIT-S-224 --algo pitome --ratio 0.925 --eval"
TRAIN_LINE = "--batch-size 64 --model DEIT-S-224 --algo pitome --ratio 0.925 --epoch 30"
README_LINE = "--batch-size 64 --model DEIT_S_patch16_224 --algo pitome --ratio 0.925 --input-size 224 --epoch 30 " \
              "--lr 0.00001"


def translated(line: str):
    return family.translate_argv(shlex.split(line))


# ---------------------------------------------------------------------------
# The translation itself
# ---------------------------------------------------------------------------

def test_eval_line_translation():
    assert translated(EVAL_LINE) == ["--batch-size", "256", "--model", "deit_small_patch16_224", "--eval",
                                     "--pitome-ratio", "0.925", "--pretrained"]


def test_training_line_gets_the_official_recipe_before_its_own_flags():
    argv = translated(TRAIN_LINE)
    recipe = list(pitome.OFFICIAL_RECIPE)
    assert argv[:len(recipe)] == recipe
    assert argv[len(recipe):] == ["--batch-size", "64", "--model", "deit_small_patch16_224", "--epochs", "30",
                                  "--pitome-ratio", "0.925", "--pretrained"]


def test_training_line_resolves_to_main_ic_defaults():
    args = main.parse_args(translated(TRAIN_LINE) + ["--data-path", "/imagenet"])
    assert (args.model, args.batch_size, args.epochs, args.pitome_ratio, args.pretrained) == \
        ("deit_small_patch16_224", 64, 30, 0.925, True)
    assert args.lr == 5e-5 and args.unscale_lr and args.weight_decay == 0.0 and args.decay_norm_and_bias
    assert (args.opt, args.sched, args.sched_step, args.min_lr, args.warmup_epochs) == \
        ("adamw", "cosine", "epoch", 1e-8, 0)
    assert (args.clip_grad, args.drop, args.drop_path, args.color_jitter) == (1.0, 0.0, 0.1, 0.4)
    assert (args.mixup, args.cutmix, args.smoothing, args.reprob, args.aa) == (0.8, 1.0, 0.1, 0.25,
                                                                            "rand-m9-mstd0.5-inc1")
    assert args.repeated_aug and not args.model_ema and args.amp is False and args.eval_every == 1
    readme = main.parse_args(translated(README_LINE) + ["--data-path", "/imagenet"])
    assert readme.model == "deit_small_patch16_224" and readme.lr == 1e-5 and readme.input_size == 224


def test_defaults_pitome_is_the_preset_alone():
    argv = translated("--model deit_tiny_patch16_224 --defaults pitome --epochs 3")
    assert argv == list(pitome.OFFICIAL_RECIPE) + ["--model", "deit_tiny_patch16_224", "--epochs", "3"]
    args = main.parse_args(argv)
    assert args.lr == 5e-5 and args.epochs == 3 and args.pitome_ratio is None and not args.pretrained


@pytest.mark.parametrize("line,expected", [
    ("--model DEIT-T-224 --algo pitome --eval", ["--model", "deit_tiny_patch16_224", "--eval", "--pitome-ratio",
                                                 "0.9125", "--pretrained"]),
    ("--model DEIT-B-384 --algo=pitome --ratio=0.9 --eval --resume x.pth",
     ["--model", "deit_base_patch16_384", "--eval", "--resume", "x.pth", "--pitome-ratio", "0.9"]),
    ("--model deit-s-224 --algo none --eval --use_k False --reduced_token 8 --multi-reso --port 1234 --autoresume",
     ["--model", "deit_small_patch16_224", "--eval", "--auto-resume", "--pretrained"]),
    ("--model deit_small_patch16_224 --pitome-ratio 0.9 --epochs 3", ["--model", "deit_small_patch16_224",
                                                                      "--pitome-ratio", "0.9", "--epochs", "3"]),
])
def test_other_official_spellings(line, expected):
    assert translated(line) == expected


@pytest.mark.parametrize("line,message", [
    ("--model DEIT-S-224 --ratio 0.9 --eval", "--ratio"),
    ("--model DEIT-S-224 --algo tome --ratio 0.9 --eval", "--tome-r"),
    ("--model DEIT-S-224 --algo dct --eval", "not provided"),
    ("--model DEIT-S-224 --algo none --ratio 0.9 --eval", "--algo pitome only"),
    ("--model DEIT-T-384 --algo pitome --eval", "deit_tiny_patch16_384"),
    ("--model MAE-H-224 --algo pitome --eval", "MAE"),
])
def test_bad_official_lines_are_config_errors(line, message):
    with pytest.raises(ModelConfigError, match=message):
        translated(line)


# ---------------------------------------------------------------------------
# Bad values: one line, exit 2
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("flags,message", [
    (["--pitome-ratio", "0.3"], "keep ratio must lie in [0.5, 1]"),
    (["--pitome-ratio", "half"], "neither a float nor 'auto'"),
    (["--pitome-margin", "0.5"], "--pitome-margin needs --pitome-ratio"),
    (["--pitome-ratio", "0.9", "--pitome-bsm-layers", "-1"], "block indices >= 0"),
    (["--pitome-ratio", "0.9", "--pitome-bsm-layers", "12"], "bsm_layers entries must be block indices in [0, 2)"),
    (["--pitome-ratio", "0.9", "--tome-r", "2"], "cannot be combined"),
])
def test_bad_flags_are_one_line_and_exit_2(flags, message, capfd):
    rc = main.cli(["--model", "deit_tiny_patch16_224", "--model-kwargs", "{'depth': 2, 'embed_dim': 32, "
                   "'num_heads': 2, 'patch_size': 8}", "--input-size", "32", "--eval", "--device", "cpu",
                   "--synthetic-val-size", "2", "--num_workers", "0"] + flags)
    err = capfd.readouterr().err
    assert rc == 2, err[-2000:]
    errors = [line for line in err.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and message in errors[0], err[-2000:]
    assert "Traceback" not in err


@pytest.mark.parametrize("line,message", [
    ("--model DEIT-S-224 --algo pitome --ratio 0.3 --eval", "keep ratio must lie in [0.5, 1]"),
    ("--model DEIT-S-224 --ratio 0.9 --eval", "--ratio is main_ic.py's keep ratio"),
    ("--model DEIT-S-224 --algo tofu --eval", "--tofu-r"),
])
def test_bad_official_lines_exit_2(line, message, capfd):
    rc = main.cli(shlex.split(line) + ["--device", "cpu", "--num_workers", "0"])
    err = capfd.readouterr().err
    assert rc == 2, err[-2000:]
    errors = [line for line in err.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and message in errors[0], err[-2000:]


# ---------------------------------------------------------------------------
# The lines run
# ---------------------------------------------------------------------------

@pytest.mark.slow
def test_eval_line_prints_the_patched_models_numbers(imagenet_folder, tmp_path):
    weights, env = pretrained_deit_small(tmp_path / "hub")
    proc = run_main(shlex.split(EVAL_LINE) + ["--data-path", str(imagenet_folder), "--device", "cpu"], env_extra=env)
    assert_ok(proc)
    merged = reference_eval(pitome.patch(weights, ratio=0.925), imagenet_folder)
    plain = reference_eval(pitome.unpatch(weights), imagenet_folder)
    assert abs(merged[2] - plain[2]) > 1e-3  # the printed loss tells the two apart
    assert_printed_eval(proc.stderr, *merged)


@pytest.mark.slow
def test_training_line_trains_from_an_official_checkpoint(imagenet_folder, tmp_path):
    """The training line (30 epochs of DeiT-S at batch 64 in the original) made tiny by appended flags,
    fine-tuning from a checkpoint in main_ic.py's layout; the recipe is the official one."""
    tiny = {"depth": 2, "embed_dim": 32, "num_heads": 2, "patch_size": 8}
    source = timm.create_model("deit_small_patch16_224", img_size=32, **tiny)
    optimizer = torch.optim.AdamW(source.parameters(), lr=5e-5)
    official_args = dict(model="DEIT-S-224", algo="pitome", ratio=0.925)
    ckpt = save_official_checkpoint(tmp_path / "checkpoint.pth", source, official_args,
                                    optimizer=optimizer.state_dict(), lr_scheduler={}, epoch=29)
    out = tmp_path / "out"
    proc = run_main(shlex.split(TRAIN_LINE) + [
        "--data-path", str(imagenet_folder), "--output_dir", str(out), "--finetune", str(ckpt),
        "--model-kwargs", str(tiny), "--input-size", "32", "--epochs", "2", "--batch-size", "4",
        "--device", "cpu", "--num_workers", "0", "--print-freq", "1"])
    assert_ok(proc)
    log = [row for row in read_log(out) if "epoch" in row]
    assert [row["train_pitome_ratio"] for row in log] == [0.925, 0.925]
    assert [row["train_lr"] for row in log] == [5e-5, 5e-5]  # the one-epoch lag: epochs 0 and 1 at the base lr
    assert log[0]["method"]["pitome_tokens"] == 15  # 16 patches, r = floor(T - 0.925 T) = 1 per block: 17 -> 16 -> 15
    assert "finetune from" in proc.stderr
