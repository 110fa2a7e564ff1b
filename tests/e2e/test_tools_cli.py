"""The tools' command lines: main.py's flag names, both spellings, help and defaults, and bad
input as one error line with exit status 2 (unknown model, files that are not checkpoints,
an output path that cannot be written), and model settings read from the checkpoint."""
import argparse
import logging
import subprocess
import sys

import pytest
import timm
import torch

import models  # noqa: F401
from tools import attention_entropy, evit_tools, ltm_visualize, shrink_convert, tome_visualize
from utils.checkpoint import save_checkpoint

ROOT = __file__.rsplit("/tests/", 1)[0]
PARSERS = {
    "tome_visualize": tome_visualize.build_parser,
    "ltm_visualize": ltm_visualize.build_parser,
    "evit_tools": evit_tools.build_parser,
    "attention_entropy": attention_entropy.get_args_parser,
    "shrink_convert": shrink_convert.get_args_parser,
}
MODEL_TOOLS = ("tome_visualize", "ltm_visualize", "evit_tools", "attention_entropy")
TINY_VIT = {"depth": 2, "embed_dim": 32, "num_heads": 2}


def _options(parser):
    return [a for a in parser._actions if a.option_strings and not isinstance(a, argparse._HelpAction)]


@pytest.mark.parametrize("tool", list(PARSERS))
def test_every_option_has_help_a_shown_default_and_both_spellings(tool):
    parser = PARSERS[tool]()
    formatter = parser._get_formatter()
    for action in _options(parser):
        assert action.help, action.option_strings
        assert "default" in formatter._get_help_string(action).lower(), action.option_strings
        for name in action.option_strings:
            if name.startswith("--"):
                other = "--" + (name[2:].replace("-", "_") if "-" in name[2:] else name[2:].replace("_", "-"))
                assert other in action.option_strings, (name, action.option_strings)
    assert "default" in parser.format_help()


@pytest.mark.parametrize("tool", MODEL_TOOLS)
def test_main_py_flag_names_with_the_old_tool_spellings_as_aliases(tool):
    parser = PARSERS[tool]()
    argv = ["speed"] if tool == "evit_tools" else []
    new = parser.parse_args(argv + ["--input-size", "32", "--resume", "a.pth", "--model-kwargs", "{'depth': 2}"])
    old = parser.parse_args(argv + ["--img-size", "32", "--checkpoint", "a.pth", "--model_kwargs", "{'depth': 2}"])
    assert vars(new) == vars(old)
    assert (new.input_size, new.checkpoint, new.model_kwargs) == (32, "a.pth", {"depth": 2})
    assert parser.parse_args(argv + ["--finetune", "b.pth"]).checkpoint == "b.pth"


def test_evit_drop_loc_takes_main_py_and_old_tool_forms():
    parser = evit_tools.build_parser()
    assert parser.parse_args(["speed", "--drop_loc", "(3, 6, 9)"]).drop_loc == (3, 6, 9)
    assert parser.parse_args(["speed", "--drop-loc", "3", "6", "9"]).drop_loc == (3, 6, 9)
    assert parser.parse_args(["speed", "--drop_loc", "(3,", "6,", "9)"]).drop_loc == (3, 6, 9)


def _one_error(caplog, code):
    assert code == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, errors
    assert "\n" not in errors[0]
    return errors[0]


@pytest.mark.parametrize("tool, argv, wanted", [
    ("tome_visualize", ["--model", "deit_tiny_patch16_22", "--out", "{tmp}/o.png"], "deit_tiny_patch16_224"),
    ("ltm_visualize", ["--model", "ltm_mobilevit_xx", "--out", "{tmp}/o.png"], "ltm_mobilevit_xs"),
    ("ltm_visualize", ["--model", "deit_tiny_patch16_224", "--out", "{tmp}/o.png"], "not supported by this tool"),
    ("evit_tools", ["speed", "--model", "deit_small_patch16_shrink_bas"], "deit_small_patch16_shrink_base"),
    ("attention_entropy", ["--model", "deit_smal_patch16_224", "--random-data", "2"], "deit_small_patch16_224"),
])
def test_unknown_model_lists_close_matches(tool, argv, wanted, caplog, tmp_path):
    main = getattr(sys.modules[f"tools.{tool}"], "main")
    with caplog.at_level(logging.ERROR):
        message = _one_error(caplog, main([a.replace("{tmp}", str(tmp_path)) for a in argv]))
    assert wanted in message and argv[argv.index("--model") + 1] in message


@pytest.fixture
def not_checkpoints(tmp_path):
    text = tmp_path / "notes.pth"
    text.write_text("accuracy 71.3 after 300 epochs\n")
    json_file = tmp_path / "metrics.json"
    json_file.write_text('{"model": "deit_small_patch16_224", "acc1": 79.8}')
    return [text, json_file]


@pytest.mark.parametrize("tool", list(PARSERS))
def test_a_text_or_json_file_as_checkpoint_is_one_line(tool, not_checkpoints, caplog, tmp_path):
    for path in not_checkpoints:
        argv = {"tome_visualize": ["--checkpoint", str(path), "--out", str(tmp_path / "o.png")],
                "ltm_visualize": ["--checkpoint", str(path), "--out", str(tmp_path / "o.png")],
                "evit_tools": ["speed", "--checkpoint", str(path)],
                "attention_entropy": ["--checkpoint", str(path), "--random-data", "2"],
                "shrink_convert": ["--input", str(path), "--output", str(tmp_path / "s.pth"),
                                   "--model", "deit_tiny_patch16_224_shrink"]}[tool]
        main = getattr(sys.modules[f"tools.{tool}"], "main")
        caplog.clear()
        with caplog.at_level(logging.ERROR):
            message = _one_error(caplog, main(argv))
        assert str(path) in message and "not a PyTorch checkpoint" in message
        assert "weights_only" not in message


def test_attention_entropy_bad_plot_path_fails_before_the_analysis(monkeypatch, caplog):
    def no_analysis(args):
        raise AssertionError("the model was built before the --plot path was checked")

    monkeypatch.setattr(attention_entropy, "build_analysis_model", no_analysis)
    with caplog.at_level(logging.ERROR):
        message = _one_error(caplog, attention_entropy.main(["--plot", "/missing/dir/x.png", "--random-data", "2"]))
    assert "--plot /missing/dir/x.png" in message and "/missing/dir" in message and "does not exist" in message


def _main_py_checkpoint(path, name, model, **saved):
    """A checkpoint as main.py writes it: weights plus its args as a dict."""
    args = {"model": name, "input_size": 32, "model_kwargs": dict(TINY_VIT), **saved}
    save_checkpoint({"model": model.state_dict(), "args": args, "epoch": 0}, str(path))


def test_tools_read_num_classes_and_model_kwargs_from_the_checkpoint(tmp_path, capsys):
    name = "deit_tiny_patch16_shrink_base"
    model = timm.create_model(name, img_size=32, num_classes=7, base_keep_rate=0.5, drop_loc=(1,), **TINY_VIT)
    checkpoint = tmp_path / "checkpoint.pth"
    _main_py_checkpoint(checkpoint, name, model, base_keep_rate=0.5, drop_loc=(1,), fuse_token=None)
    out = tmp_path / "vis"
    assert evit_tools.main(["visualize", "--resume", str(checkpoint), "--n_visualization", "2",
                            "--output_dir", str(out), "--device", "cpu"]) == 0
    assert len(list((out / "visualize_mask").glob("img_*.png"))) == 2
    loaded = evit_tools._build_model(evit_tools.build_parser().parse_args(["speed", "--resume", str(checkpoint)]))
    assert loaded.head.out_features == 7 and len(loaded.blocks) == 2 and loaded.patch_embed.img_size == (32, 32)
    torch.testing.assert_close(loaded.state_dict()["head.weight"], model.state_dict()["head.weight"])

    plain = timm.create_model("deit_tiny_patch16_224", img_size=32, num_classes=5, **TINY_VIT)
    _main_py_checkpoint(tmp_path / "deit.pth", "deit_tiny_patch16_224", plain)
    assert tome_visualize.main(["--resume", str(tmp_path / "deit.pth"), "--tome-r", "2",
                                "--out", str(tmp_path / "groups.png")]) == 0
    assert (tmp_path / "groups.png").stat().st_size > 0


def _tiny_lambda_checkpoint(path, depth, saved_kwargs=None):
    name = "deit_tiny_patch16_224_copy_lambda"
    torch.manual_seed(0)
    model = timm.create_model(name, prune_layer=[0, 1], done_layer=[], img_size=32, num_classes=10, depth=depth)
    model.set_lambda(0.0)
    state = {"model": model.state_dict(), "epoch": 399,
             "method_state": {"lambda": 0.0, "prune_layer": [0, 1], "done_layer": []}}
    if saved_kwargs is not None:
        state["args"] = {"model": name, "model_kwargs": saved_kwargs}
    save_checkpoint(state, str(path))


def test_shrink_convert_takes_model_kwargs_from_the_flag_or_the_checkpoint(tmp_path, caplog):
    source = tmp_path / "lambda.pth"
    _tiny_lambda_checkpoint(source, depth=4)
    base = ["--input", str(source), "--output", str(tmp_path / "shrink.pth"), "--model", "deit_tiny_patch16_224_shrink"]
    with caplog.at_level(logging.ERROR):
        message = _one_error(caplog, shrink_convert.main(base))  # a 12-block model does not fit 4 blocks
    assert "does not fit" in message
    assert shrink_convert.main(base + ["--model-kwargs", "{'depth': 4}"]) == 0
    assert len({k.split(".")[1] for k in torch.load(tmp_path / "shrink.pth", weights_only=True)["model"]
                if k.startswith("blocks.")}) == 4
    _tiny_lambda_checkpoint(source, depth=4, saved_kwargs={"depth": 4})
    assert shrink_convert.main(base) == 0


@pytest.mark.slow
def test_unknown_model_from_the_shell_is_one_line_without_traceback():
    proc = subprocess.run([sys.executable, "-m", "tools.tome_visualize", "--model", "deit_tiny_patch16_22"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and "deit_tiny_patch16_224" in errors[0]


def test_tools_take_plugin_and_check_the_picture_name_first(tmp_path):
    """`--plugin` as main.py's (the toy family's model is built by a tool in a fresh process); an
    --out the image writer cannot write is one line before any work, not a traceback at the end."""
    import os
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "tests"), OMP_NUM_THREADS="1")

    def tool(*argv):
        return subprocess.run([sys.executable, "-m", "tools.tome_visualize", *argv], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=300)

    out = tmp_path / "groups.png"
    proc = tool("--plugin", "toy_family", "--model", "toy_vit", "--out", str(out))
    assert proc.returncode == 0 and out.exists(), proc.stderr[-2000:]
    for argv, wanted in ((["--plugin", "no_such_module"], "--plugin no_such_module: no such module"),
                         (["--out", str(tmp_path / "groups")], "is not an image format")):
        bad = tool(*argv)
        assert bad.returncode == 2 and wanted in bad.stderr and "Traceback" not in bad.stderr, bad.stderr[-2000:]
