"""Data-loading throughput of the training input pipeline: is a run data-bound?

    python benchmark.py --data-loading /imagenet --workers 1 2 8 --recipe="--cfg configs/deit_small_patch16_224.yaml"

The pipeline measured is the one `main.py` trains with, built by the same code: the
recipe is parsed by `main.parse_args` (so `--cfg`, `--defaults timm`, a family's recipe,
`--input-size`, `--aa`, `--reprob`, `--ThreeAugment`, `--train-crop`, `--batch-size` ...
mean what they mean in training), the transform is `datasets.build_transform(True, args)`,
an ImageFolder root (`DIR/train/<class>/...`) is opened by `datasets.build_dataset(True,
args)`, samples are seeded per sample through `samplers.PerSampleSeeded` and batched by
`datasets.collate_skipping` with main.py's worker init and pin-memory rule. A folder without
`train/` is read as a flat set of image files (any depth) through the same loader and
transform; labels do not matter for speed.

Three measurements, each with untimed warm-up and `rounds` timed rounds, reported as the
median and spread over rounds (`measure.summarize`), one JSON record each:

* `decode`: open and fully decode to RGB (`datasets.pil_rgb_loader`), one process;
* `transform`: decode + the recipe's augmentation, one process with one torch thread and
  no DataLoader: what one DataLoader worker can deliver at best;
* `loader`: a DataLoader with N workers (0 = in the main process), collate included; the
  warm-up covers worker start-up and the first prefetch wave (`first_batch_s` is the
  time to the first batch, start-up included).

Not included: mixup/cutmix and the host-to-device copy, which run in the training process.
A run is data-bound when the model's training throughput (`benchmark.py --mode train`)
exceeds the loader's images/s with the workers it has.
"""
from __future__ import annotations

import argparse
import datetime
import logging
import math
import os
import shlex
import statistics
import sys
import time
from typing import Callable, Sequence

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from utils.measure import environment_info, summarize
import datasets
from arguments import parse_args as parse_trainer_args
from samplers import PerSampleSeeded, SampleKey, mix_seed
from utils import distributed as dist_utils
from utils.errors import UserError

_logger = logging.getLogger("data_bench")

RECORD_VERSION = 1
# Recipe settings that shape the training transform or the loader (named in every record).
RECIPE_KEYS = ("model", "cfg", "defaults", "input_size", "batch_size", "aa", "color_jitter", "reprob", "remode",
               "recount", "train_interpolation", "train_crop", "ThreeAugment", "src", "eval_crop_ratio",
               "pin_mem", "seed", "device")
# The data sets whose training split is an image folder (anything else is not a folder of images).
FOLDER_DATA_SETS = ("SYNTHETIC", "IMNET", "IMAGEFOLDER")
# DataLoader's default: batches each worker has in flight, drained by the warm-up.
PREFETCH_FACTOR = 2


# ---------------------------------------------------------------- the data and the recipe

class ImageFiles(datasets.TolerantLoadingMixin, Dataset):
    """Every image file under a folder (label 0), loaded and skipped like main.py's image folders."""

    def __init__(self, root: str, paths: Sequence[str], transform=None):
        self.root = root
        self.samples = [(path, 0) for path in paths]
        self.loader = datasets.pil_rgb_loader
        self.transform = transform
        self.target_transform = None
        self.strict = False

    def __len__(self) -> int:
        return len(self.samples)


def image_files(root: str) -> list[str]:
    """Image files (by extension, non-empty) under `root`, at any depth, sorted."""
    paths = []
    for dirpath, dirnames, fnames in os.walk(root, followlinks=True):
        dirnames.sort()
        for fname in sorted(fnames):
            path = os.path.join(dirpath, fname)
            if fname.lower().endswith(datasets.IMG_EXTENSIONS) and os.path.getsize(path) > 0:
                paths.append(path)
    return paths


def parse_recipe(recipe: str | Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    """main.py's arguments for a recipe ("--cfg x.yaml --input-size 224", or a token list)."""
    tokens = shlex.split(recipe) if isinstance(recipe, str) else [str(t) for t in recipe]
    try:
        args = parse_trainer_args(tokens)
    except SystemExit:  # --help inside the recipe
        raise UserError("--recipe takes main.py training flags, not --help; see python main.py --help") from None
    if args.data_path:
        raise UserError(f"--recipe names a data path ({args.data_path}); the images come from --data-loading DIR: "
                        "drop it from the recipe")
    if args.data_set not in FOLDER_DATA_SETS:
        raise UserError(f"--recipe sets --data-set {args.data_set}, which is not a folder of images; "
                        "--data-loading reads image files: drop --data-set from the recipe")
    return args, tokens


def open_folder(data_dir: str, args: argparse.Namespace) -> tuple[Dataset, str]:
    """(training data set with the recipe's transform, layout): `imagefolder` (DIR/train/<class>/...)
    built by datasets.build_dataset, else `files` (every image under DIR)."""
    if not os.path.isdir(data_dir):
        raise UserError(f"--data-loading {data_dir}: no such folder; pass a folder of images "
                        "or an ImageFolder root with train/<class>/<image>")
    if os.path.isdir(os.path.join(data_dir, "train")):
        args.data_path, args.data_set = data_dir, "IMNET" if args.data_set == "IMNET" else "IMAGEFOLDER"
        dataset, _ = datasets.build_dataset(True, args)
        return dataset, "imagefolder"
    paths = image_files(data_dir)
    if not paths:
        raise UserError(f"--data-loading {data_dir}: no image files ({', '.join(datasets.IMG_EXTENSIONS)}) "
                        "in the folder or below it; point it at a folder of images")
    return ImageFiles(data_dir, paths, transform=datasets.build_transform(True, args)), "files"


def describe_files(paths: Sequence[str], limit: int = 1000) -> dict:
    """Count, mean size on disk and median pixel size (headers only) of the first `limit` files."""
    sizes, widths, heights = [], [], []
    for path in paths[:limit]:
        sizes.append(os.path.getsize(path))
        try:
            with Image.open(path) as image:
                widths.append(image.size[0])
                heights.append(image.size[1])
        except datasets.IMAGE_LOAD_ERRORS:
            continue
    return {"files": len(paths), "mean_file_kb": statistics.fmean(sizes) / 1024 if sizes else None,
            "median_source_size": [int(statistics.median(widths)), int(statistics.median(heights))] if widths else None}


def recipe_settings(args: argparse.Namespace) -> dict:
    return {key: getattr(args, key, None) for key in RECIPE_KEYS}


# ---------------------------------------------------------------- measurements

def _rates(times: Sequence[float], images: int) -> dict:
    throughput = summarize([images / t for t in times])
    return {"throughput": throughput, "per_image_ms": 1000.0 / throughput["median"], "round_times_s": list(times)}


def _check_counts(images: int, warmup: int, rounds: int) -> None:
    if images < 1 or rounds < 1 or warmup < 0:
        raise UserError(f"--images and --rounds must be >= 1 and --warmup >= 0, got {images}, {rounds}, {warmup}")


def _cycling(visit: Callable[[int], object]) -> Callable[[int], None]:
    """step(count): visit(position) for the next `count` positions, counting on from 0 across calls."""
    position = 0

    def step(count: int) -> None:
        nonlocal position
        for _ in range(count):
            visit(position)
            position += 1
    return step


def _timed_rounds(step: Callable[[int], None], images: int, warmup: int, rounds: int) -> list[float]:
    """Seconds of each of `rounds` calls `step(images)`, after one untimed `step(warmup)`."""
    step(warmup)
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        step(images)
        times.append(time.perf_counter() - start)
    return times


def measure_decode(paths: Sequence[str], images: int, warmup: int = 10, rounds: int = 7) -> dict:
    """Images/s of open + full decode + RGB conversion, one process, cycling over `paths`.

    Unreadable files are skipped (counted in `unreadable`); none readable is a UserError.
    """
    _check_counts(images, warmup, rounds)
    readable, unreadable, first_error = [], [], None
    for path in paths[:max(images, warmup)]:
        try:
            datasets.pil_rgb_loader(path)
            readable.append(path)
        except datasets.IMAGE_LOAD_ERRORS as error:
            unreadable.append(path)
            first_error = first_error or f"{path}: {str(error).splitlines()[0] if str(error) else type(error).__name__}"
    if not readable:
        raise UserError(f"none of the {len(unreadable)} image files tried could be decoded ({first_error}); "
                        "point --data-loading at a folder of readable images")
    times = _timed_rounds(_cycling(lambda position: datasets.pil_rgb_loader(readable[position % len(readable)])),
                          images, warmup, rounds)
    return {"measurement": "decode", "workers": None, "images_per_round": images, "rounds": rounds,
            "warmup_images": warmup, "unreadable": len(unreadable), "threads": torch.get_num_threads(),
            **_rates(times, images)}


def measure_transform(dataset: Dataset, images: int, warmup: int = 10, rounds: int = 7, seed: int = 0) -> dict:
    """Images/s of decode + the recipe's augmentation as one DataLoader worker runs it: through
    `PerSampleSeeded` with one torch thread, no DataLoader, no collate."""
    _check_counts(images, warmup, rounds)
    seeded = PerSampleSeeded(dataset)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # what a DataLoader worker has
    try:
        times = _timed_rounds(_cycling(lambda position: seeded[SampleKey(position % len(dataset),
                                                                         mix_seed(seed, 0, position))]),
                              images, warmup, rounds)
    finally:
        torch.set_num_threads(threads)
    return {"measurement": "transform", "workers": None, "images_per_round": images, "rounds": rounds,
            "warmup_images": warmup, "threads": 1, **_rates(times, images)}


class CyclingKeys(Sampler):
    """`length` SampleKeys cycling over the data set, seeded like the training sampler's."""

    def __init__(self, dataset_len: int, length: int, seed: int = 0):
        self.dataset_len, self.length, self.seed = dataset_len, length, seed

    def __len__(self) -> int:
        return self.length

    def __iter__(self):
        return (SampleKey(position % self.dataset_len, mix_seed(self.seed, 0, position))
                for position in range(self.length))


def measure_loader(dataset: Dataset, workers: int, batch_size: int, images: int, warmup: int = 10,
                   rounds: int = 7, seed: int = 0, pin_memory: bool = False) -> dict:
    """Images/s of a training DataLoader with `workers` workers (0: in this process), collate included.

    Each round is ceil(images / batch_size) batches. Warm-up: ceil(warmup / batch_size) batches
    (at least one) plus the first prefetch wave (PREFETCH_FACTOR batches per worker).
    """
    _check_counts(images, warmup, rounds)
    if workers < 0 or batch_size < 1:
        raise UserError(f"--workers must be >= 0 and the recipe's --batch-size >= 1, got {workers}, {batch_size}")
    batches_per_round = math.ceil(images / batch_size)
    warmup_batches = max(1, math.ceil(warmup / batch_size)) + PREFETCH_FACTOR * workers
    total = (warmup_batches + rounds * batches_per_round) * batch_size
    loader = DataLoader(PerSampleSeeded(dataset), sampler=CyclingKeys(len(dataset), total, seed),
                        batch_size=batch_size, num_workers=workers, pin_memory=pin_memory, drop_last=True,
                        collate_fn=datasets.collate_skipping, generator=torch.Generator(),
                        worker_init_fn=dist_utils.ignore_stop_signals)
    start = time.perf_counter()
    with dist_utils.loader_batches(loader) as batches:
        skipped = len(next(batches).skipped)
        first_batch_s = time.perf_counter() - start
        for _ in range(warmup_batches - 1):
            skipped += len(next(batches).skipped)
        times = []
        for _ in range(rounds):
            start = time.perf_counter()
            for _ in range(batches_per_round):
                skipped += len(next(batches).skipped)
            times.append(time.perf_counter() - start)
    result = _rates(times, batches_per_round * batch_size)
    result["throughput_per_worker"] = result["throughput"]["median"] / max(workers, 1)
    return {"measurement": "loader", "workers": workers, "batch_size": batch_size,
            "images_per_round": batches_per_round * batch_size, "rounds": rounds, "warmup_batches": warmup_batches,
            "first_batch_s": first_batch_s, "pin_memory": pin_memory, "collate": "datasets.collate_skipping",
            "skipped_unreadable": skipped, "threads": 1 if workers else torch.get_num_threads(), **result}


# ---------------------------------------------------------------- one run of the mode

def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def default_workers() -> list[int]:
    """One worker (the per-worker rate) and one per available core."""
    return sorted({1, available_cores()})


def _label(result: dict) -> str:
    if result["measurement"] == "decode":
        return "decode (PIL, RGB)"
    if result["measurement"] == "transform":
        return "decode + transform, 1 process"
    workers = result["workers"]
    return "DataLoader, main process" if workers == 0 else f"DataLoader, {workers} worker{'s' * (workers > 1)}"


def run(data_dir: str, recipe: str | Sequence[str] = "", workers: Sequence[int] | None = None, images: int = 256,
        warmup: int = 10, rounds: int = 7, env: dict | None = None) -> list[dict]:
    """Decode, decode + transform and DataLoader(N workers) throughput on `data_dir`; one record each."""
    args, tokens = parse_recipe(recipe)
    workers = default_workers() if workers is None else list(workers)
    if any(w < 0 for w in workers):
        raise UserError(f"--workers takes counts >= 0, got {' '.join(map(str, workers))}")
    _check_counts(images, warmup, rounds)
    dataset, layout = open_folder(data_dir, args)
    paths = [path for path, _ in dataset.samples]
    cores = available_cores()
    if max(workers, default=0) > cores:
        _logger.warning("--workers %d is more than the %d CPU cores available: the workers share cores",
                        max(workers), cores)
    pin = bool(args.pin_mem) and str(args.device).startswith("cuda")  # main.build_loaders' rule
    common = {
        "record_version": RECORD_VERSION, "kind": "data", "data_dir": os.path.abspath(data_dir), "layout": layout,
        **describe_files(paths), "recipe": recipe_settings(args), "recipe_argv": tokens,
        "transform": repr(dataset.transform).replace("\n", " "), "seeding": "samplers.PerSampleSeeded",
        "cpu_cores": cores, **(env if env is not None else environment_info(torch.device("cpu"))),
        "argv": sys.argv[1:],
    }
    _logger.info("%s: %d image files (%s), batch %d, input %d px", data_dir, len(paths), layout, args.batch_size,
                 args.input_size)
    measurements = [lambda: measure_decode(paths, images, warmup, rounds),
                    lambda: measure_transform(dataset, images, warmup, rounds, args.seed)]
    measurements += [lambda n=n: measure_loader(dataset, n, args.batch_size, images, warmup, rounds, args.seed, pin)
                     for n in workers]
    records = []
    for measure in measurements:
        result = measure()
        record = {**common, "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  "label": _label(result), "mode": result["measurement"], "batch_size": None, **result, "error": None}
        _logger.info("%s: %.1f img/s (median of %d rounds)", record["label"], record["throughput"]["median"],
                     record["rounds"])
        records.append(record)
    return records


# ---------------------------------------------------------------- output

def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_table(records: Sequence[dict]) -> str:
    """Fixed-width table of the data-loading records, with the notes a reader needs to use them."""
    header = ("measurement", "workers", "batch", "img/s", "IQR", "img/s per worker", "ms/img per worker",
              "first batch s")
    rows = [header]
    for r in records:
        per_worker = r.get("throughput_per_worker", r["throughput"]["median"])
        rows.append((r["label"], _fmt(r.get("workers"), "d"), _fmt(r.get("batch_size"), "d"),
                     _fmt(r["throughput"]["median"], ".1f"), _fmt(r["throughput"]["iqr"], ".1f"),
                     _fmt(per_worker, ".1f"), _fmt(1000.0 / per_worker, ".2f"), _fmt(r.get("first_batch_s"), ".2f")))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    if not records:
        return "\n".join(lines)
    first = records[0]
    recipe = first["recipe"]
    size = first.get("median_source_size")
    notes = [f"data: {first['data_dir']} ({first['layout']}), {first['files']} files, "
             f"median {size[0]}x{size[1]} px, mean {first['mean_file_kb']:.0f} KB" if size else
             f"data: {first['data_dir']} ({first['layout']}), {first['files']} files",
             f"recipe: --model {recipe['model']} --input-size {recipe['input_size']} --aa {recipe['aa']} "
             f"--reprob {recipe['reprob']} --color-jitter {recipe['color_jitter']} --train-crop {recipe['train_crop']}"
             f"{' --ThreeAugment' if recipe['ThreeAugment'] else ''} --batch-size {recipe['batch_size']}"
             f"{' (--cfg ' + recipe['cfg'] + ')' if recipe.get('cfg') else ''}"]
    by_kind = {r["measurement"]: r for r in records if r["measurement"] in ("decode", "transform")}
    if len(by_kind) == 2:
        extra = by_kind["transform"]["per_image_ms"] - by_kind["decode"]["per_image_ms"]
        notes.append(f"the augmentation adds {extra:.2f} ms per image to the {by_kind['decode']['per_image_ms']:.2f} "
                     "ms decode (one core)")
    notes.append("data-bound when the model trains faster (benchmark.py --mode train, images/s) than the "
                 "DataLoader row with the run's --num_workers")
    return "\n".join(lines + notes)
