"""MCTF's official launch lines (README and run/eval_*.sh; docs/methods/mctf.md "Launch lines") run
as `python main.py <same flags>` unchanged apart from paths (plus appended flags that make the
model tiny and the run short), bad MCTF flags are one line and exit status 2, and the
`--r_evals` / `--mctf_visualize` commands and the visualisation tool write their outputs.

Until main.py applies `models.family.translate_argv` to its argv, the end-to-end tests hand
main.py the translated line (what main.py will do itself); `test_*_raw_line` runs the line as
typed and is an expected failure until then.
"""
import argparse
import json
import shlex

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import main
import models  # noqa: F401
from e2e_utils import assert_ok, read_log, run_main
from models import family, mctf
from models.errors import ModelConfigError

README_LINE = ("--data_path /path/to/imagenet --dataset IMNET --output_dir ./output --batch-size 128 "
               "--min_lr_times 0.1 --lr_times 0.03 --epochs 30 --activate_layer [1,2,3,4,5,6,7,8,9,10,11] "
               "--model deit_small --use_mctf True --mctf_type [16,8,0,1,1,1,20,40,1,1,0] --task_type [1,1,0.4] "
               "--task_weight [1.0,1.0,3.0]")
EVAL_LINE = ("--eval --data_path /path/to/imagenet --dataset IMNET --resume /path/to/checkpoint/ --use_mctf True "
             "--mctf_type [16,0,0,1,1,1,20,40,1,1,0] --task_type [1,0,0,0] --r_evals [16] "
             "--activate_layer [1,2,3,4,5,6,7,8,9,10,11] --model deit_small")
FAST_EVAL_LINE = ("--eval --data_path /path/to/imagenet --dataset IMNET --resume /path/to/checkpoint/ --use_mctf True "
                  "--mctf_type [0.35,0,0,1,1,1,20,40,1,1,0] --task_type [1,0,0,0] --r_evals [0.35] "
                  "--activate_layer [3,6,9] --model deit_tiny")
TINY = {"depth": 2, "embed_dim": 32, "num_heads": 2, "patch_size": 8}


def with_paths(line: str, **paths) -> list:
    argv = shlex.split(line)
    for option, value in paths.items():
        argv[argv.index(option) + 1] = str(value)
    return argv


def as_main_runs_it(argv: list) -> list:
    """The argv main.py acts on: main.py translates an official line itself."""
    return argv



# ---------------------------------------------------------------------------
# The translation
# ---------------------------------------------------------------------------

def test_readme_line_resolves_to_the_official_recipe():
    args = main.parse_args(family.translate_argv(shlex.split(README_LINE)))
    assert (args.model, args.use_mctf, args.mctf_type, args.task_type, args.task_weight) == (
        "deit_small", True, [16, 8, 0, 1, 1, 1, 20, 40, 1, 1, 0], [1, 1, 0.4], [1.0, 1.0, 3.0])
    assert args.activate_layer == list(range(1, 12)) and args.data_set == "IMNET" and args.output_dir == "./output"
    # official main.py: pretrained -> lr * lr_times, min_lr and warmup_lr * min_lr_times, no warm-up, cool-down 10
    assert args.pretrained and args.lr == pytest.approx(1.5e-5) and args.min_lr == pytest.approx(1e-6)
    assert args.warmup_lr == pytest.approx(1e-7) and args.warmup_epochs == 0 and args.cooldown_epochs == 10
    # the official main.py's defaults that differ from DeiT's
    assert args.mixup == 0 and args.cutmix == 0 and args.model_ema and args.smoothing == 0.1
    assert (args.batch_size, args.epochs, args.drop_path, args.opt, args.weight_decay) == (128, 30, 0.1, "adamw", 0.05)


def test_eval_lines_translate():
    argv = family.translate_argv(shlex.split(EVAL_LINE))
    args = main.parse_args(argv)
    assert args.eval and args.resume == "/path/to/checkpoint/" and not args.pretrained  # --resume wins
    assert args.r_evals == [16] and args.task_type == [1, 0, 0, 0] and args.mctf_type[0] == 16
    fast = main.parse_args(family.translate_argv(shlex.split(FAST_EVAL_LINE)))
    assert fast.model == "deit_tiny" and fast.r_evals == [0.35] and fast.activate_layer == [3, 6, 9]


@pytest.mark.parametrize("line,present,absent", [
    # training-free MCTF on the DeiT weights: --eval without --resume reads the pretrained weights
    ("--eval --use_mctf True --model deit_small", ["--pretrained", "--r_evals", "[0.35]"], []),
    ("--eval --use_mctf --model deit_small --mctf_type [12,0,0,1,1,1,20,40,1,1,0]", ["--use_mctf", "True",
                                                                                     "[12]"], []),
    ("--model deit_small --use_mctf True --pretrained False --finetune x.pth", [], ["--pretrained", "--lr"]),
    ("--model deit_small --use_mctf True --model_ema False --pin_mem True --dist_eval True --use_bce False",
     ["--no-model-ema", "--pin-mem", "--dist-eval"], ["--model_ema", "--pin_mem", "--use_bce", "--bce-loss"]),
    ("--model deit_small --use_mctf True --accumulation-steps 1 --persistent_workers True --sampling_ratio 1.0",
     [], ["--accumulation-steps", "--persistent_workers", "--sampling_ratio"]),
])
def test_other_official_spellings(line, present, absent):
    argv = family.translate_argv(shlex.split(line))
    assert all(token in argv for token in present), argv
    assert not any(token in argv for token in absent), argv
    main.parse_args(argv)  # and main.py takes it


def test_unused_official_options_warn_when_they_would_act(caplog):
    """Quirk 19: --accumulation-steps is parsed and unused officially: dropped, with a warning unless 1."""
    with caplog.at_level("WARNING"):
        family.translate_argv(shlex.split("--model deit_small --use_mctf True --accumulation-steps 1"))
    assert not caplog.records
    with caplog.at_level("WARNING"):
        argv = family.translate_argv(shlex.split("--model deit_small --use_mctf True --accumulation-steps 4"))
    assert "--accumulation-steps" not in argv
    assert any("--accumulation-steps 4 is ignored" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("spelling", [["--pretrained"], ["--pretrained", "True"], ["--pretrained=true"]])
def test_pretrained_takes_an_optional_boolean(spelling):
    argv = family.translate_argv(["--model", "deit_small", "--use_mctf", "True"] + spelling)
    at = argv.index("--pretrained")
    assert argv.count("--pretrained") == 1 and argv[at + 1:at + 2] != ["True"]  # this project's switch
    assert main.parse_args(argv).pretrained


def test_other_lines_are_left_alone():
    line = ["--model", "deit_small_patch16_224", "--mctf-r", "16", "--pretrained", "--epochs", "3"]
    assert family.translate_argv(line) == line
    line = ["--model", "deit_small", "--mctf-r", "16", "--task_type", "[1,1,0.4]"]  # official name, project flags
    assert family.translate_argv(line) == line


def test_translation_is_idempotent():
    """main.py translates what it is given; a line translated before (a saved command) stays the same run."""
    once = family.translate_argv(shlex.split(README_LINE))
    twice = family.translate_argv(once)

    def resolved(argv):
        return {key: value for key, value in vars(main.parse_args(argv)).items() if key != "argv"}
    assert resolved(twice) == resolved(once)


@pytest.mark.parametrize("line,message", [
    ("--model deit_small --use_mctf True --sampling_ratio 0.5", "fraction of ImageNet"),
    ("--model deit_small --use_mctf True --distillation-type soft", "distillation"),
    ("--model deit_small --use_mctf True --lr_times x", "--lr_times needs a number"),
])
def test_bad_official_lines_are_config_errors(line, message):
    with pytest.raises(ModelConfigError, match=message):
        family.translate_argv(shlex.split(line))


# ---------------------------------------------------------------------------
# Bad values: one line, exit 2
# ---------------------------------------------------------------------------

TINY_EVAL = ["--model", "deit_tiny_patch16_224", "--model-kwargs", str(TINY), "--input-size", "32", "--eval",
             "--device", "cpu", "--synthetic-val-size", "2", "--num_workers", "0"]


@pytest.mark.parametrize("flags,message", [
    (["--mctf-r", "-1"], "must be >= 0"),
    (["--mctf-r", "2.5"], "neither a token count"),
    (["--use_mctf", "maybe"], "not a boolean"),
    (["--use_mctf", "True", "--mctf_type", "[16,0,0,1,3,1,20,40,1,1,0]"], "one_step_ahead"),
    (["--use_mctf", "True", "--mctf_type", "[16,0,0,1,1,-1,20,40,1,1,0]"], "tau_sim"),
    (["--use_mctf", "True", "--mctf_type", "[16,0,0,1,1,1,20,40,1,5,0]"], "pooling_type"),
    (["--use_mctf", "True", "--mctf_type", "[16,8]"], "11 values"),
    (["--use_mctf", "True", "--mctf_type", "sixteen"], "not a list of numbers"),
    (["--use_mctf", "True", "--task_type", "[1,1]"], "task_type"),
    (["--use_mctf", "True", "--task_weight", "[1.0]"], "task_weight"),
    (["--use_mctf", "True", "--activate_layer", "[-1]"], "activate_layer"),
    (["--use_mctf", "True", "--r_evals", "[16.5]"], "neither a token count"),
    (["--mctf-r", "4", "--tome-r", "2"], "cannot be combined"),
    (["--mctf-r", "auto"], "--target-gmacs"),
])
def test_bad_flags_are_one_line_and_exit_2(flags, message, capfd):
    try:
        argv = as_main_runs_it(TINY_EVAL + flags)
    except ModelConfigError as err:  # translated here until main.py does it (main.cli: this line, exit 2)
        assert message in str(err) and "\n" not in str(err)
        return
    rc = main.cli(argv)
    err = capfd.readouterr().err
    assert rc == 2, err[-2000:]
    errors = [line for line in err.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and message in errors[0], err[-2000:]
    assert "Traceback" not in err


def test_distillation_is_refused_by_the_criterion_wrapper():
    from losses import DistillationLoss
    model = mctf.patch(timm.create_model("deit_tiny_patch16_224", **TINY, img_size=32), r=2)
    options = family.options_for(family.get_family("mctf"), {"mctf_r": 2})
    hooks = family.get_family("mctf").hooks(model, options)
    criterion = DistillationLoss(torch.nn.CrossEntropyLoss(), torch.nn.Identity(), "soft")
    with pytest.raises(ModelConfigError, match="distillation"):
        hooks.wrap_criterion(criterion, model)


# ---------------------------------------------------------------------------
# The lines run
# ---------------------------------------------------------------------------

def official_checkpoint(path, model, epoch=39):
    """The official main.py's checkpoint layout: args pickled as a Namespace, the EMA as a 1-tuple."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "lr_scheduler": {},
                "epoch": epoch, "scaler": {}, "args": argparse.Namespace(model="deit_small", use_mctf=True),
                "state_dict_ema": (model.state_dict(),)}, path)
    return path


def reference_eval(model, folder):
    """DeiT's evaluation written out: resize 256/224, centre crop, one batch."""
    from torchvision import datasets as tv_datasets, transforms
    transform = transforms.Compose([
        transforms.Resize(int(224 / 0.875), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(224), transforms.ToTensor(),
        transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    data = tv_datasets.ImageFolder(str(folder / "val"), transform=transform)
    images, target = next(iter(torch.utils.data.DataLoader(data, batch_size=len(data), shuffle=False)))
    with torch.no_grad():
        output = model.eval()(images)
    loss = torch.nn.functional.cross_entropy(output, target).item()
    top5 = output.topk(5, dim=1).indices
    acc1 = 100 * (top5[:, 0] == target).float().mean().item()
    acc5 = 100 * (top5 == target[:, None]).any(1).float().mean().item()
    return acc1, acc5, loss, len(data)


EVAL_KWARGS = {"depth": 2, "embed_dim": 64, "num_heads": 2}  # patch 16 at 224 px: 197 tokens


@pytest.mark.slow
def test_eval_line_prints_the_patched_models_numbers_and_the_r_evals_row(imagenet_folder, tmp_path):
    torch.manual_seed(0)
    weights = timm.create_model("deit_small", **EVAL_KWARGS)
    with torch.no_grad():
        weights.head.weight.mul_(30)  # spread the logits so accuracy and loss are not trivial
    ckpt = official_checkpoint(tmp_path / "checkpoint.pth", weights)
    out = tmp_path / "out"
    argv = with_paths(EVAL_LINE, **{"--data_path": imagenet_folder, "--resume": ckpt}) + [
        "--model-kwargs", str(EVAL_KWARGS), "--output_dir", str(out), "--device", "cpu", "--num_workers", "0"]
    proc = run_main(as_main_runs_it(argv))
    assert_ok(proc)
    patched = mctf.patch(weights, r=16, activate_layer=list(range(1, 12)))
    fused = reference_eval(patched, imagenet_folder)
    gmacs = round(flop_counter().count_flops(patched, 224)["gmacs"], 4)
    plain = reference_eval(mctf.unpatch(weights), imagenet_folder)
    assert abs(fused[2] - plain[2]) > 1e-4  # the printed loss tells the two apart
    acc1, acc5, loss, count = fused
    assert f"* Acc@1 {acc1:.3f} Acc@5 {acc5:.3f} loss {loss:.3f} ({count} images)" in proc.stderr
    rows = [json.loads(line) for line in (out / "result.txt").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["r"] == [16] and rows[0]["acc1"] == [round(acc1, 3)]
    assert rows[0]["flops"] == [gmacs] and rows[0]["throughput"][0] > 0


@pytest.mark.slow
def test_eval_without_r_evals_writes_one_row_at_mctf_type_r(imagenet_folder, tmp_path):
    """Quirk 3: the official --eval crashes without --r_evals; here it evaluates at --mctf_type[0]."""
    torch.manual_seed(0)
    ckpt = official_checkpoint(tmp_path / "checkpoint.pth", timm.create_model("deit_small", **EVAL_KWARGS))
    out = tmp_path / "out"
    argv = with_paths(EVAL_LINE.replace(" --r_evals [16]", ""), **{"--data_path": imagenet_folder,
                                                                    "--resume": ckpt}) + [
        "--model-kwargs", str(EVAL_KWARGS), "--output_dir", str(out), "--device", "cpu", "--num_workers", "0"]
    proc = run_main(as_main_runs_it(argv))
    assert_ok(proc)
    rows = [json.loads(line) for line in (out / "result.txt").read_text().splitlines()]
    assert [row["r"] for row in rows] == [[16]]


def test_resume_that_is_not_a_file_is_an_error(imagenet_folder, tmp_path, capfd):
    """Quirk 4: the README's `--resume /path/to/checkpoint/` (a directory) is not skipped silently."""
    argv = with_paths(EVAL_LINE, **{"--data_path": imagenet_folder, "--resume": tmp_path}) + [
        "--model-kwargs", str(EVAL_KWARGS), "--device", "cpu", "--num_workers", "0"]
    rc = main.cli(as_main_runs_it(argv))
    err = capfd.readouterr().err
    assert rc == 2, err[-2000:]
    errors = [line for line in err.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and str(tmp_path) in errors[0] and "Traceback" not in err


@pytest.mark.slow
def test_readme_finetuning_line_trains_the_consistency_step(imagenet_folder, tmp_path):
    """The README line (40 epochs of DeiT-S on 8 GPUs) made tiny by appended flags, from a DeiT
    checkpoint in the official layout (--finetune; the line's implicit --pretrained reads the
    local weight cache otherwise). Quirk 1: --output_dir is used as given."""
    torch.manual_seed(0)
    source = timm.create_model("deit_small_patch16_224", img_size=32, **TINY)
    ckpt = tmp_path / "deit_small_patch16_224-cd65a155.pth"
    torch.save({"model": source.state_dict()}, ckpt)
    out = tmp_path / "output"
    argv = with_paths(README_LINE, **{"--data_path": imagenet_folder, "--output_dir": out}) + [
        "--finetune", str(ckpt), "--model-kwargs", str(TINY), "--input-size", "32", "--epochs", "1",
        "--batch-size", "4", "--device", "cpu", "--num_workers", "0", "--print-freq", "1"]
    proc = run_main(as_main_runs_it(argv))
    assert_ok(proc)
    assert (out / "checkpoint.pth").is_file() and "finetune from" in proc.stderr
    log = [row for row in read_log(out) if "epoch" in row]
    assert len(log) == 1
    row = log[0]
    assert row["train_lr"] == pytest.approx(5e-4 * 0.03 * 4 / 512)  # lr_times, linear scaling, no warm-up
    state = row["method"]
    assert state["mctf_r"] == 16 and state["mctf_tokens"] == 10  # 17 tokens: 17 - 16 < 10 -> r 7
    assert 0 <= state["mctf_r_teacher"] < 8 and state["mctf_r_teacher"] == int(state["mctf_r_teacher"])
    assert {"loss_student", "loss_teacher", "loss_consistency", "confidence_pass"} <= set(state)
    assert row["train_loss"] == pytest.approx(row["train_loss_student"] + row["train_loss_teacher"]
                                              + row["train_loss_consistency"], rel=1e-4)
    saved = torch.load(out / "checkpoint.pth", map_location="cpu", weights_only=False)
    assert set(saved["model"]) == set(source.state_dict())


def test_eval_line_raw_line(imagenet_folder, tmp_path, capfd):
    """The eval line exactly as typed (main.py translates it): a directory --resume is one error line."""
    argv = with_paths(EVAL_LINE, **{"--data_path": imagenet_folder, "--resume": tmp_path}) + [
        "--model-kwargs", str(EVAL_KWARGS), "--device", "cpu", "--num_workers", "0"]
    rc = main.cli(argv)
    err = capfd.readouterr().err
    assert rc == 2 and "checkpoint" in err and "unrecognized" not in err, err[-2000:]


# ---------------------------------------------------------------------------
# Commands and the visualisation tool
# ---------------------------------------------------------------------------

@pytest.mark.slow
def test_visualize_command_writes_pictures(tmp_path):
    out = tmp_path / "out"
    argv = ["--model", "deit_tiny_patch16_224", "--model-kwargs", str({**TINY, "depth": 3}), "--input-size", "32",
            "--mctf-r", "4", "--activate_layer", "[1,2]", "--eval", "--mctf_visualize", "2",
            "--synthetic-val-size", "4", "--device", "cpu", "--num_workers", "0", "--output_dir", str(out)]
    proc = run_main(argv)
    assert_ok(proc)
    pictures = sorted((out / "mctf_groups").glob("*.png"))
    assert len(pictures) == 2 and Image.open(pictures[0]).size == (64, 32)


def test_visualisation_tool_paints_the_groups(tmp_path):
    from tools import mctf_visualize
    path = tmp_path / "groups.png"
    rc = mctf_visualize.main(["--model", "deit_tiny_patch16_224", "--model-kwargs", str({**TINY, "depth": 3}),
                              "--input-size", "64", "--mctf-r", "8", "--activate_layer", "[1,2]", "--out", str(path)])
    assert rc == 0 and path.is_file()
    picture = np.asarray(Image.open(path))
    assert picture.shape == (64, 128, 3) and not np.array_equal(picture[:, :64], picture[:, 64:])
    model = mctf.patch(timm.create_model("deit_tiny_patch16_224", img_size=64, **{**TINY, "depth": 3}), r=8,
                       activate_layer=[1, 2])
    sources = mctf_visualize.group_sources(model.eval(), torch.randn(2, 3, 64, 64))
    assert len(sources) == 2 and sources[0].shape == (model._mctf_info["tokens"][-1], 65)
    assert torch.equal(sources[0].sum(0), torch.ones(65))
    assert not model._mctf_cfg.trace_source  # switched back


# ---------------------------------------------------------------------------
# --target-gmacs
# ---------------------------------------------------------------------------

def flop_counter():
    try:
        from models import flops
    except ImportError:  # the counter lives at the project root until it moves under models/
        import flops
    return flops


def test_target_gmacs_solves_r():
    from models.factory import create_model
    kwargs = {"depth": 4, "embed_dim": 64, "num_heads": 2}

    def build(r):
        return create_model("deit_small_patch16_224", options={"mctf_r": r, "activate_layer": [1, 2, 3]},
                            img_size=96, model_kwargs=kwargs)

    def gmacs_of(model):
        return flop_counter().count_flops(model, 96)["gmacs"]

    search = family.get_family("mctf").reduction.search
    full, strongest = gmacs_of(build(0)), gmacs_of(build(18))
    target = (full + strongest) / 2
    r, gmacs = search(build, target, gmacs_of)
    assert isinstance(r, int) and 0 < r < 18
    neighbours = [gmacs_of(build(v)) for v in (r - 1, r + 1)]
    assert all(abs(gmacs - target) <= abs(g - target) for g in neighbours)


def test_benchmark_solves_mctf_r_for_a_gmacs_target():
    """`benchmark.py --mctf-r auto --target-gmacs G` (the equal-FLOPs list's line, on a tiny ViT)."""
    kwargs = {"depth": 4, "embed_dim": 64, "num_heads": 2}
    proc = run_main(["--model", "deit_tiny_patch16_224", "--model-kwargs", str(kwargs), "--img-size", "96",
                     "--mctf-r", "auto", "--activate_layer", "[1,2,3]", "--target-gmacs", "0.008", "--flops-only"],
                    script="benchmark.py")
    assert_ok(proc)
    output = proc.stdout + proc.stderr
    assert "--target-gmacs 0.008 -> --mctf-r 6" in output and "37,31,25,19" in output
