"""Command line: DeiT defaults (recipe check 11.1), lr scaling (11.2), aliases, --cfg YAML,
literal list flags (never eval), and the exit-2 paths that must write nothing."""
import os

import pytest
import torch
import yaml

import main
from utils.errors import UserError

# docs/training.md; data-path / data-set deliberately differ (no site path: SYNTHETIC).
DEIT_DEFAULTS = dict(
    batch_size=64, epochs=300, model="deit_base_patch16_224", input_size=224, bce_loss=False, unscale_lr=False,
    drop=0.0, drop_path=0.1, model_ema=True, model_ema_decay=0.99996, model_ema_force_cpu=False,
    opt="adamw", opt_eps=1e-8, opt_betas=None, clip_grad=None, momentum=0.9, weight_decay=0.05,
    sched="cosine", lr=5e-4, lr_noise=None, lr_noise_pct=0.67, lr_noise_std=1.0, warmup_lr=1e-6, min_lr=1e-5,
    decay_epochs=30, decay_rate=0.1, warmup_epochs=5, cooldown_epochs=10, patience_epochs=10,
    color_jitter=0.3, aa="rand-m9-mstd0.5-inc1", smoothing=0.1, train_interpolation="bicubic",
    repeated_aug=True, train_mode=True, ThreeAugment=False, src=False,
    reprob=0.25, remode="pixel", recount=1, resplit=False,
    mixup=0.8, cutmix=1.0, cutmix_minmax=None, mixup_prob=1.0, mixup_switch_prob=0.5, mixup_mode="batch",
    teacher_model="regnety_160", teacher_path="", distillation_type="none", distillation_alpha=0.5,
    distillation_tau=1.0, cosub=False, attn_only=False, finetune="", resume="",
    inat_category="name", eval_crop_ratio=0.875, num_workers=10, pin_mem=True,
    output_dir="", seed=0, start_epoch=0, eval=False, dist_eval=False, distributed=False,
    world_size=1, dist_url="env://",
)


def test_deit_defaults():
    args = main.parse_args([])
    for key, value in DEIT_DEFAULTS.items():
        assert getattr(args, key) == value, key
    assert args.device == ("cuda" if torch.cuda.is_available() else "cpu")
    assert args.data_path is None and args.data_set == "SYNTHETIC"
    assert main.parse_args(["--data-path", "/x"]).data_set == "IMNET"
    # method flags default to None ("model default")
    for key in ("base_keep_rate", "drop_loc", "fuse_token", "prune_layer", "done_layer", "frozen_stages",
                "tome_r", "compression_ratio"):
        assert getattr(args, key) is None, key
    assert (args.shrink_start_epoch, args.shrink_epochs, args.n_visualization) == (10, 0, 128)
    assert (args.synthetic_train_size, args.synthetic_val_size, args.synthetic_classes) == (5000, 1000, 10)
    assert args.amp == torch.cuda.is_available() and args.accum_iter == 1 and args.sched_step == "epoch" and args.eval_every == 1
    assert args.lambda_decay_epochs == 299 and args.ib_weight == 0.1 and args.ib_input_clusters == "none"


def test_lr_scaling():
    args = main.parse_args(["--batch-size", "256"])
    assert main.scaled_lr(args, world_size=8) == pytest.approx(2e-3)
    args = main.parse_args(["--batch-size", "256", "--unscale-lr"])
    assert main.scaled_lr(args, world_size=8) == pytest.approx(5e-4)
    args = main.parse_args(["--batch-size", "128", "--accum-iter", "2"])
    assert main.scaled_lr(args, world_size=2) == pytest.approx(5e-4)


def test_aliases_and_pairs():
    args = main.parse_args(["DATA", "-b", "32", "-j", "3", "--output", "o", "--no-amp", "--no-pin-mem",
                            "--no-model-ema", "--no-repeated-aug", "--no-train-mode", "--local_rank", "1"])
    assert args.data_path == "DATA" and args.data_set == "IMNET"
    assert (args.batch_size, args.num_workers, args.output_dir) == (32, 3, "o")
    assert not (args.amp or args.pin_mem or args.model_ema or args.repeated_aug or args.train_mode)
    assert main.parse_args(["--workers", "5", "--local-rank=2"]).num_workers == 5


def test_ltm_readme_line_parses():
    line = ("DATA --model ltm_mobilevit_s -b 64 --workers 8 --pin-mem --sched cosine --epochs 300 --min-lr 0.00002 "
            "--lr 0.0002 --warmup-lr 0.0002 --warmup-epochs 5 --opt adamw --weight-decay 0.01 --model-ema "
            "--model-ema-decay 0.9995 --aa rand-m9-mstd0.5 --remode pixel --reprob 0.2 --amp --smoothing 0.1 "
            "--checkpoint-hist 20 --compression-ratio 0.8 --output out")
    args = main.parse_args(line.split())
    assert args.compression_ratio == 0.8 and args.checkpoint_hist == 20 and args.output_dir == "out"
    assert args.model_ema_decay == 0.9995 and args.data_path == "DATA"


def test_evit_and_shrink_lines_parse():
    args = main.parse_args(["--model", "deit_small_patch16_shrink_base", "--fuse_token", "--base_keep_rate", "0.7",
                            "--drop_loc", "(3, 6, 9)", "--shrink_start_epoch", "0", "--shrink_epochs", "100"])
    assert args.drop_loc == (3, 6, 9) and args.fuse_token is True and args.base_keep_rate == 0.7
    args = main.parse_args(["--prune_layer", "[0,2,4,6]", "--done_layer", "[]", "--tome-r", "13"])
    assert args.prune_layer == [0, 2, 4, 6] and args.done_layer == [] and args.tome_r == 13


def test_literal_flags_never_eval(tmp_path):
    marker = tmp_path / "pwned"
    with pytest.raises(UserError, match="--drop_loc"):
        main.parse_args(["--drop_loc", f"__import__('os').system('touch {marker}')"])
    assert not marker.exists()
    with pytest.raises(UserError):
        main.parse_args(["--prune_layer", "[0, 'a']"])
    with pytest.raises(UserError):
        main.parse_args(["--model-kwargs", "[1, 2]"])
    assert main.parse_args(["--model-kwargs", "{'depth': 2}"]).model_kwargs == {"depth": 2}


def test_cfg_yaml_precedence_and_aliases(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"lr": 0.001, "batch-size": 32, "drop_loc": "(1, 2)", "prune_layer": [1, 3],
                                   "workers": 4, "model_ema": False}))
    args = main.parse_args(["--cfg", str(cfg), "--lr", "0.002"])
    assert args.lr == 0.002          # command line wins
    assert args.batch_size == 32     # '-' accepted
    assert args.drop_loc == (1, 2) and args.prune_layer == [1, 3]
    assert args.num_workers == 4 and args.model_ema is False


def test_cfg_unknown_key_names_close_matches(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("learning_rate: 0.1\nwarmup_epoch: 3\n")
    with pytest.raises(UserError) as info:
        main.parse_args(["--cfg", str(cfg)])
    assert "learning_rate" in str(info.value)
    cfg.write_text("warmup_epoch: 3\n")
    with pytest.raises(UserError, match="warmup_epochs"):
        main.parse_args(["--cfg", str(cfg)])
    with pytest.raises(UserError, match="not found"):
        main.parse_args(["--cfg", str(tmp_path / "missing.yaml")])


def test_resolved_options_round_trip_through_cfg(tmp_path):
    args = main.parse_args(["--lr", "0.003", "--drop_loc", "(3, 6)", "--model-kwargs", "{'depth': 1}"])
    path = tmp_path / "args.yaml"
    path.write_text(yaml.safe_dump(main.resolved_options(args)))
    again = main.parse_args(["--cfg", str(path)])
    assert again.lr == 0.003 and again.drop_loc == (3, 6) and again.model_kwargs == {"depth": 1}


@pytest.mark.parametrize("flags, message", [
    (["--use-lmdb"], "LMDB is not supported"),
    (["--cosub"], "not implemented"),
    (["--distillation-type", "hard", "--finetune", "x.pth"], "finetune"),
    (["--batch-size", "3"], "even --batch-size"),
])
def test_unsupported_combinations(flags, message):
    with pytest.raises(UserError, match=message):
        main.parse_args(flags)


def test_unknown_model_exits_2_with_close_matches(tmp_path, caplog):
    out = tmp_path / "out"
    code = main.cli(["--model", "deit_tiny_patch16_2244", "--output_dir", str(out), "--device", "cpu"])
    assert code == 2
    assert "deit_tiny_patch16_224" in caplog.text and "close matches" in caplog.text
    assert not out.exists()


def test_unwritable_output_dir_exits_2_and_writes_nothing(tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("")
    before = sorted(os.listdir(tmp_path))
    code = main.cli(["--model", "deit_tiny_patch16_224", "--output_dir", str(blocker / "out"), "--device", "cpu"])
    assert code == 2
    assert "output dir" in caplog.text
    assert sorted(os.listdir(tmp_path)) == before


def test_bad_command_line_exits_2_and_writes_nothing(tmp_path, caplog):
    assert main.cli(["--epochs", "many", "--output_dir", str(tmp_path / "o")]) == 2
    assert not (tmp_path / "o").exists()
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "--epochs" in errors[0] and "'many'" in errors[0] and "--help" in errors[0]


def test_warmup_prefix_spans_the_decay_over_the_epochs_after_warmup():
    args = main.parse_args(["--cfg", os.path.join(main_dir(), "configs", "raftmlp_s.yaml"), "--epochs", "10"])
    assert args.warmup_prefix and args.warmup_epochs == 5 and args.sched_step == "iter"
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=args.lr)
    scheduler = main.build_scheduler(args, optimizer, updates_per_epoch=4)
    lr_at = lambda update: scheduler._get_lr(update)[0]  # noqa: E731
    assert lr_at(0) == pytest.approx(0.0) and lr_at(5 * 4) == pytest.approx(args.lr)
    assert lr_at(10 * 4) == pytest.approx(args.min_lr)  # the last update of the run reaches min_lr
    assert lr_at(7.5 * 4) == pytest.approx((args.lr + args.min_lr) / 2)  # cosine midpoint of epochs 5..10


def main_dir():
    return os.path.dirname(os.path.abspath(main.__file__))


# --------------------------------------------------------------------------- utils/cli: shared by every script

def test_one_line_parser_spellings_and_close_matches_are_shared():
    from tools import _common
    from utils import cli

    parser = cli.OneLineParser("prog", help_hint="python prog.py")
    parser.add_argument(*cli.spellings("--output_dir", "-o"), dest="output_dir")
    parser.add_argument("--batch-size", type=int)
    cli.add_spelling_aliases(parser)
    assert parser.parse_args(["--output-dir", "a", "--batch_size", "3"]).output_dir == "a"
    with pytest.raises(UserError) as info:
        parser.parse_args(["--batch-size", "x"])
    assert str(info.value).endswith("(see python prog.py --help)") and "\n" not in str(info.value)
    assert cli.spellings("--drop_loc", "-b") == ["--drop_loc", "--drop-loc", "-b"]
    assert cli.close_matches("deit_smal", ["deit_small", "vit_base", "deit_tiny"]) == ["deit_small", "deit_tiny"]
    assert cli.close_matches_text("zzz", ["deit_small"]) == "none"
    # main.py, and the tools through tools/_common.py, use these and no copies of their own
    assert issubclass(_common.ToolParser, cli.OneLineParser) and _common.spellings is cli.spellings
    assert isinstance(main.get_args_parser(), cli.OneLineParser)
