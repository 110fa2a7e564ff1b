"""ATS's official launch line (docs/methods/ats.md, "Launch lines") runs as `python main.py <same
flags>` unchanged apart from paths: the SlowFast-style YAML config with trailing `SECTION.KEY VALUE`
overrides is read by models/ats_config.py (translate_argv). Bad ATS flags are one line and exit 2."""
import ast
import json
import os
import shlex

import pytest
import timm
import torch

import main
import models  # noqa: F401
from e2e_utils import ROOT, assert_ok, run_main
from models import ats, ats_config, family
from models.errors import ModelConfigError

CFG = os.path.join(ROOT, "configs", "ats_DeiT_S.yaml")
README_LINE = "--cfg {cfg} DATA.PATH_TO_DATA_DIR {data} TEST.CHECKPOINT_FILE_PATH {ckpt}"
ISSUE3_OVERRIDES = 'VIT.ATS_BLOCKS "[3]" VIT.NUM_TOKENS "[197, 197, 197, 108, 197, 197, 197, 197, 197, 197, 197, 197]"'


def translated(line: str):
    return family.translate_argv(shlex.split(line))


def readme_line(data="/imagenet", ckpt="deit_small_patch16_224-cd65a155.pth", cfg=CFG):
    return README_LINE.format(cfg=cfg, data=data, ckpt=ckpt)


# ---------------------------------------------------------------------------
# The translation
# ---------------------------------------------------------------------------

def test_readme_line_resolves_to_the_official_evaluation():
    args = main.parse_args(translated(readme_line()))
    assert (args.model, args.eval, args.resume, args.data_path, args.data_set) == \
        ("deit_small_patch16_224", True, "deit_small_patch16_224-cd65a155.pth", "/imagenet", "IMNET")
    assert (args.input_size, args.eval_crop_ratio, args.eval_interpolation) == (224, 0.875, "bicubic")
    assert (args.num_workers, args.seed, args.drop, args.drop_path) == (8, 1, 0.0, 0.0)
    assert int(1.5 * args.batch_size) == 1024  # TEST.BATCH_SIZE: main.py's eval batch is 1.5 x --batch-size
    assert ats._flat_blocks(args.ats_blocks) == list(range(3, 12))
    assert args.ats_num_tokens == [197] * 12 and args.ats_drop_tokens is True and args.ats_report


def test_issue3_overrides_and_the_model_they_build():
    args = main.parse_args(translated(readme_line() + " " + ISSUE3_OVERRIDES))
    assert ats._flat_blocks(args.ats_blocks) == [3]
    assert args.ats_num_tokens == [197, 197, 197, 108] + [197] * 8
    from models.factory import create_model
    model = create_model("deit_tiny_patch16_224", options=args, num_classes=10, img_size=224)
    assert ats.is_patched(model) and model._ats_cfg.caps == {3: 108}  # the official block crashes here


def test_default_layout_is_the_official_masked_one_without_the_config_entry(tmp_path):
    path = tmp_path / "no_drop.yaml"
    path.write_text("\n".join(line for line in open(CFG).read().splitlines() if "DROP_TOKENS" not in line))
    args = main.parse_args(translated(readme_line(cfg=path)))
    assert args.ats_drop_tokens is False  # defaults.py: VIT.DROP_TOKENS False


def test_yaml_reader_reads_what_pyyaml_and_yacs_read():
    yaml = pytest.importorskip("yaml")
    with open(CFG) as f:
        reference = yaml.safe_load(f)

    def decode(node):  # yacs decodes strings that are Python literals
        if isinstance(node, dict):
            return {k: decode(v) for k, v in node.items()}
        if isinstance(node, str):
            try:
                return ast.literal_eval(node)
            except (ValueError, SyntaxError):
                return node
        return node

    ours, _ = ats_config.load_config(CFG)
    for section, values in decode(reference).items():
        if isinstance(values, dict):
            for key, value in values.items():
                assert ours[section][key] == value, (section, key)
        else:
            assert ours[section] == values


def test_yaml_reader_subset(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("TRAIN:\n  ENABLE: false   # comment\n  BATCH_SIZE: 32\nSOLVER:\n  BASE_LR: 1.0e-3\n"
                    "  STEPS:\n    - 10\n    - 20\nTENSORBOARD:\n  CONFUSION_MATRIX:\n    ENABLE: true\n"
                    "OUTPUT_DIR: 'out # dir'\n")
    data = ats_config.read_yaml(str(path))
    assert data == {"TRAIN": {"ENABLE": False, "BATCH_SIZE": 32}, "SOLVER": {"BASE_LR": 1e-3, "STEPS": [10, 20]},
                    "TENSORBOARD": {"CONFUSION_MATRIX": {"ENABLE": True}}, "OUTPUT_DIR": "out # dir"}


def test_training_config_keeps_the_project_recipe_for_unset_solver_keys(tmp_path):
    path = tmp_path / "train.yaml"
    path.write_text("TRAIN:\n  ENABLE: True\n  BATCH_SIZE: 32\n  CHECKPOINT_FILE_PATH: deit.pth\n"
                    "DATA:\n  TEST_CROP_SIZE: 224\n  MEAN: [0.485, 0.456, 0.406]\n  STD: [0.229, 0.224, 0.225]\n"
                    "SOLVER:\n  BASE_LR: 0.0001\n  MAX_EPOCH: 30\n  OPTIMIZING_METHOD: adamw\n"
                    "VIT:\n  DROP_TOKENS: True\n")
    argv = translated(f"--cfg {path} DATA.PATH_TO_DATA_DIR /imagenet SOLVER.WEIGHT_DECAY 0.05 "
                      "--shard_id 0 --num_shards 1 --init_method tcp://localhost:9999")
    args = main.parse_args(argv)
    assert not args.eval and args.finetune == "deit.pth" and args.batch_size == 32
    assert (args.lr, args.epochs, args.opt, args.weight_decay, args.unscale_lr) == (1e-4, 30, "adamw", 0.05, True)
    assert "--min-lr" not in argv and "--warmup-epochs" not in argv and "--momentum" not in argv  # DeiT recipe
    assert "--shard_id" not in argv and "tcp://localhost:9999" not in argv


def test_other_argv_passes_through_and_token_lists_join():
    assert translated("--model deit_small_patch16_224 --eval") == ["--model", "deit_small_patch16_224", "--eval"]
    assert translated("--ats-num-tokens 197 150 --ats-blocks 3 4") == \
        ["--ats-num-tokens", "[197,150]", "--ats-blocks", "3", "4"]
    assert translated("--ats_num_tokens 108 --eval") == ["--ats_num_tokens", "108", "--eval"]


@pytest.mark.parametrize("extra,message", [
    ("VIT.NO_SUCH_KEY 3", "unknown config key VIT.NO_SUCH_KEY"),
    ("NOPE.KEY 3", "unknown config key NOPE.KEY"),
    ("VIT.DROP_TOKENS 3", "expected a bool"),
    ("VIT.EMBED_DIM 256", "EMBED_DIM/NUM_HEADS/DEPTH"),
    ("TEST.DATASET kinetics", "TEST.DATASET 'kinetics'"),
    ("TEST.CHECKPOINT_FILE_PATH ''", "random weights"),
    ("DATA.MEAN [0.5,0.5,0.5]", "DATA.MEAN/STD"),
    ("DATA.TEST_CROP_SIZE 256", "VIT.IMG_SIZE 224 differs"),
    ("TEST.ENABLE False", "nothing to run"),
])
def test_bad_official_configs_are_config_errors(extra, message):
    with pytest.raises(ModelConfigError, match=message.replace("[", r"\[").replace(".", r"\.")):
        translated(readme_line() + " " + extra)


def test_overrides_need_an_official_config():
    with pytest.raises(ModelConfigError, match="need an official ATS config"):
        translated("--cfg configs/deit_small_patch16_224.yaml VIT.DROP_TOKENS True")


# ---------------------------------------------------------------------------
# Bad values of the ATS flags: one line, exit 2
# ---------------------------------------------------------------------------

TINY = ["--model", "deit_tiny_patch16_224", "--model-kwargs",
        "{'depth': 4, 'embed_dim': 32, 'num_heads': 2, 'patch_size': 8}", "--input-size", "32", "--eval",
        "--device", "cpu", "--synthetic-val-size", "2", "--num_workers", "0"]


@pytest.mark.slow
@pytest.mark.parametrize("flags,message", [
    (["--ats-num-tokens", "5"], "every K must be >= 8"),
    (["--ats-num-tokens", "many"], "--ats-num-tokens"),
    (["--ats-blocks", "7"], "out of range for a model with 4 blocks"),
    (["--ats-blocks", "1", "1"], "lists a block twice"),
    (["--ats-blocks", "[1,2]", "--ats-num-tokens", "[17,17]"], "give one value or 4"),
    (["--ats-num-tokens", "auto"], "--ats-num-tokens auto needs --target-gmacs"),
    (["--ats-blocks", "1", "--tome-r", "2"], "cannot be combined"),
])
def test_bad_flags_are_one_line_and_exit_2(flags, message):
    proc = run_main(TINY + flags)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if "ERROR" in line or "error:" in line]
    assert len(errors) == 1 and message in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_bad_official_line_is_one_line_and_exit_2():
    proc = run_main(shlex.split(readme_line()) + ["VIT.NO_SUCH_KEY", "1"])
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and "unknown config key VIT.NO_SUCH_KEY" in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


# ---------------------------------------------------------------------------
# The line runs
# ---------------------------------------------------------------------------

@pytest.mark.slow
def test_readme_line_runs(imagenet_folder, tmp_path):
    """The released DeiT-S checkpoint layout ({'model': state dict}), evaluated with ATS at blocks 3..11."""
    ckpt = tmp_path / "deit_small_patch16_224-cd65a155.pth"
    torch.manual_seed(0)
    torch.save({"model": timm.create_model("deit_small_patch16_224").state_dict()}, ckpt)
    out = tmp_path / "out"
    proc = run_main(shlex.split(readme_line(data=imagenet_folder, ckpt=ckpt)) + ["OUTPUT_DIR", str(out)])
    assert_ok(proc)
    assert "Accuracy of the network on the 4 test images" in proc.stderr
    report = json.loads((out / "ats_report.json").read_text())
    assert report["images"] == 4 and 0 < report["gmacs_per_image"] <= 4.61
    assert len(report["mean_tokens_per_block"]) == 12


@pytest.mark.slow
def test_official_trainer_checkpoint_is_never_silently_random(imagenet_folder, tmp_path):
    """The official tester loads with strict=False and only unwraps 'model': a trainer checkpoint
    ('model_state') evaluated random weights. Here it loads strictly (through the family's filter)
    or stops with one line; it is never evaluated with random weights."""
    torch.manual_seed(0)
    state = timm.create_model("deit_tiny_patch16_224", num_classes=1000, img_size=32, patch_size=8, depth=4,
                              embed_dim=32, num_heads=2).state_dict()
    official = {"epoch": 3, "model_state": dict(state, **{f"blocks.{i}.attn.out_zero_mask": torch.zeros(1, 32)
                                                           for i in (1, 2, 3)})}
    ckpt = tmp_path / "checkpoint_epoch_00003.pyth"
    torch.save(official, ckpt)
    proc = run_main(["--model", "deit_tiny_patch16_224", "--model-kwargs",
                     "{'depth': 4, 'embed_dim': 32, 'num_heads': 2, 'patch_size': 8}", "--input-size", "32",
                     "--data-path", str(imagenet_folder), "--eval", "--resume", str(ckpt), "--ats-blocks", "1", "2",
                     "3", "--device", "cpu", "--num_workers", "0"])
    if proc.returncode == 0:
        assert "resumed model weights" in proc.stderr
    else:
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]


@pytest.mark.slow
def test_eval_report_and_visualisation_commands(tmp_path):
    proc = run_main(TINY + ["--ats-blocks", "1", "2", "3", "--synthetic-val-size", "6", "--batch-size", "2",
                            "--ats-report", "--ats-visualize", "--ats-visualize-images", "2", "--output_dir",
                            str(tmp_path)])
    assert_ok(proc)
    report = json.loads((tmp_path / "ats_report.json").read_text())
    assert report["images"] == 6 and len(report["mean_tokens_per_block"]) == 4
    assert report["gmacs_padded_batches"] >= report["gmacs_per_image"] > 0
    assert sorted(os.listdir(tmp_path / "ats_visualize")) == ["img_0.png", "img_1.png"]


@pytest.mark.slow
def test_target_gmacs_through_main(tmp_path):
    proc = run_main(TINY + ["--ats-blocks", "1", "2", "3", "--ats-num-tokens", "auto", "--target-gmacs", "0.0007",
                            "--output_dir", str(tmp_path)])
    assert_ok(proc)
    assert "--target-gmacs 0.0007: --ats-num-tokens" in proc.stderr
    record = [json.loads(line) for line in (tmp_path / "log.txt").read_text().splitlines()][-1]
    assert record["target_gmacs"]["dest"] == "ats_num_tokens" and 8 <= record["target_gmacs"]["value"] <= 17
