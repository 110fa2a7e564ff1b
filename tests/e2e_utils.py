"""Helpers for the end-to-end tests: run main.py in a subprocess with a tiny, fast setup, and
run an official launch line against a tiny ImageNet folder, official-layout files and DeiT's
evaluation written out independently."""
import argparse
import json
import os
import subprocess
import sys

import numpy as np
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON = sys.executable

# A 1-block ViT with 32-dim tokens on 32 px synthetic shapes: a few seconds per run.
TINY_MODEL = ["--model", "deit_tiny_patch16_224",
              "--model-kwargs", "{'depth': 1, 'embed_dim': 32, 'num_heads': 2, 'patch_size': 8}",
              "--input-size", "32"]
TINY_RUN = TINY_MODEL + [
    "--data-set", "SYNTHETIC", "--synthetic-train-size", "256", "--synthetic-val-size", "64",
    "--device", "cpu", "--batch-size", "32", "--num_workers", "0", "--print-freq", "0",
    "--mixup", "0", "--cutmix", "0", "--aa", "none", "--reprob", "0", "--drop-path", "0",
    "--lr", "2e-3", "--unscale-lr", "--warmup-epochs", "0", "--min-lr", "1e-4",
]


def run_main(args, env_extra=None, script="main.py", timeout=300, launcher=None):
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(env_extra or {})
    cmd = (launcher or [PYTHON]) + [os.path.join(ROOT, script)] + [str(a) for a in args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def assert_ok(proc):
    assert proc.returncode == 0, f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout[-3000:]}\nSTDERR:\n{proc.stderr[-6000:]}"


def read_log(output_dir):
    with open(os.path.join(output_dir, "log.txt")) as f:
        return [json.loads(line) for line in f]


def load_ckpt(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def state_dicts_equal(a, b, exact=True, atol=0.0):
    if a.keys() != b.keys():
        return False
    for key in a:
        x, y = a[key], b[key]
        if isinstance(x, torch.Tensor):
            if exact and not torch.equal(x, y):
                return False
            if not exact and not torch.allclose(x.float(), y.float(), atol=atol, rtol=0):
                return False
    return True


# ---------------------------------------------------------------------------
# Official launch lines
# ---------------------------------------------------------------------------

IMAGENET_CLASSES = ("n01440764", "n01443537")


def write_imagenet_folder(root, splits=("train", "val"), unique_names=False):
    """ImageNet layout under `root` (a pathlib.Path): `<split>/<wnid>/<i>.JPEG`, 2 classes x 2 random
    96x72 pictures per split (seed 0); returns root. `unique_names`: `<wnid>_<i>.JPEG`, unique across
    classes as ImageNet's are (for outputs keyed by file name)."""
    rng = np.random.default_rng(0)
    for split in splits:
        for cls in IMAGENET_CLASSES:
            (root / split / cls).mkdir(parents=True)
            for i in range(2):
                name = f"{cls}_{i}.JPEG" if unique_names else f"{i}.JPEG"
                Image.fromarray(rng.integers(0, 255, (72, 96, 3), dtype=np.uint8)).save(root / split / cls / name)
    return root


def spread_logits(model: torch.nn.Module) -> torch.nn.Module:
    """`model` with its classifier scaled x20, so the accuracy and loss of random weights are not trivial."""
    with torch.no_grad():
        model.head.weight.mul_(20)
    return model


def save_official_checkpoint(path, model: torch.nn.Module, args: dict, **entries):
    """A checkpoint in the official (DeiT-style) layout: `{'model': state dict, **entries,
    'args': argparse.Namespace(**args)}`; returns path."""
    torch.save({"model": model.state_dict(), **entries, "args": argparse.Namespace(**args)}, path)
    return path


def fake_pretrained_cache(root, model: torch.nn.Module, hub_id: str) -> dict:
    """A local Hugging Face hub cache holding `model`'s weights as `hub_id`; the environment to use it offline."""
    from safetensors.torch import save_file
    repo = root / ("models--" + hub_id.replace("/", "--"))
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(repo / "snapshots" / commit / "model.safetensors"))
    return {"HF_HUB_CACHE": str(root), "HF_HUB_OFFLINE": "1"}


def pretrained_deit_small(hub_root):
    """(weights, env): random DeiT-S weights (seed 0, logits spread) that `--pretrained` reads offline, with
    `env`, as timm's `deit_small_patch16_224.fb_in1k`; for official launch lines that always start from it."""
    import timm
    torch.manual_seed(0)
    weights = spread_logits(timm.create_model("deit_small_patch16_224"))
    return weights, fake_pretrained_cache(hub_root, weights, "timm/deit_small_patch16_224.fb_in1k")


def deit_eval_data(folder):
    """The `val/` images of an ImageNet-layout folder through DeiT's evaluation transform
    (resize 256 bicubic, centre crop 224, ImageNet mean / std)."""
    from torchvision import datasets as tv_datasets, transforms
    transform = transforms.Compose([
        transforms.Resize(int(224 / 0.875), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(224), transforms.ToTensor(),
        transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    return tv_datasets.ImageFolder(str(folder / "val"), transform=transform)


def reference_eval(model: torch.nn.Module, folder, batch_size=None):
    """The official evaluation written out independently: DeiT's eval transform, sequential batches
    (default: one batch of every image), fp32 (DeiT's CUDA autocast does nothing on CPU), DeiT's meters:
    the printed loss is the mean of per-batch mean losses, Acc@1/Acc@5 are weighted by batch size.
    Returns (acc1, acc5, loss, images)."""
    data = deit_eval_data(folder)
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size or len(data), shuffle=False)
    model.eval()
    losses, correct1, correct5, count = [], 0, 0, 0
    with torch.no_grad():
        for images, target in loader:
            output = model(images)
            losses.append(torch.nn.functional.cross_entropy(output, target).item())
            top5 = output.topk(5, dim=1).indices
            correct1 += (top5[:, 0] == target).sum().item()
            correct5 += (top5 == target[:, None]).any(1).sum().item()
            count += images.shape[0]
    return 100 * correct1 / count, 100 * correct5 / count, sum(losses) / len(losses), count


def assert_printed_eval(stderr: str, acc1: float, acc5: float, loss: float, count: int, decimals: int = 1):
    """main.py printed these evaluation numbers (DeiT's two lines; lambda_vit's summary has 2 decimals)."""
    assert f"* Acc@1 {acc1:.3f} Acc@5 {acc5:.3f} loss {loss:.3f} ({count} images)" in stderr, stderr[-3000:]
    assert f"Accuracy of the network on the {count} test images: {acc1:.{decimals}f}%" in stderr, stderr[-3000:]
