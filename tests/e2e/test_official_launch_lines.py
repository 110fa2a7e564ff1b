"""The official launch lines quoted in the method specs run unchanged apart from paths.

EViT's `--eval` line and the shrink method's test.sh line run for real on a tiny
ImageNet-style folder with official-format checkpoints (a dict with `model` and a pickled
`argparse.Namespace`); the LTM README line is parsed exactly as written (it trains for 300
epochs on 4 processes, so the short run of `distributed_train.sh` in test_distributed.py
stands in for executing it).
"""
import shlex

import numpy as np
import pytest
import timm
from PIL import Image

import main
import models  # noqa: F401
from e2e_utils import (
    assert_ok, assert_printed_eval, reference_eval, run_main, save_official_checkpoint, spread_logits)


def official_checkpoint(path, model_name, **kwargs):
    """(path, model): a checkpoint in the official layout (DeiT's dict with a pickled Namespace)."""
    model = spread_logits(timm.create_model(model_name, **kwargs))
    return save_official_checkpoint(path, model, dict(model=model_name), epoch=299), model


@pytest.mark.slow
def test_evit_eval_line(imagenet_folder, tmp_path):
    ckpt, model = official_checkpoint(tmp_path / "evit.pth", "deit_small_patch16_shrink_base", fuse_token=True)
    line = f"--model deit_small_patch16_shrink_base --fuse_token --base_keep_rate 0.7 --eval --resume {ckpt} " \
           f"--data-path {imagenet_folder}"
    proc = run_main(shlex.split(line))
    assert_ok(proc)
    acc1, acc5, loss, count = reference_eval(model, imagenet_folder, int(1.5 * 64))  # DeiT's default batch 64
    assert_printed_eval(proc.stderr, acc1, acc5, loss, count)


@pytest.mark.slow
def test_shrink_test_sh_line(imagenet_folder, tmp_path):
    ckpt, source = official_checkpoint(tmp_path / "small_0246.pth", "deit_small_patch16_224_copy_lambda",
                                       prune_layer=[0, 2, 4, 6])
    line = f"--data-set IMNET --data-path {imagenet_folder} --model deit_small_patch16_224_shrink " \
           f"--prune_layer [] --done_layer [0,2,4,6] --seed 42 --num_workers 10 --batch-size 256 " \
           f"--finetune {ckpt} --eval --no-model-ema"
    proc = run_main(shlex.split(line), script="main_lambda.py")
    assert_ok(proc)
    assert "0 resized, 24 dropped, 0 missing" in proc.stderr  # the 6 attention keys of 4 removed blocks
    deployed = timm.create_model("deit_small_patch16_224_shrink", done_layer=[0, 2, 4, 6])
    deployed.load_state_dict({k: v for k, v in source.state_dict().items() if k in deployed.state_dict()})
    acc1, acc5, loss, count = reference_eval(deployed, imagenet_folder, int(1.5 * 256))
    assert_printed_eval(proc.stderr, acc1, acc5, loss, count, decimals=2)  # lambda_vit: 2 decimals


def test_ltm_readme_line_parses_as_written():
    line = ("'your-data-path' --model ltm_mobilevit_s -b 64 --workers 8 --pin-mem "
            "--sched cosine --epochs 300 --min-lr 0.00002 --lr 0.0002 --warmup-lr 0.0002 --warmup-epochs 5 "
            "--opt adamw --weight-decay 0.01 --model-ema --model-ema-decay 0.9995 "
            "--aa rand-m9-mstd0.5 --remode pixel --reprob 0.2 --amp --smoothing 0.1 --checkpoint-hist 20 "
            "--compression-ratio 0.8 --output 'your-output-path-saving-results'")
    args = main.parse_args(shlex.split(line))
    assert (args.data_path, args.model, args.batch_size, args.num_workers) == ("your-data-path", "ltm_mobilevit_s", 64, 8)
    assert (args.compression_ratio, args.checkpoint_hist, args.output_dir) == (0.8, 20, "your-output-path-saving-results")
    assert args.model_ema and args.model_ema_decay == 0.9995 and args.amp and args.min_lr == 2e-5


LTM_README_LINE = ("--model ltm_mobilevit_s -b 64 --workers 8 --pin-mem "
                   "--sched cosine --epochs 300 --min-lr 0.00002 --lr 0.0002 --warmup-lr 0.0002 --warmup-epochs 5 "
                   "--opt adamw --weight-decay 0.01 --model-ema --model-ema-decay 0.9995 "
                   "--aa rand-m9-mstd0.5 --remode pixel --reprob 0.2 --amp --smoothing 0.1 --checkpoint-hist 20 "
                   "--compression-ratio 0.8 --output out/ltm_mobilevit_s")


def test_ltm_readme_line_through_distributed_train_sh_trains_the_ltm_recipe(tmp_path):
    """./distributed_train.sh passes --defaults timm: timm's defaults, then configs/ltm_mobilevit_s.yaml,
    then the line; the resolved options (what args.yaml holds) equal the recipe file."""
    import os
    import yaml
    with open(os.path.join(os.path.dirname(main.__file__), "distributed_train.sh")) as f:
        assert "main.py\" --defaults timm" in f.read()
    args = main.parse_args(["--defaults", "timm", "/imagenet"] + shlex.split(LTM_README_LINE))
    resolved = main.resolved_options(args)
    with open(os.path.join(os.path.dirname(main.__file__), "configs", "ltm_mobilevit_s.yaml")) as f:
        recipe = yaml.safe_load(f)
    differing = {k: (resolved[k], v) for k, v in recipe.items() if resolved[k] != v}
    assert differing == {}
    # DeiT's defaults would have trained another recipe: that is what the issue reproduced
    deit = main.resolved_options(main.parse_args(["/imagenet"] + shlex.split(LTM_README_LINE)))
    assert deit["mixup"] == 0.8 and deit["unscale_lr"] is False and deit["input_size"] == 224


@pytest.fixture(scope="module")
def imagenet_folder_uneven(tmp_path_factory):
    """10 validation images in 6 classes: with --batch-size 4 the eval batches are 6 and 4 (unequal)."""
    root = tmp_path_factory.mktemp("imagenet_uneven")
    rng = np.random.default_rng(1)
    for split in ("train", "val"):
        for c in range(6):
            (root / split / f"n0{c}").mkdir(parents=True)
            for i in range(2 if c < 4 else 1):
                Image.fromarray(rng.integers(0, 255, (80, 100, 3), dtype=np.uint8)).save(root / split / f"n0{c}" / f"{i}.JPEG")
    return root


@pytest.mark.slow
def test_evit_eval_line_prints_the_official_numbers_on_cpu(imagenet_folder_uneven, tmp_path):
    model = spread_logits(timm.create_model("deit_small_patch16_shrink_base", fuse_token=True, base_keep_rate=0.7))
    ckpt = save_official_checkpoint(tmp_path / "evit.pth", model, dict(model="x"), epoch=299)
    line = (f"--model deit_small_patch16_shrink_base --fuse_token --base_keep_rate 0.7 --eval --resume {ckpt} "
            f"--data-path {imagenet_folder_uneven} --batch-size 4 --num_workers 0")
    proc = run_main(shlex.split(line))
    assert_ok(proc)
    acc1, acc5, loss, count = reference_eval(model, imagenet_folder_uneven, int(1.5 * 4))
    assert_printed_eval(proc.stderr, acc1, acc5, loss, count)


@pytest.mark.slow
def test_shrink_test_sh_line_prints_the_official_numbers_on_cpu(imagenet_folder_uneven, tmp_path):
    source = spread_logits(timm.create_model("deit_small_patch16_224_copy_lambda", prune_layer=[0, 2, 4, 6]))
    ckpt = save_official_checkpoint(tmp_path / "small_0246.pth", source, dict(model="x"), epoch=299)
    line = (f"--data-set IMNET --data-path {imagenet_folder_uneven} --model deit_small_patch16_224_shrink "
            f"--prune_layer [] --done_layer [0,2,4,6] --seed 42 --num_workers 10 --batch-size 4 "
            f"--finetune {ckpt} --eval --no-model-ema")
    proc = run_main(shlex.split(line), script="main_lambda.py")
    assert_ok(proc)
    deployed = timm.create_model("deit_small_patch16_224_shrink", done_layer=[0, 2, 4, 6])
    state = {k: v for k, v in source.state_dict().items() if k in deployed.state_dict()}
    deployed.load_state_dict(state, strict=True)
    acc1, acc5, loss, count = reference_eval(deployed, imagenet_folder_uneven, int(1.5 * 4))
    assert_printed_eval(proc.stderr, acc1, acc5, loss, count, decimals=2)  # lambda_vit: 2 decimals
