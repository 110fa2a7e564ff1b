"""DynamicViT's official launch lines run as `python main.py <same flags>` (docs/methods/dynamicvit.md).

The two infer.py lines (HEAD and 2021 spellings) and HEAD main.py's `--eval true --resume` line run
for real on a tiny ImageNet-layout folder with a full-size DeiT-S checkpoint in the official layout
(`{'model', 'epoch', 'args': argparse.Namespace, ...}`), and print the Acc@1/Acc@5/loss an
independent evaluation of the same weights gives. The README training lines are parsed exactly as
written (the resolved recipe is checked), and the DeiT-S line also trains: as written, with flags
appended that shrink the model and the run, in a working directory holding the official relative
path `./pretrained/deit_small_patch16_224-cd65a155.pth` (student initialisation and teacher).
"""
import os
import shlex
import subprocess

import pytest
import timm
import torch

import main
import models  # noqa: F401
from e2e_utils import (
    PYTHON, ROOT, assert_ok, deit_eval_data, read_log, reference_eval, save_official_checkpoint, write_imagenet_folder)
from models import dynamicvit, family

HEAD_INFER = "--data_path {data} --model deit-s --model_path {ckpt} --base_rate 0.7"
OLD_INFER = "--data-path {data} --arch deit_small --model-path {ckpt} --base_rate 0.7"
HEAD_EVAL = "--model deit-s --base_rate 0.7 --eval true --resume {ckpt} --data_path {data}"
README_S = ("--output_dir {out} --model deit-s --input_size 224 --batch_size 128 --data_path {data} --epochs 30 "
            "--base_rate 0.7 --lr 1e-3 --warmup_epochs 5")
README_B = ("--output_dir {out} --model deit-b --input_size 224 --batch_size 128 --data_path {data} --epochs 30 "
            "--base_rate 0.7 --lr 1e-3 --warmup_epochs 5 --drop_path 0.2 --ratio_weight 5.0")
SMALL = "{'depth': 4, 'embed_dim': 48, 'num_heads': 3, 'patch_size': 8, 'pruning_loc': (1, 2, 3)}"


@pytest.fixture(scope="module")
def val_folder(tmp_path_factory):
    """Only `val/`: infer.py's semantics need no training data."""
    return write_imagenet_folder(tmp_path_factory.mktemp("imagenet_val"), ("val",))


@pytest.fixture(scope="module")
def released_checkpoint(tmp_path_factory, val_folder):
    """A DynamicViT-DeiT-S/0.7 file in the released layout, its head set so that the folder's two
    classes (ImageFolder labels 0, 1) are always the top two and exactly one image is called class 0:
    top-1 is neither 0 nor 100 %, whatever the random weights."""
    torch.manual_seed(0)
    model = timm.create_model("dynamicvit_deit_small_patch16_224", base_rate=0.7).eval()
    with torch.no_grad():
        model.head.bias[:2] += 1000
        images, _ = _val_batch(val_folder)
        logits = model(images)
        margin = (logits[:, 0] - logits[:, 1]).sort().values
        model.head.bias[0] -= (margin[-1] + margin[-2]) / 2
    path = tmp_path_factory.mktemp("ckpt") / "dynamicvit_deit-s_0.7.pth"
    ema = {k: v + 0.01 if v.is_floating_point() else v for k, v in model.state_dict().items()}
    save_official_checkpoint(path, model, dict(model="deit-s", base_rate=0.7, lr=1e-3), model_ema=ema, epoch=29,
                             scaler=None, best=79.3)
    return path, model


def _val_batch(folder):
    """infer.py's evaluation data (DeiT's: Resize(256, bicubic), CenterCrop(224), ImageNet mean/std), one batch."""
    data = deit_eval_data(folder)
    return next(iter(torch.utils.data.DataLoader(data, batch_size=len(data), shuffle=False)))


def run_line(line, cwd=ROOT, extra=()):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([PYTHON, os.path.join(ROOT, "main.py"), *shlex.split(line), *extra], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


# ---------------------------------------------------------------------------
# What the translation makes of each line (no main.py needed)
# ---------------------------------------------------------------------------

def test_translation_of_the_official_lines():
    head = family.translate_argv(shlex.split(HEAD_INFER.format(data="/d", ckpt="/c.pth")))
    assert head == ["--data_path", "/d", "--model", "dynamicvit_deit_small_patch16_224", "--eval", "--resume",
                    "/c.pth", "--base_rate", "0.7"]
    old = family.translate_argv(shlex.split(OLD_INFER.format(data="/d", ckpt="/c.pth")))
    assert old == ["--data-path", "/d", "--model", "dynamicvit_deit_small_patch16_224", "--eval", "--resume",
                   "/c.pth", "--base_rate", "0.7"]
    assert family.translate_argv(shlex.split(HEAD_EVAL.format(data="/d", ckpt="/c")))[4:7] == ["--eval", "--resume", "/c"]
    train = family.translate_argv(shlex.split(README_S.format(out="o", data="/d")))
    assert train[-4:] == ["--finetune", "./pretrained/deit_small_patch16_224-cd65a155.pth",
                          "--dynamicvit-teacher", "./pretrained/deit_small_patch16_224-cd65a155.pth"]
    base = family.translate_argv(shlex.split(README_B.format(out="o", data="/d")))
    assert "./pretrained/deit_base_patch16_224-b5f2ef4d.pth" in base and "dynamicvit_deit_base_patch16_224" in base


def test_translation_details_and_other_lines_untouched():
    t = dynamicvit.translate_official_argv
    assert t(["--model", "deit-256", "--eval", "false", "--dist_eval", "true", "--crop_pct", "0.9"]) == \
        ["--model", "dynamicvit_deit_256_patch16_224", "--dist-eval", "--eval-crop-ratio", "0.9"]
    assert t(["--model=deit-b", "--model_path=/m", "--imagenet_default_mean_and_std", "true"]) == \
        ["--model", "dynamicvit_deit_base_patch16_224", "--eval", "--resume", "/m"]
    # another normalisation has no equivalent here: left for argparse to refuse in one line
    assert t(["--model", "deit-s", "--imagenet_default_mean_and_std", "false", "--eval"])[2:4] == \
        ["--imagenet_default_mean_and_std", "false"]
    assert t(["--model", "dynamicvit_deit_small_patch16_224", "--ratiow", "3", "--teacher-path", "t.pth",
              "--finetune", "s.pth"]) == ["--model", "dynamicvit_deit_small_patch16_224", "--ratio_weight", "3",
                                          "--dynamicvit-teacher", "t.pth", "--finetune", "s.pth"]
    # deit-256 has no official training branch and no DeiT weights: nothing is added
    assert t(["--model", "deit-256", "--epochs", "1"]) == ["--model", "dynamicvit_deit_256_patch16_224", "--epochs", "1"]
    # lines of other methods (MCTF's `--model deit_small`, DeiT's) are left alone
    for line in (["--model", "deit_small", "--eval", "true"], ["--model", "deit_small_patch16_224", "--model_path", "x"]):
        assert t(line) == line


# ---------------------------------------------------------------------------
# The evaluation lines, run
# ---------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("line", [HEAD_INFER, OLD_INFER, HEAD_EVAL], ids=["infer_head", "infer_2021", "main_eval"])
def test_evaluation_lines_print_the_official_numbers(line, val_folder, released_checkpoint):
    path, model = released_checkpoint
    proc = run_line(line.format(data=val_folder, ckpt=path))
    assert_ok(proc)
    acc1, acc5, loss, count = reference_eval(model, val_folder)
    assert 0 < acc1 < 100 and acc5 == 100  # the check below is not about a trivial accuracy
    assert f"* Acc@1 {acc1:.3f} Acc@5 {acc5:.3f} loss {loss:.3f} ({count} images)" in proc.stderr
    assert "creating model dynamicvit_deit_small_patch16_224" in proc.stderr


@pytest.mark.slow
def test_model_path_refuses_a_checkpoint_with_other_keys(val_folder, tmp_path):
    deit = timm.create_model("deit_small_patch16_224")
    ckpt = save_official_checkpoint(tmp_path / "deit.pth", deit, dict(model="deit_small_patch16_224"))
    proc = run_line(HEAD_INFER.format(data=val_folder, ckpt=ckpt))
    assert proc.returncode == 2
    error = [line for line in proc.stderr.splitlines() if " ERROR " in line]
    assert len(error) == 1 and "30 model keys missing" in error[0] and "score_predictor.0" in error[0]


# ---------------------------------------------------------------------------
# The README training lines
# ---------------------------------------------------------------------------

def test_readme_lines_parse_to_the_official_recipe():
    args = main.parse_args(shlex.split(README_S.format(out="logs/dynamicvit_deit-s", data="/imagenet")))
    got = main.resolved_options(args)
    want = dict(model="dynamicvit_deit_small_patch16_224", base_rate=0.7, lr=1e-3, unscale_lr=True, epochs=30,
                batch_size=128, warmup_epochs=5, warmup_lr=0.0, min_lr=1e-6, warmup_prefix=True, sched_step="iter",
                weight_decay=0.05, drop_path=0.0, model_ema=True, model_ema_decay=0.9999, repeated_aug=False,
                mixup=0.8, cutmix=1.0, smoothing=0.1, reprob=0.25, color_jitter=0.4, ratio_weight=2.0,
                distillw=0.5, lr_scale=0.01, backbone_freeze_epochs=5,
                finetune="./pretrained/deit_small_patch16_224-cd65a155.pth",
                dynamicvit_teacher="./pretrained/deit_small_patch16_224-cd65a155.pth")
    assert {k: got[k] for k in want} == want
    base = main.resolved_options(main.parse_args(shlex.split(README_B.format(out="o", data="/imagenet"))))
    assert (base["model"], base["drop_path"], base["ratio_weight"], base["finetune"]) == \
        ("dynamicvit_deit_base_patch16_224", 0.2, 5.0, "./pretrained/deit_base_patch16_224-b5f2ef4d.pth")


@pytest.mark.slow
def test_readme_deit_s_line_trains_from_the_official_deit_path(imagenet_folder, tmp_path):
    """The line as written, then flags that shrink the model and the run (2 epochs, the first with
    the backbone frozen): DeiT weights from ./pretrained initialise the student and feed the teacher."""
    (tmp_path / "pretrained").mkdir()
    deit = timm.create_model("deit_small_patch16_224", depth=4, embed_dim=48, num_heads=3, patch_size=8, img_size=32)
    deit_path = tmp_path / "pretrained" / "deit_small_patch16_224-cd65a155.pth"
    torch.save({"model": deit.state_dict()}, deit_path)
    out = tmp_path / "out"
    shrink = ["--model-kwargs", SMALL, "--input_size", "32", "--batch_size", "2", "--epochs", "2", "--warmup_epochs",
              "1", "--backbone_freeze_epochs", "1", "--num_workers", "0", "--print-freq", "1"]
    proc = run_line(README_S.format(out=out, data=imagenet_folder), cwd=tmp_path, extra=shrink)
    assert_ok(proc)
    assert "30 score-predictor keys are not in the checkpoint" in proc.stderr
    assert "DynamicViT teacher: DeiT weights from ./pretrained/deit_small_patch16_224-cd65a155.pth" in proc.stderr
    log = read_log(out)
    epochs = [r for r in log if "epoch" in r]
    assert [r["epoch"] for r in epochs] == [0, 1]
    for record in epochs:
        assert {"keep_b1", "keep_b2", "keep_b3", "ratio_loss", "cls_kl", "token_kl"} <= set(record["method"])
        assert 0 <= record["method"]["keep_b3"] <= record["method"]["keep_b1"] <= 1
    state = torch.load(out / "checkpoint.pth", map_location="cpu", weights_only=False)["model"]
    initial = deit.state_dict()
    assert torch.equal(state["cls_token"], initial["cls_token"]) and torch.equal(state["pos_embed"], initial["pos_embed"])
    assert not torch.equal(state["blocks.0.attn.qkv.weight"], initial["blocks.0.attn.qkv.weight"])  # epoch 1 trains it


# ---------------------------------------------------------------------------
# Bad values: one line, exit 2
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("flags,message", [
    (["--base_rate", "1.5"], "--base_rate must be in (0, 1], got 1.5"),
    (["--base_rate", "0"], "--base_rate must be in (0, 1], got 0.0"),
    (["--base_rate", "high"], "'high' is neither a float nor 'auto'"),
    (["--ratio_weight", "-1"], "--ratio_weight must be >= 0, got -1.0"),
    (["--pruning_loc", "(3, 13)"], "pruning_loc entry 13 is outside blocks 0..11"),
    (["--base_rate", "0.1"], "keeps 0 of 196 patches"),
])
def test_bad_flag_values_are_one_line_and_exit_2(flags, message, capsys):
    code = main.cli(["--model", "dynamicvit_deit_small_patch16_224", "--eval", "--data-set", "SYNTHETIC",
                     "--synthetic-val-size", "2", "--device", "cpu", *flags])
    errors = [line for line in capsys.readouterr().err.splitlines() if " ERROR " in line]
    assert code == 2 and len(errors) == 1 and message in errors[0], errors


def test_missing_teacher_file_is_one_line_naming_it(tmp_path, capsys):
    code = main.cli(["--model", "dynamicvit_deit_small_patch16_224", "--model-kwargs", SMALL, "--input-size", "32",
                     "--data-set", "SYNTHETIC", "--synthetic-train-size", "4", "--synthetic-val-size", "2",
                     "--batch-size", "2", "--device", "cpu", "--num_workers", "0", "--epochs", "1",
                     "--warmup-epochs", "0", "--output_dir", str(tmp_path), "--dynamicvit-teacher", str(tmp_path / "deit_s.pth")])
    errors = [line for line in capsys.readouterr().err.splitlines() if " ERROR " in line]
    assert code == 2 and len(errors) == 1 and f"no checkpoint file at {tmp_path / 'deit_s.pth'}" in errors[0]
