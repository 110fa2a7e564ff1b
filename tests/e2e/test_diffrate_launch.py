"""DiffRate's official launch lines (docs/methods/diffrate.md "Launch lines") run as
`python main.py <same flags>` unchanged apart from paths; bad DiffRate flags are one line and exit 2.

The official main.py always starts from timm's pretrained DeiT, so the evaluation line runs on a
fake local Hugging Face cache holding (random) DeiT-S weights, where `--pretrained` reads them
offline. The search line (3 epochs of DeiT-S at batch 256 on 4 GPUs) runs made tiny by appended
flags, from a checkpoint in the official layout.
"""
import shlex

import pytest
import timm
import torch

import main
import models  # noqa: F401
from e2e_utils import (
    assert_ok, assert_printed_eval, pretrained_deit_small, read_log, reference_eval, run_main, save_official_checkpoint)
from models import diffrate, family
from models.errors import ModelConfigError

EVAL_LINE_S = "--eval --load_compression_rate --data-path IMAGENET --model vit_deit_small_patch16_224 --target_flops 2.9"
EVAL_LINE_B = "--eval --load_compression_rate --data-path IMAGENET --model vit_deit_base_patch16_224 --target_flops 11.5"
SEARCH_LINE = ("--arch-lr 0.01 --arch-min-lr 0.001 --epoch 3 --batch-size 256 --data-path IMAGENET "
               "--output_dir OUT --model vit_deit_small_patch16_224 --target_flops 2.9")
DISTRIBUTED_PREFIX = "-m torch.distributed.launch --nproc_per_node=4 --use_env --master_port 29513 main.py"


def translated(line: str, **paths):
    for name, value in paths.items():
        line = line.replace(name, str(value))
    return family.translate_argv(shlex.split(line))


# ---------------------------------------------------------------------------
# translation and the resolved recipe
# ---------------------------------------------------------------------------

def test_eval_lines_translate_to_pretrained_deit():
    assert translated(EVAL_LINE_S) == shlex.split(EVAL_LINE_S) + ["--pretrained"]
    assert translated(EVAL_LINE_B) == shlex.split(EVAL_LINE_B) + ["--pretrained"]
    for line in (EVAL_LINE_S, EVAL_LINE_B):
        args = main.parse_args(translated(line))
        assert args.eval and args.load_compression_rate and args.pretrained
    with torch.device("meta"):
        model = timm.create_model("vit_deit_base_patch16_224", **main.families.model_kwargs(
            "vit_deit_base_patch16_224", main.parse_args(translated(EVAL_LINE_B)))[0])
    assert model.get_kept_num() == diffrate.shipped_schedule("ViT-B-DeiT", 11.5)
    assert round(model.calculate_flop_inference() / 1e9, 3) == 11.517


def test_search_line_translation_and_recipe():
    argv = translated(SEARCH_LINE)
    assert argv == shlex.split("--epoch 3 --batch-size 256 --data-path IMAGENET --output_dir OUT --model "
                               "vit_deit_small_patch16_224 --target_flops 2.9 --lr 0.01 --min-lr 0.001 --pretrained")
    assert family.translate_argv(argv) == argv  # idempotent
    args = main.parse_args(argv)
    assert (args.epochs, args.batch_size, args.target_flops, args.granularity) == (3, 256, 2.9, None)
    assert (args.lr, args.unscale_lr, args.min_lr, args.warmup_epochs, args.weight_decay) == (0.01, True, 0.001, 0, 0.0)
    assert (args.opt, args.sched, args.model_ema, args.dist_eval, args.drop_path) == ("adamw", "cosine", False, True, 0.1)
    assert not args.load_compression_rate and args.pretrained


def test_official_flags_the_search_ignores_are_accepted():
    line = (SEARCH_LINE + " --lr 5e-4 --min-lr 1e-5 --warmup-lr 1e-6 --warmup-epochs 5 --sched cosine --opt adamw "
            "--opt-eps 1e-8 --opt-betas 0.9 0.999 --momentum 0.9 --weight-decay 0.05 --multi-reso --port 15662 "
            "--autoresume --dist-eval --granularity 2 --warmup_compression_rate")
    args = main.parse_args(translated(line))
    assert (args.lr, args.min_lr, args.warmup_epochs, args.weight_decay, args.opt_betas) == (0.01, 0.001, 0, 0.0, None)
    assert args.auto_resume and args.multi_reso and args.granularity == 2 and args.warmup_compression_rate


def test_other_models_lines_are_left_alone():
    line = shlex.split("--model deit_small_patch16_224 --lr 5e-4 --weight-decay 0.05")
    assert family.translate_argv(line) == line
    weights = shlex.split("--eval --model vit_deit_small_patch16_224 --target_flops 2.9 --load_compression_rate "
                          "--resume ckpt.pth")
    assert family.translate_argv(weights) == weights  # weights given: no --pretrained


def test_per_epoch_learning_rates_are_the_official_ones():
    """AdamW on the proxies alone, per-epoch cosine from 0.01 to 0.001 over 3 epochs: 0.01, 0.01, 0.00775."""
    args = main.parse_args(translated(SEARCH_LINE) + ["--model-kwargs", "{'depth': 2, 'embed_dim': 24}"])
    model = timm.create_model(args.model, depth=2, embed_dim=24, num_heads=2)
    hooks = family.training_hooks(model, args.model, args)
    optimizer = main.build_optimizer(args, model, main.scaled_lr(args, 1), 1, hooks)
    assert [p for group in optimizer.param_groups for p in group["params"]] == model.arch_parameters()
    assert optimizer.param_groups[0]["weight_decay"] == 0.0
    assert all(not p.requires_grad for n, p in model.named_parameters() if "selected_probability" not in n)
    scheduler = main.build_scheduler(args, optimizer, updates_per_epoch=10)
    lrs = []
    for epoch in range(3):
        lrs.append(optimizer.param_groups[0]["lr"])
        scheduler.step(epoch)  # after each epoch, with its index (main.py, as the official main.py)
    assert lrs == pytest.approx([0.01, 0.01, 0.00775])


# ---------------------------------------------------------------------------
# the lines, run
# ---------------------------------------------------------------------------

@pytest.mark.slow
def test_eval_line_prints_the_shipped_schedules_numbers(imagenet_folder, tmp_path):
    weights, env = pretrained_deit_small(tmp_path / "hub")
    proc = run_main(shlex.split(EVAL_LINE_S.replace("IMAGENET", str(imagenet_folder))) + ["--device", "cpu"],
                    env_extra=env)
    assert_ok(proc)
    plain = reference_eval(weights, imagenet_folder)
    schedule = reference_eval(diffrate.patch(weights, target_flops=2.9), imagenet_folder)
    assert abs(schedule[2] - plain[2]) > 1e-3  # the printed loss tells the schedule apart from plain DeiT
    assert_printed_eval(proc.stderr, *schedule)
    assert "official FLOPs 2.905 G" in proc.stderr
    assert "tokens after each block [197, 194, 176, 156, 141, 133, 121, 107, 88, 64, 56, 3]" in proc.stderr


@pytest.mark.slow
def test_search_line_searches_and_its_checkpoint_evaluates_the_searched_schedule(imagenet_folder, tmp_path):
    """The search line made tiny by appended flags (the line's own 3 epochs), from a checkpoint in the
    official layout; then `--eval --resume` of the search's checkpoint evaluates the searched schedule."""
    tiny = {"depth": 3, "embed_dim": 24, "num_heads": 2, "patch_size": 8}
    source = timm.create_model("vit_deit_small_patch16_224", img_size=32, **tiny)
    official_args = dict(model="vit_deit_small_patch16_224", target_flops=2.9)
    ckpt = save_official_checkpoint(tmp_path / "official.pth", source, official_args, epoch=2, scaler={})
    out = tmp_path / "out"
    line = shlex.split(SEARCH_LINE.replace("IMAGENET", str(imagenet_folder)).replace("OUT", str(out)))
    proc = run_main(line + ["--finetune", str(ckpt), "--model-kwargs", str(tiny), "--input-size", "32",
                            "--batch-size", "4", "--device", "cpu", "--num_workers", "0", "--print-freq", "1",
                            "--target_flops", "0.001"])
    assert_ok(proc)
    rows = read_log(out)
    epochs = [row for row in rows if "epoch" in row]
    assert [row["train_lr"] for row in epochs] == pytest.approx([0.01, 0.01, 0.00775])
    assert all(row["train_aux_loss"] > 0 and "diffrate_gflops" in row["method"] for row in epochs)
    report = [row for row in rows if row.get("report") == "diffrate"][0]
    assert report["prune_kept_num"][0] == 17 and len(report["merge_kept_num"]) == 3
    assert "prune kept number:[17," in proc.stderr

    checkpoint = torch.load(out / "checkpoint.pth", map_location="cpu", weights_only=False)
    searched = {k: v for k, v in checkpoint["model"].items() if "selected_probability" in k}
    assert any(v.abs().sum() > 0 for v in searched.values())  # the proxies moved
    assert all(torch.equal(checkpoint["model"][k], source.state_dict()[k])
               for k in source.state_dict() if "_ddp." not in k)  # the backbone did not
    proc = run_main(["--eval", "--resume", str(out / "checkpoint.pth"), "--model", "vit_deit_small_patch16_224",
                     "--data-path", str(imagenet_folder), "--model-kwargs", str(tiny), "--input-size", "32",
                     "--device", "cpu", "--num_workers", "0"])
    assert_ok(proc)
    assert f"prune kept number {report['prune_kept_num']}; merge kept number {report['merge_kept_num']} " \
           f"(schedule of the proxies)" in proc.stderr


# ---------------------------------------------------------------------------
# bad flags: one line, exit status 2
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("flags, message", [
    ("--model vit_deit_small_patch16_224 --target_flops -1", "--target_flops must be a positive number"),
    ("--model vit_deit_small_patch16_224 --granularity 0", "--granularity must be >= 1"),
    ("--model vit_deit_small_patch16_224 --arch-lr -0.1", "--arch-lr takes a learning rate >= 0"),
    ("--model vit_deit_small_patch16_224 --arch_min_lr x", "--arch_min_lr takes a learning rate >= 0"),
    ("--model deit_small_patch16_224 --diffrate-prune-kept [197]", "go together"),
    ("--model deit_small_patch16_224 --diffrate-flops 2.9 --diffrate-prune-kept [1] --diffrate-merge-kept [1]",
     "not both"),
    ("--model deit_small_patch16_224 --diffrate-flops -2", "--diffrate-flops must be a positive"),
    ("--model deit_small_patch16_224 --diffrate-flops 2.9 --tome-r 4", "cannot be combined"),
])
def test_bad_flag_values_are_one_line(flags, message):
    with pytest.raises((main.UserError, ModelConfigError), match=message) as err:
        main.parse_args(family.translate_argv(shlex.split(flags)))
    assert "\n" not in str(err.value)


@pytest.mark.slow
def test_bad_values_exit_2_with_one_line(tmp_path):
    cases = [
        (["--model", "vit_deit_small_patch16_224", "--eval", "--load_compression_rate", "--target_flops", "2.8",
          "--resume", "x.pth"], "no ViT-S-DeiT schedule for 2.8 GFLOPs; available: 2.3, 2.5, 2.7, 2.9, 3.1"),
        (["--model", "deit_tiny_patch16_224", "--diffrate-flops", "0.6", "--model-kwargs", "{'depth': 2}"],
         "shipped schedules are for 224-px, 12-block DeiT-T/S/B; this model has 2 blocks"),
        (["--model", "deit_tiny_patch16_224", "--model-kwargs", "{'depth': 2, 'embed_dim': 24, 'num_heads': 2}",
          "--diffrate-prune-kept", "[197,150]", "--diffrate-merge-kept", "[197,100]", "--output_dir", str(tmp_path)],
         "set an evaluation schedule"),
    ]
    for argv, message in cases:
        proc = run_main(argv + ["--data-set", "SYNTHETIC", "--synthetic-train-size", "8", "--synthetic-val-size", "4",
                                "--device", "cpu", "--batch-size", "4", "--num_workers", "0", "--epochs", "1"])
        assert proc.returncode == 2, proc.stderr[-3000:]
        errors = [line for line in proc.stderr.splitlines() if "ERROR" in line]
        assert len(errors) == 1 and message in errors[0], proc.stderr[-3000:]
