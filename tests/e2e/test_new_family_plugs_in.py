"""A new in-tree method family is one new file under models/ and nothing else.

A temporary copy of the tree gets `models/throwaway.py` (a model family with a flag, hooks and an
Example); with no other edit, main.py trains it with its flag and logs its state, benchmark.py
counts it, and the parametrized tests (model contract, compile, every-model coverage) pick its
Example up.
"""
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from e2e_utils import ROOT

THROWAWAY = textwrap.dedent('''
    """A throwaway family: a ViT whose logits are scaled by a flag, with a hook that logs the scale."""
    from timm.models import build_model_with_cfg, register_model
    from timm.models.vision_transformer import VisionTransformer

    from . import family
    from .errors import ModelConfigError
    from .hooks import MethodHooks


    class ThrowawayViT(VisionTransformer):
        def __init__(self, *args, logit_scale: float = 1.0, **kwargs):
            if logit_scale <= 0:
                raise ModelConfigError(f"logit_scale must be > 0, got {logit_scale}; pass --throwaway-scale > 0")
            super().__init__(*args, **kwargs)
            self.logit_scale = float(logit_scale)

        def forward_head(self, x, pre_logits: bool = False):
            out = super().forward_head(x, pre_logits=pre_logits)
            return out if pre_logits else out * self.logit_scale


    @register_model
    def throwaway_vit(pretrained: bool = False, **kwargs) -> ThrowawayViT:
        model_args = dict(patch_size=8, embed_dim=32, depth=2, num_heads=2, img_size=32)
        return build_model_with_cfg(ThrowawayViT, "throwaway_vit", pretrained, **dict(model_args, **kwargs))


    class ScaleHooks(MethodHooks):
        def log_state(self, model):
            return {"throwaway_scale": model.logit_scale}


    FAMILY = family.register_family(family.MethodFamily(
        name="throwaway", title="throwaway family (tests/e2e/test_new_family_plugs_in.py)",
        owns=family.models_of(__name__),
        flags=(family.Flag("--throwaway-scale", type=float, kwarg="logit_scale", help="logit scale"),),
        hooks=ScaleHooks,
        examples=(family.Example("throwaway", model="throwaway_vit", flags=("--throwaway-scale", "2.0"),
                                 invalid=dict(logit_scale=-1.0)),),
    ))
''')

IGNORED = shutil.ignore_patterns(".git", ".venv", "__pycache__", "*.png", "*.jsonl", "docs")


@pytest.mark.slow
def test_a_new_family_file_is_picked_up_everywhere(tmp_path):
    tree = tmp_path / "tree"
    shutil.copytree(ROOT, tree, ignore=IGNORED)
    (tree / "models" / "throwaway.py").write_text(THROWAWAY)
    env = dict(os.environ, OMP_NUM_THREADS="1")

    def run(*argv, timeout=600):
        proc = subprocess.run([sys.executable, *argv], cwd=tree, env=env, capture_output=True, text=True,
                              timeout=timeout)
        assert proc.returncode == 0, f"{argv}: exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        return proc

    out = tmp_path / "run"
    run("main.py", "--model", "throwaway_vit", "--throwaway-scale", "2.0", "--input-size", "32",
        "--data-set", "SYNTHETIC", "--synthetic-train-size", "16", "--synthetic-val-size", "8", "--device", "cpu",
        "--batch-size", "8", "--num_workers", "0", "--epochs", "1", "--print-freq", "0", "--no-model-ema",
        "--output_dir", str(out))
    record = json.loads((out / "log.txt").read_text().splitlines()[-1])
    assert record["train_throwaway_scale"] == 2.0

    flops = tmp_path / "flops.jsonl"
    run("benchmark.py", "--model", "throwaway_vit", "--throwaway-scale", "3", "--flops-only", "--img-size", "32",
        "--output", str(flops))
    assert json.loads(flops.read_text())["gmacs"] > 0

    proc = run("-m", "pytest", "-q", "-p", "no:xdist", "-k", "throwaway", "tests/unit/test_model_contract.py",
               "tests/unit/test_compile.py", "tests/e2e/test_train_every_model.py")
    summary = proc.stdout.strip().splitlines()[-1]
    # hooks, intermediates, invalid value; compile in eval and in training; one epoch through main.py
    assert summary.startswith("6 passed"), proc.stdout[-2000:]
