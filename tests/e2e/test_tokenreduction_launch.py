"""TokenReduction through main.py: the official README training line, the validate.py-style
evaluation with --viz_mode, the training recipe (optimizer groups, backbone freeze,
--target-gmacs) and bad flag values (one line, exit 2).

The README line (30 epochs of DeiT-S at batch 256) runs made tiny by appended flags, from DeiT
weights written in the official layout where train.py's models_act.py keeps them
(`./deit_weights/deit_small_patch16_224-cd65a155.pth`, relative to the working directory).
"""
import argparse
import json
import os
import shlex
import subprocess
from types import SimpleNamespace

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import main
import models  # noqa: F401
from e2e_utils import PYTHON, ROOT, TINY_MODEL, TINY_RUN, assert_ok, read_log, run_main, write_imagenet_folder
from models import family
from models import tokenreduction as tr
from models.errors import ModelConfigError

README_LINE = ("--dataset imagenet --data DATA --batch-size 256 --lr 0.001 --epochs 30 --warmup-epochs 20 "
               "--lr_batch_normalizer 1024 --sched_in_steps --use_amp --grad_accum_steps 2 "
               "--wandb_project WANDB_PROJECT --wandb_group WANDB_GROUP --output_dir OUT "
               "--model topk_small_patch16_224 --reduction_loc 3 6 9 --keep_rate 0.9")
TINY = {"embed_dim": 32, "num_heads": 2, "patch_size": 8, "depth": 4}
SHRINK = ["--epochs", "1", "--batch-size", "2", "--input-size", "32", "--model-kwargs", repr(TINY),
          "--num_workers", "0", "--device", "cpu", "--warmup-epochs", "0", "--reduction_loc", "1", "3",
          "--print-freq", "1"]


def translated(line: str, **paths):
    for name, value in paths.items():
        line = line.replace(name, str(value))
    return family.translate_argv(shlex.split(line))


@pytest.fixture(scope="module")
def imagenet_folder(tmp_path_factory):
    # unique file names: the --viz_mode JSON is keyed by them
    return write_imagenet_folder(tmp_path_factory.mktemp("imagenet"), unique_names=True)


# ---------------------------------------------------------------------------
# The README training line
# ---------------------------------------------------------------------------

def test_readme_line_translates_to_the_train_py_recipe():
    argv = translated(README_LINE, DATA="/imagenet", OUT="/out")
    assert argv[argv.index("--finetune") + 1] == "./deit_weights/deit_small_patch16_224-cd65a155.pth"
    assert family.translate_argv(argv) == argv  # idempotent
    args = main.parse_args(argv)
    assert (args.data_set, args.data_path, args.model) == ("IMNET", "/imagenet", "topk_small_patch16_224")
    assert (args.batch_size, args.epochs, args.warmup_epochs, args.accum_iter) == (256, 30, 20, 2)
    assert args.sched_step == "iter" and args.amp and args.cooldown_epochs == 0  # train.py's default
    assert (args.reduction_loc, args.keep_rate) == ([3, 6, 9], [0.9])
    assert (args.wandb_project, args.wandb_group) == ("WANDB_PROJECT", "WANDB_GROUP")
    # train.py: lr * batch * accumulation * world / lr_batch_normalizer
    assert main.scaled_lr(args, 1) == pytest.approx(0.001 * 256 * 2 / 1024, rel=1e-12)
    assert main.resolved_options(args)["wandb_project"] == "WANDB_PROJECT"  # recorded in args.yaml


def test_other_models_lines_are_left_alone():
    line = shlex.split("--model deit_small_patch16_224 --data-path /x --lr 0.001")
    assert family.translate_argv(line) == line
    project = shlex.split("--model sinkhorn_small_patch16_224 --data-path /x --keep_rate 0.7")
    assert family.translate_argv(project) == project  # project spellings: no implied DeiT weights


def test_lr_batch_normalizer_without_lr_uses_train_py_default():
    argv = tr.translate_official_argv(shlex.split("--model patchmerger_tiny_patch16_224 --lr_batch_normalizer 2048"))
    assert argv[argv.index("--lr") + 1] == repr(5e-4 * 512 / 2048)
    assert "--finetune" in argv and "deit_tiny_patch16_224-a1311bcf" in argv[argv.index("--finetune") + 1]


@pytest.mark.parametrize("line,message", [
    ("--model topk_small_patch16_224 --dataset nabirds --data /x", "--dataset nabirds is not supported"),
    ("--model dpcknn_small_patch16_224 --distillation-type soft", "no distillation token"),
])
def test_unsupported_train_py_options_are_one_line_errors(line, message):
    with pytest.raises(ModelConfigError, match=message):
        tr.translate_official_argv(shlex.split(line))


def _tiny_deit_weights(folder):
    path = folder / "deit_weights" / "deit_small_patch16_224-cd65a155.pth"
    path.parent.mkdir(parents=True)
    deit = timm.create_model("deit_small_patch16_224", img_size=32, **TINY)
    torch.save({"model": deit.state_dict()}, path)  # the released DeiT file's layout
    return deit


@pytest.mark.slow
def test_readme_line_trains_through_main(imagenet_folder, tmp_path):
    """The README line with only size flags appended, run from a directory holding train.py's DeiT weights."""
    deit = _tiny_deit_weights(tmp_path)
    out = tmp_path / "out"
    argv = shlex.split(README_LINE.replace("DATA", str(imagenet_folder)).replace("OUT", str(out))) + SHRINK
    proc = subprocess.run([PYTHON, os.path.join(ROOT, "main.py"), *argv], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert_ok(proc)
    assert "finetune from ./deit_weights/deit_small_patch16_224-cd65a155.pth" in proc.stderr
    log = read_log(out)
    assert log[-1]["method"] == {"tokens_b1": 14, "tokens_b3": 12}  # int(0.9 * 16), int(0.81 * 16)
    assert log[-1]["train_tokens_b1"] == 14
    saved = torch.load(out / "checkpoint.pth", map_location="cpu", weights_only=False)
    assert saved["model"]["pos_embed"].shape == deit.state_dict()["pos_embed"].shape


# ---------------------------------------------------------------------------
# validate.py's evaluation: --eval --viz_mode writes the per-image JSON
# ---------------------------------------------------------------------------

def _official_run(folder, name, **kwargs):
    """An official run directory: best_checkpoint.pth with model, model_ema, args and ema_best."""
    model = timm.create_model(name, num_classes=1000, img_size=32, **TINY, **kwargs)
    with torch.no_grad():
        model.head.weight.mul_(20)
    run = folder / "topk_run_42"
    run.mkdir()
    args = argparse.Namespace(model=name, input_size=32, reduction_loc=list(kwargs["reduction_loc"]),
                              keep_rate=list(kwargs["keep_rate"]), cluster_iters=3, equal_weight=False)
    torch.save({"model": model.state_dict(), "model_ema": model.state_dict(), "args": args, "ema_best": False,
                "epoch": 29}, run / "best_checkpoint.pth")
    return model, run / "best_checkpoint.pth"


def _viz_eval(tmp_path, name, data_flags):
    """(proc, output dir): `--eval --viz_mode` of an official run's best checkpoint (reduction_loc 1 3,
    keep_rate 0.5), the data named by `data_flags`; main.py must succeed."""
    _, ckpt = _official_run(tmp_path, name, reduction_loc=(1, 3), keep_rate=(0.5,))
    out = tmp_path / "eval"
    line = (f"{data_flags} --eval --resume {ckpt} --model {name} --reduction_loc 1 3 --keep_rate 0.5 "
            f"--input-size 32 --model-kwargs \"{TINY}\" --num_workers 0 --viz_mode --output_dir {out}")
    proc = run_main(shlex.split(line))
    assert_ok(proc)
    return proc, out


@pytest.mark.slow
@pytest.mark.parametrize("name", ["kmedoids_small_patch16_224", "sinkhorn_small_patch16_224"])
def test_eval_with_viz_mode_writes_validate_py_json(imagenet_folder, tmp_path, name):
    proc, out = _viz_eval(tmp_path, name, f"--data-path {imagenet_folder} --batch-size 4")
    with open(out / "topk_run_42_viz_results.json") as f:
        record = json.load(f)
    assert (record["Model"], record["Ratio"], record["Location"]) == (name, [0.5], [1, 3])
    images = sorted(k for k in record if k.endswith(".JPEG"))
    assert len(images) == 4
    entry = record[images[0]]
    assert len(entry["Predictions"]) == 5 and set(entry) >= {"Target", "Loss", "Stage-1", "Stage-3"}
    assert len(entry["Stage-1"]["Assignment_Maps"]) == 16 and len(entry["Stage-3"]["Assignment_Maps"]) == 8
    if name.startswith("kmedoids"):
        assert len(entry["Stage-1"]["Kept_Token"]) == 8 and len(entry["Stage-3"]["Kept_Token"]) == 4
        assert set(entry["Stage-3"]["Kept_Token"]) <= set(entry["Stage-1"]["Kept_Token"])  # original patch ids
    # the same numbers as main's own evaluation line
    assert f"* Acc@1 {record['Top1-Acc']:.3f} Acc@5 {record['Top5-Acc']:.3f}" in proc.stderr


@pytest.mark.slow
def test_validate_py_spellings_run_as_eval(imagenet_folder, tmp_path):
    """validate_dirs.py's flags on one run: --dataset imagenet --data P --use_amp (bf16 on CPU)."""
    _, out = _viz_eval(tmp_path, "kmedoids_small_patch16_224", f"--dataset imagenet --data {imagenet_folder} --use_amp")
    assert (out / "topk_run_42_viz_results.json").exists()


# ---------------------------------------------------------------------------
# Bad flag values: one line and exit status 2
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("flags,message", [
    (["--keep_rate", "1.5"], "--keep_rate 1.5 is outside (0, 1]"),
    (["--keep_rate", "abc"], "takes keep rates such as 0.7"),
    (["--reduction_loc", "1", "1", "3"], "must be strictly increasing"),
    (["--k_neighbors", "0"], "--k_neighbors must be >= 1"),
    (["--sinkhorn_eps", "3", "--reduction_loc", "1"], "sinkhorn_eps is an option of the sinkhorn models"),
    (["--dataset", "coco"], "--dataset coco is not supported"),
])
def test_bad_flag_values_are_one_line_and_exit_2(flags, message):
    model = ["--model", "kmedoids_tiny_patch16_224", "--model-kwargs", repr(TINY), "--input-size", "32"]
    proc = run_main(model + TINY_RUN[len(TINY_MODEL):] + flags)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and message in errors[0], proc.stderr[-2000:]


# ---------------------------------------------------------------------------
# The recipe: optimizer groups, backbone freeze, --target-gmacs
# ---------------------------------------------------------------------------

def _options(**values):
    base = dict(weight_decay=0.05, backbone_lr_scale=1.0, backbone_freeze_steps=0, constant_cls=False,
                constant_pos=False)
    return SimpleNamespace(**dict(base, **values))


def test_official_param_groups():
    """Spec check 12: head, pos_embed, patch_embed and cluster_layers at lr, the rest at 0.01 lr; no weight
    decay for 1-D, biases, pos_embed and cls_token."""
    model = timm.create_model("patchmerger_tiny_patch16_224", img_size=32, reduction_loc=(1,), **TINY)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = tr.official_param_groups(model, 1.0, 0.05, backbone_lr_scale=0.01)
    lr_of = {names[id(p)]: g["lr"] for g in groups for p in g["params"]}
    wd_of = {names[id(p)]: g["weight_decay"] for g in groups for p in g["params"]}
    assert set(lr_of) == set(names.values())
    new = [n for n in lr_of if n.startswith(("head.", "pos_embed", "patch_embed.", "cluster_layers."))]
    assert {lr_of[n] for n in new} == {1.0} and {lr_of[n] for n in lr_of if n not in new} == {0.01}
    assert wd_of["pos_embed"] == wd_of["cls_token"] == wd_of["blocks.0.norm1.weight"] == wd_of["head.bias"] == 0
    assert wd_of["blocks.0.attn.qkv.weight"] == wd_of["cluster_layers.0.queries"] == 0.05
    # [cls_token, pos_embed, patch_embed.*, ...]: the official order of first use
    assert [(g[tr._ROLE], g["weight_decay"] > 0) for g in groups] == [
        ("backbone", False), ("new", False), ("new", True), ("backbone", True)]
    # Q9: each constant flag keeps only its own parameter out of the optimizer
    kept = lambda **kw: {names[id(p)] for g in tr.official_param_groups(model, 1.0, 0.05, **kw) for p in g["params"]}
    assert set(names.values()) - kept(constant_cls=True) == {"cls_token"}
    assert set(names.values()) - kept(constant_pos=True) == {"pos_embed"}


def test_backbone_freeze_zeroes_backbone_lr_before_each_step():
    model = timm.create_model("dpcknn_tiny_patch16_224", img_size=32, reduction_loc=(1,), **TINY)
    hooks = tr.TokenReductionHooks(model, _options(backbone_lr_scale=0.5, backbone_freeze_steps=2))
    optimizer = torch.optim.AdamW(hooks.param_groups(model, [1e-2]), lr=1e-2)
    backbone = model.blocks[0].attn.qkv.weight
    score = model.cluster_layers[0].score.weight
    for epoch, frozen in ((0, True), (1, True), (2, False)):
        hooks.on_epoch_start(model, epoch)
        for group in optimizer.param_groups:  # what the scheduler sets every step
            group["lr"] = 1e-2 * (0.5 if group[tr._ROLE] == "backbone" else 1.0)
        before, score_before = backbone.detach().clone(), score.detach().clone()
        model(torch.randn(2, 3, 32, 32)).sum().backward()
        hooks.before_optimizer_step(model, optimizer)  # engine.py: right before the step
        optimizer.step()
        optimizer.zero_grad()
        assert torch.equal(backbone, before) == frozen
        assert not torch.equal(score, score_before)
    assert hooks.log_state(model) == {"tokens_b1": 14}  # int(0.9 * 16)


def test_target_gmacs_solves_the_keep_rate():
    from models.factory import create_model
    from models.flops import count_flops
    reduction = family.get_family("tokenreduction").reduction

    def build(rate):
        return create_model("sinkhorn_tiny_patch16_224", options={"keep_rate": rate, "reduction_loc": [1, 3]},
                            num_classes=10,
                            model_kwargs=dict(TINY, img_size=64))

    def gmacs_of(model):
        return count_flops(model, 64)["gmacs"]

    full, smallest = gmacs_of(build(1.0)), gmacs_of(build(0.2))
    target = (full + smallest) / 2
    rate, gmacs = reduction.search(build, target, gmacs_of)
    assert 0.2 < rate < 1.0 and abs(gmacs - target) / target < 0.03
    assert gmacs == pytest.approx(gmacs_of(build(rate)))


def test_keep_rate_auto_parses():
    args = main.parse_args(["--model", "topk_small_patch16_224", "--keep_rate", "auto", "--target-gmacs", "3.0"])
    assert args.keep_rate == "auto"
    args = main.parse_args(["--model", "topk_small_patch16_224", "--keep_rate", "0.9", "0.8", "0.5"])
    assert args.keep_rate == [0.9, 0.8, 0.5]


# ---------------------------------------------------------------------------
# The visualisation tool
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["topk_small_patch16_224", "dpcknn_small_patch16_224",
                                  "patchmerger_small_patch16_224"])
def test_visualize_writes_an_image(tmp_path, name):
    from tools import tokenreduction_visualize
    out = tmp_path / "tokens.png"
    code = tokenreduction_visualize.main(["--model", name, "--input-size", "64", "--model-kwargs", repr(TINY),
                                          "--reduction_loc", "1", "3", "--keep_rate", "0.5", "--out", str(out)])
    assert code == 0
    image = Image.open(out)
    assert image.size == (64 * 3, 64)  # the input and one panel per location


def test_patch_groups_compose_through_locations():
    from tools.tokenreduction_visualize import patch_groups, viz_forward
    model = timm.create_model("kmedoids_small_patch16_224", img_size=32, reduction_loc=(1, 3), keep_rate=(0.5,),
                              **TINY).eval()
    _, viz = viz_forward(model, torch.randn(2, 3, 32, 32))
    groups = patch_groups(model, viz, 16)
    assert groups[1].shape == (2, 16) and groups[1].max() < 8 and groups[3].max() < 4
    for b in range(2):
        assert np.array_equal(groups[3][b], viz["Assignment_Maps"][3][b][groups[1][b]])
    topk = timm.create_model("topk_small_patch16_224", img_size=32, reduction_loc=(1, 3), keep_rate=(0.5,),
                             **TINY).eval()
    _, viz = viz_forward(topk, torch.randn(2, 3, 32, 32))
    groups = patch_groups(topk, viz, 16)
    assert ((groups[1] >= 0).sum(1) == 8).all() and ((groups[3] >= 0).sum(1) == 4).all()
