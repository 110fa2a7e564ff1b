"""The one table of bad input: every case is the real command (`python main.py ...` or a tool) in a
subprocess and must end with exit status 2, exactly one error line on stderr naming the option
(or YAML key) and what is wrong, no traceback, and no file written anywhere: no output directory,
nothing in the working directory, nothing beside the inputs. Cases run a few at a time."""
import os
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest
import timm
import torch
import yaml

from .helpers import MAIN, PYTHON, TINY_FLAGS, files_under, subprocess_env

TINY_EVIT = ["--model", "deit_tiny_patch16_shrink_base", "--model-kwargs", "{'depth': 2, 'embed_dim': 32, 'num_heads': 2}",
             "--input-size", "32"]
TINY_KWARGS = dict(depth=2, embed_dim=32, num_heads=2, patch_size=8, img_size=32)
EVIT_TOOL = ["-m", "tools.evit_tools", "speed", "--model", "deit_small_patch16_shrink_base"]
ENTROPY_TOOL = ["-m", "tools.attention_entropy", "--random-data", "2"]

# name -> (arguments, words the error line must contain[, the command: main.py unless a tool's argv])
# {assets}: inputs shared by the cases (files, data, checkpoints); {tmp}: the case's own folder.
CASES = {
    # Numbers out of range, reported as typed (issue 18, item 7).
    "negative lr": (["--lr", "-1"], ["--lr must be >= 0, got -1"]),
    "drop path 1.5": (["--drop-path", "1.5"], ["--drop-path must be in [0, 1), got 1.5"]),
    "device 3": (["--device", "3"], ["--device 3 is not a device"]),
    "warm-up prefix longer than the run": (["--warmup-prefix", "--warmup-epochs", "5", "--epochs", "3"],
                                           ["--epochs must be larger (got 3)"]),
    "batch size 0": (["--batch-size", "0"], ["--batch-size must be >= 1, got 0"]),
    "smoothing 1": (["--smoothing", "1"], ["--smoothing must be in [0, 1), got 1"]),
    "EMA decay 2": (["--model-ema-decay", "2"], ["--model-ema-decay must be in [0, 1], got 2"]),
    "four lr values": (["--lr", "1e-3", "1e-3", "1e-3", "1e-3"], ["--lr takes 1 to 3 values, got 4"]),
    "one synthetic class": (["--synthetic-classes", "1"], ["--synthetic-classes must be in [2, 12], got 1"]),
    "odd batch with mixup": (["--batch-size", "15", "--mixup", "0.8"], ["even --batch-size", "15"]),
    "unknown flag": (["--lrr", "0.1"], ["unrecognized arguments: --lrr", "--help"]),
    "not a number": (["--epochs", "many"], ["--epochs", "'many'"]),
    "CUDA device on a CPU machine": (["--device", "cuda"], ["--device cuda", "CUDA is not available"]),
    # Models and input sizes (item 4).
    "unknown model": (["--model", "deit_tinyy_patch16_224"], ["unknown --model 'deit_tinyy_patch16_224'",
                                                               "deit_tiny_patch16_224"]),
    "keep rate 1.5": (TINY_EVIT + ["--base_keep_rate", "1.5", "--drop_loc", "(1,)"], ["base_keep_rate", "1.5"]),
    "layer index 12 of 12 blocks": (["--model", "deit_small_patch16_shrink_base", "--model-kwargs", "{}",
                                     "--drop_loc", "(3, 6, 12)"], ["drop_loc", "12", "0..11"]),
    "input size 33 for 8-pixel patches": (["--input-size", "33"], ["--input-size 33", "patch_embed.proj",
                                                                   "--input-size 32 or 40"]),
    # Data (items 3 and 9).
    "one-class training set": (["--data-path", "{assets}/one_class", "--data-set", "IMAGEFOLDER"],
                               ["--data-path", "1 class", "at least 2"]),
    "a file as --data-path": (["--data-path", "{assets}/a_file", "--data-set", "IMAGEFOLDER"],
                              ["{assets}/a_file", "is a file, not a folder"]),
    # YAML (item 5).
    "unknown YAML key": (["--cfg", "{assets}/recipe.yaml"], ["unknown key 'lerning_rate'", "recipe.yaml", "close matches"]),
    "YAML switch given as a string": (["--cfg", "{assets}/switch.yaml"],
                                      ["switch.yaml", "'model_ema'", "true or false", "'false'"]),
    # Checkpoints (items 2 and 9).
    "resume of another model": (["--model", "vit_tiny_patch16_224", "--resume", "{assets}/deit_tiny.pth"],
                                ["--resume", "--model deit_tiny_patch16_224 vs vit_tiny_patch16_224", "--finetune"]),
    "truncated checkpoint": (["--resume", "{assets}/truncated.pth"],
                             ["--resume", "truncated", "(PytorchStreamReader failed reading zip archive: failed finding "
                                                       "central directory)", "intact copy"]),
    "finetune from another architecture": (["--finetune", "{assets}/wide.pth"],
                                           ["--finetune", "keys with other shapes", "--finetune-partial"]),
    # Output folders (items 8 and 9).
    "output dir under a file": (["--output_dir", "{assets}/a_file/out"], ["a_file", "not a directory", "--output_dir"]),
    "output dir that cannot be created": (["--output_dir", "/proc/deit_reliability_out"],
                                          ["/proc/deit_reliability_out", "--output_dir"]),
    "tool output dir under a file": (["--output_dir", "{assets}/a_file/x"], ["--output_dir", "a_file", "is a file"],
                                     EVIT_TOOL),
    "tool output file under a file": (["--plot", "{assets}/a_file/x.png"],
                                      ["--plot", "{assets}/a_file", "is a file, not a folder"], ENTROPY_TOOL),
}


def _make_assets(folder):
    (folder / "a_file").write_text("a file, not a folder")
    (folder / "recipe.yaml").write_text(yaml.safe_dump({"epochs": 1, "lerning_rate": 0.1}))
    (folder / "switch.yaml").write_text('model_ema: "false"\n')
    from PIL import Image
    for split in ("train", "val"):
        (folder / "one_class" / split / "cat").mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (40, 40), (60 * i, 0, 0)).save(folder / "one_class" / split / "cat" / f"{i}.png")
    model = timm.create_model("deit_tiny_patch16_224", num_classes=10, **TINY_KWARGS)
    saved = {"model": model.state_dict(), "optimizer": None, "lr_scheduler": None, "epoch": 0,
             "args": {"model": "deit_tiny_patch16_224", "model_kwargs": {k: v for k, v in TINY_KWARGS.items()
                                                                         if k != "img_size"}}}
    torch.save(saved, folder / "deit_tiny.pth")
    (folder / "truncated.pth").write_bytes((folder / "deit_tiny.pth").read_bytes()[:1000])
    wide = timm.create_model("deit_tiny_patch16_224", num_classes=10, **dict(TINY_KWARGS, embed_dim=64))
    torch.save({"model": wide.state_dict()}, folder / "wide.pth")


def _command(name, assets, tmp):
    args, _, *tool = CASES[name]
    args = [a.replace("{assets}", str(assets)).replace("{tmp}", str(tmp)) for a in args]
    if tool:
        return [PYTHON] + tool[0] + args
    base = TINY_FLAGS + ["--synthetic-train-size", "64"]
    if "--output_dir" not in args:
        base += ["--output_dir", str(tmp / "out")]
    return [PYTHON, MAIN] + base + args


@pytest.fixture(scope="module")
def finished_cases(tmp_path_factory):
    """Run every case (three at a time); name -> (status, stderr, what changed on disk)."""
    assets = tmp_path_factory.mktemp("assets")
    _make_assets(assets)
    assets_before = files_under(assets)

    def run(name):
        tmp = tmp_path_factory.mktemp(name.replace(" ", "_").replace("-", "").replace(".", ""))
        cwd = tmp / "cwd"
        cwd.mkdir()
        before = files_under(tmp)
        proc = subprocess.run(_command(name, assets, tmp), cwd=cwd, env=subprocess_env(), capture_output=True,
                              text=True, timeout=300)
        return name, (proc.returncode, proc.stderr, files_under(tmp) != before)

    with ThreadPoolExecutor(max_workers=3) as pool:
        results = dict(pool.map(run, CASES))
    return results, assets, files_under(assets) != assets_before


def _error_messages(stderr: str) -> list:
    """main.py logs '[time name r0] ERROR message', the tools 'ERROR tool: message'."""
    messages = []
    for line in stderr.splitlines():
        if " ERROR " in line:
            messages.append(line.split(" ERROR ", 1)[1])
        elif line.startswith("ERROR "):
            messages.append(line.split(": ", 1)[1] if ": " in line else line[len("ERROR "):])
    return messages


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_line_exit_2_nothing_written(finished_cases, name):
    if name == "CUDA device on a CPU machine" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    results, assets, assets_changed = finished_cases
    returncode, stderr, wrote = results[name]
    assert returncode == 2, stderr[-3000:]
    errors = _error_messages(stderr)
    assert len(errors) == 1, errors
    for word in CASES[name][1]:
        assert word.replace("{assets}", str(assets)) in errors[0], (word, errors[0])
    assert "Traceback" not in stderr
    assert not wrote and not assets_changed  # no output dir, nothing in the working directory or beside the inputs
    assert not os.path.exists("/proc/deit_reliability_out")


def test_every_numeric_option_of_the_trainer_is_range_checked():
    """One table (arguments.RANGES) holds the range of every int/float option main.py declares itself
    (method flags are checked by their family)."""
    import arguments
    parser = arguments.get_args_parser()
    own = [group for group in parser._action_groups if "[" not in (group.title or "")]
    numeric = {action.dest for group in own for action in group._group_actions if action.type in (int, float)}
    assert numeric and numeric - set(arguments.NOT_RANGE_CHECKED) <= set(arguments.RANGES)
    assert set(arguments.RANGES) <= numeric

