"""Datasets and transforms for the DeiT recipe (Touvron et al., "Training data-efficient
image transformers & distillation through attention", ICML 2021).

`build_dataset(is_train, args) -> (dataset, nb_classes)` and `build_transform(is_train, args)`
keep DeiT's signatures and behaviour (the training pipeline of timm's `create_transform`,
RandomCrop with padding 4 for inputs <= 32 px, Resize(input_size / eval_crop_ratio) +
CenterCrop at evaluation). Changes relative to DeiT's `datasets.py`:

* more datasets: IMAGEFOLDER (any `train/` + `val/` folder), CIFAR10, FLOWERS102, CARS and
  SYNTHETIC (`SyntheticShapes`, procedurally drawn, no files: the default data set);
* nothing downloads unless `--download`; missing data is a one-line `UserError`;
* image folders tolerate broken files (`TolerantImageFolder`): non-image, zero-byte files and
  empty classes are reported at build time, unreadable images are replaced by the next
  readable one at load time, and the skipped paths travel with each sample to the main
  process through `collate_skipping` (a `LoadedBatch` with `.skipped`). `--strict-data`
  turns every one of these into a `UserError` naming the path;
* `--train-crop resize_random_crop`: RaftMLP's Resize + RandomCrop instead of
  RandomResizedCrop; `--ThreeAugment`: DeiT-III's three-augment transform;
* timm's posterize ops accept "keep 0 bits" again (Pillow 13 raises on it; see
  `posterize_allowing_zero_bits`).
"""
import dataclasses
import json
import logging
import math
import os
import random
import zlib
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageFile, ImageFilter, ImageOps
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.data import auto_augment
from timm.data.transforms import str_to_interp_mode
from timm.data.transforms_factory import transforms_imagenet_train
from torch.utils.data import ConcatDataset, Dataset, default_collate
from torchvision import datasets as tv_datasets
from torchvision import transforms
from torchvision.datasets.folder import IMG_EXTENSIONS

from utils.errors import UserError
from utils.run_dir import path_problem

_logger = logging.getLogger(__name__)

DATASET_ALIASES = {"CIFAR": "CIFAR100", "INAT": "INAT18"}
IMAGENET_CLASSES = 1000
DATASET_NAMES = ("IMNET", "IMAGEFOLDER", "CIFAR10", "CIFAR100", "FLOWERS102", "CARS",
                 "INAT18", "INAT19", "SYNTHETIC")

# Errors PIL raises for truncated, corrupt or unreadable images (a broken PNG chunk raises
# SyntaxError, a broken zlib stream zlib.error, a huge header DecompressionBombError).
IMAGE_LOAD_ERRORS = (OSError, SyntaxError, ValueError, zlib.error, Image.DecompressionBombError)
# Give up after this many unreadable files in a row: the data set is broken, not a file.
MAX_CONSECUTIVE_UNREADABLE = 100
# How many offending paths the build-time warning lists per kind.
WARN_PATHS_SHOWN = 10


# --------------------------------------------------------------------------------------
# Samples and batches that carry the paths of skipped (unreadable) files
# --------------------------------------------------------------------------------------

class LoadedSample(tuple):
    """`(image, target)` with `.skipped`: the unreadable paths replaced by this sample."""

    def __new__(cls, first, second, skipped: Sequence[str] = ()):
        obj = super().__new__(cls, (first, second))
        obj.skipped = list(skipped)
        return obj

    def __getnewargs__(self):
        return (self[0], self[1], self.skipped)


class LoadedBatch(LoadedSample):
    """`(samples, targets)` with `.skipped`: every unreadable path replaced in this batch.

    A tuple, so `samples, targets = batch` works as with the default collate.
    """

    def pin_memory(self):
        # The DataLoader's pin-memory thread rebuilds plain tuples and would drop `.skipped`.
        return LoadedBatch(self[0].pin_memory(), self[1].pin_memory(), self.skipped)


def collate_skipping(batch: Sequence[tuple]) -> LoadedBatch:
    """`collate_fn` for every training/eval loader: default collate plus skipped paths.

    Accepts plain `(image, target)` samples too (CIFAR, SYNTHETIC), whose `.skipped` is empty.
    """
    skipped = [path for item in batch for path in getattr(item, "skipped", ())]
    samples, targets = default_collate([(item[0], item[1]) for item in batch])
    return LoadedBatch(samples, targets, skipped)


# --------------------------------------------------------------------------------------
# Fault-tolerant image folders
# --------------------------------------------------------------------------------------

@dataclasses.dataclass
class ScanReport:
    """What the build-time scan of one split found besides usable image files."""

    root: str
    num_images: int = 0
    non_image_files: List[str] = dataclasses.field(default_factory=list)
    zero_byte_files: List[str] = dataclasses.field(default_factory=list)
    # Class folders (missing ones included) holding no usable image; kept in class_to_idx.
    empty_classes: List[str] = dataclasses.field(default_factory=list)

    @property
    def counts(self) -> dict:
        return {"images": self.num_images, "non_image_files": len(self.non_image_files),
                "zero_byte_files": len(self.zero_byte_files),
                "empty_classes": len(self.empty_classes)}

    @property
    def clean(self) -> bool:
        return not (self.non_image_files or self.zero_byte_files or self.empty_classes)

    def first_offender(self) -> Optional[str]:
        for paths in (self.empty_classes, self.zero_byte_files, self.non_image_files):
            if paths:
                return paths[0]
        return None

    def log_warning(self) -> None:
        if self.clean:
            return
        _logger.warning("%s: %d images; skipped %d non-image file(s), %d zero-byte file(s); "
                        "%d class folder(s) without images (kept as classes)", self.root,
                        self.num_images, len(self.non_image_files), len(self.zero_byte_files),
                        len(self.empty_classes))
        for kind, paths in (("non-image file", self.non_image_files),
                            ("zero-byte file", self.zero_byte_files),
                            ("class folder without images", self.empty_classes)):
            shown = paths[:WARN_PATHS_SHOWN]
            more = f" (+{len(paths) - len(shown)} more)" if len(paths) > len(shown) else ""
            for path in shown:
                _logger.warning("  %s: %s", kind, path)
            if more:
                _logger.warning("  %s%s", kind, more)


def scan_report(dataset) -> Optional[ScanReport]:
    """The build-time `ScanReport` of a data set built here (None for torchvision sets)."""
    return getattr(dataset, "scan_report", None)


def scan_class_folders(root: str,
                       classes: Sequence[str]) -> Tuple[List[Tuple[str, int]], ScanReport]:
    """Walk `root/<class>/**` in torchvision's order; return the usable samples and a report.

    Files with an image extension and a non-zero size are samples; other files are counted,
    not opened (opening every image of ImageNet at start-up costs minutes).
    """
    report = ScanReport(root=root)
    samples = []
    for class_index, class_name in enumerate(classes):
        class_dir = os.path.join(root, class_name)
        found = 0
        for dirpath, _, fnames in sorted(os.walk(class_dir, followlinks=True)):
            for fname in sorted(fnames):
                path = os.path.join(dirpath, fname)
                if not fname.lower().endswith(IMG_EXTENSIONS):
                    report.non_image_files.append(path)
                elif os.path.getsize(path) == 0:
                    report.zero_byte_files.append(path)
                else:
                    samples.append((path, class_index))
                    found += 1
        if found == 0:
            report.empty_classes.append(class_dir)
    report.num_images = len(samples)
    return samples, report


def pil_rgb_loader(path: str) -> Image.Image:
    """Open and fully decode an image (a truncated file raises here, not in a transform)."""
    with open(path, "rb") as f:
        img = Image.open(f)
        return img.convert("RGB")


class TolerantLoadingMixin:
    """`__getitem__` for `self.samples = [(path, target)]` that replaces unreadable images.

    Without `strict`, an image that fails to decode is replaced by the next index (cyclic)
    that loads, so batch sizes never change; the skipped paths ride along in
    `LoadedSample.skipped`. With `strict`, the first unreadable file raises `UserError`.
    """

    strict: bool = False

    def load_sample(self, index: int):
        path, target = self.samples[index]
        return self.loader(path), target

    def __getitem__(self, index: int) -> LoadedSample:
        skipped = []
        num_samples = len(self.samples)
        for attempt in range(min(num_samples, MAX_CONSECUTIVE_UNREADABLE)):
            current = (index + attempt) % num_samples
            try:
                sample, target = self.load_sample(current)
            except IMAGE_LOAD_ERRORS as err:
                path = self.samples[current][0]
                if self.strict:
                    reason = str(err).splitlines()[0] if str(err) else type(err).__name__
                    raise UserError(f"unreadable image {path} ({reason}); "
                                    "remove or replace it, or drop --strict-data to skip "
                                    "broken files") from err
                skipped.append(path)
                continue
            if self.transform is not None:
                sample = self.transform(sample)
            if self.target_transform is not None:
                target = self.target_transform(target)
            return LoadedSample(sample, target, skipped)
        raise UserError(f"{len(skipped)} unreadable images in a row starting at "
                        f"{self.samples[index][0]}; check the data set under {self.root}")


class TolerantImageFolder(TolerantLoadingMixin, tv_datasets.ImageFolder):
    """torchvision `ImageFolder` that reports broken files instead of failing on them.

    `classes` fixes the class list (DeiT/IMAGEFOLDER pass the union of the train and val
    class folders) so that a class missing or empty in one split keeps its index.
    `self.scan_report` holds the build-time counts.
    """

    def __init__(self, root: str, classes: Optional[Sequence[str]] = None, transform=None,
                 target_transform=None, strict: bool = False):
        self.strict = strict
        self._fixed_classes = list(classes) if classes is not None else None
        self.scan_report = ScanReport(root=root)
        super().__init__(root, transform=transform, target_transform=target_transform,
                         loader=pil_rgb_loader, allow_empty=True)
        self.scan_report.log_warning()
        if strict and not self.scan_report.clean:
            raise UserError(f"bad entry in the data set: {self.scan_report.first_offender()} "
                            "(non-image, zero-byte or empty class folder); fix it or drop "
                            "--strict-data to skip it")
        if not self.samples:
            raise UserError(f"no readable image files under {root}; expected "
                            f"{root}/<class>/<image> with extensions {', '.join(IMG_EXTENSIONS)}")

    def find_classes(self, directory: str):
        if self._fixed_classes is None:
            return super().find_classes(directory)
        return self._fixed_classes, {name: i for i, name in enumerate(self._fixed_classes)}

    def make_dataset(self, directory, class_to_idx, extensions=None, is_valid_file=None,
                     allow_empty=False):
        classes = sorted(class_to_idx, key=class_to_idx.__getitem__)
        samples, self.scan_report = scan_class_folders(directory, classes)
        return samples


def list_class_folders(*split_dirs: str) -> List[str]:
    """Sorted union of the class folder names found in the given split folders."""
    names = set()
    for split_dir in split_dirs:
        if os.path.isdir(split_dir):
            names.update(entry.name for entry in os.scandir(split_dir) if entry.is_dir())
    return sorted(names)


# --------------------------------------------------------------------------------------
# iNaturalist 2018 / 2019 (DeiT's INatDataset behaviour)
# --------------------------------------------------------------------------------------

def _read_json(path: str):
    if not os.path.isfile(path):
        raise UserError(f"missing {path}; expected the official iNaturalist json files "
                        "(train20XX.json, val20XX.json, categories.json) in --data-path")
    with open(path) as f:
        return json.load(f)


class INatDataset(TolerantLoadingMixin, Dataset):
    """iNaturalist 2018/2019 from the official json lists, as in DeiT.

    Labels: the categories at level `category` ('name', 'genus', 'family', ...) of
    `categories.json`, indexed in order of first appearance among the *train* annotations
    (so train and val agree). The category id of an image is the third component of its
    `file_name` (`train_val2018/<super>/<id>/<file>.jpg`). DeiT read images from
    `root/train_val2018/<id>/<file>` (no super-category level); this class uses the
    official `root/<file_name>` when it exists and DeiT's layout otherwise.
    """

    def __init__(self, root: str, train: bool = True, year: int = 2018, category: str = "name",
                 transform=None, target_transform=None, strict: bool = False):
        self.root = root
        self.transform = transform
        self.target_transform = target_transform
        self.loader = pil_rgb_loader
        self.strict = strict
        split = "train" if train else "val"
        images = _read_json(os.path.join(root, f"{split}{year}.json"))["images"]
        categories = _read_json(os.path.join(root, "categories.json"))
        train_annotations = _read_json(os.path.join(root, f"train{year}.json"))["annotations"]
        if categories and category not in categories[0]:
            raise UserError(f"--inat-category {category!r} is not a field of categories.json; "
                            f"choose one of {sorted(categories[0])}")

        self.class_to_idx = {}
        for annotation in train_annotations:
            key = categories[int(annotation["category_id"])][category]
            self.class_to_idx.setdefault(key, len(self.class_to_idx))
        self.classes = list(self.class_to_idx)
        self.nb_classes = len(self.classes)

        official_layout = bool(images) and os.path.exists(
            os.path.join(root, images[0]["file_name"]))
        self.samples = []
        for image in images:
            parts = image["file_name"].split("/")
            category_id = int(parts[2])
            path = (os.path.join(root, image["file_name"]) if official_layout
                    else os.path.join(root, parts[0], parts[2], parts[3]))
            self.samples.append((path, self.class_to_idx[categories[category_id][category]]))
        self.targets = [target for _, target in self.samples]
        if not self.samples:
            raise UserError(f"no images listed in {os.path.join(root, f'{split}{year}.json')}")

    def __len__(self) -> int:
        return len(self.samples)


# --------------------------------------------------------------------------------------
# SYNTHETIC: procedurally drawn shapes
# --------------------------------------------------------------------------------------

def _shape_masks() -> dict:
    """Shape name -> mask function of shape-centred coordinates (u, v), radius 1."""
    def box(u, v, half):
        return np.maximum(np.abs(u), np.abs(v)) <= half

    def diagonal_bars(u, v):
        a, b = (u + v) / math.sqrt(2), (u - v) / math.sqrt(2)
        return ((np.abs(a) <= 0.25) & (np.abs(b) <= 1)) | ((np.abs(b) <= 0.25) & (np.abs(a) <= 1))

    def radius(u, v):
        return np.sqrt(u * u + v * v)

    return {
        "disk": lambda u, v: radius(u, v) <= 1,
        "square": lambda u, v: box(u, v, 0.85),
        "triangle": lambda u, v: (v <= 0.8) & (np.abs(u) <= (v + 1) * 0.55),
        "plus": lambda u, v: (((np.abs(u) <= 0.3) & (np.abs(v) <= 1))
                              | ((np.abs(v) <= 0.3) & (np.abs(u) <= 1))),
        "ring": lambda u, v: (radius(u, v) <= 1) & (radius(u, v) >= 0.55),
        "stripes": lambda u, v: box(u, v, 0.9) & (np.floor((u + 0.9) * 2.78) % 2 == 0),
        "diamond": lambda u, v: np.abs(u) + np.abs(v) <= 1,
        "frame": lambda u, v: box(u, v, 0.85) & ~box(u, v, 0.5),
        "cross": diagonal_bars,
        "crescent": lambda u, v: (radius(u, v) <= 1) & (radius(u - 0.55, v) > 0.8),
        "half_disk": lambda u, v: (radius(u, v) <= 1) & (v >= 0),
        "ell": lambda u, v: box(u, v, 0.9) & ~((u > -0.35) & (v < 0.35)),
    }


SHAPE_MASKS = _shape_masks()
SHAPE_NAMES = tuple(SHAPE_MASKS)
SPLIT_IDS = {"train": 0, "val": 1}


def draw_shape_image(rng: np.random.Generator, shape: str, size: int,
                     radius_range: Tuple[float, float] = (0.22, 0.34),
                     max_noise: float = 0.03, min_contrast: float = 0.3) -> np.ndarray:
    """One `size x size x 3` uint8 image: a `shape` of random position, size and colour on a
    random background (flat colour + linear gradient + pixel noise).

    Colours are drawn independently of the class. The shape is always the lighter of the
    two (by at least `min_contrast` in mean intensity): with a random polarity a tiny ViT
    stayed near chance for twice as many steps; RandAugment's Invert/Solarize still show
    it the other polarity. The shape (radius as a fraction of the side) stays inside the
    central 84 % so that eval centre crops keep it.
    """
    coords = (np.arange(size, dtype=np.float32) + 0.5) / size
    yy, xx = np.meshgrid(coords, coords, indexing="ij")
    radius = rng.uniform(*radius_range)
    cx, cy = rng.uniform(0.08 + radius, 0.92 - radius, size=2)
    mask = SHAPE_MASKS[shape]((xx - cx) / radius, (yy - cy) / radius)

    while True:
        background = rng.uniform(0.0, 0.55, size=3)
        foreground = rng.uniform(0.45, 1.0, size=3)
        if foreground.mean() - background.mean() >= min_contrast:
            break
    gradient_dir = rng.normal(size=2)
    gradient = (xx * gradient_dir[0] + yy * gradient_dir[1])[..., None] * rng.uniform(0.0, 0.2)
    image = np.where(mask[..., None], foreground, background + gradient)
    image = image + rng.normal(0.0, rng.uniform(0.0, max_noise), size=image.shape)
    return (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


class SyntheticShapes(Dataset):
    """Procedurally drawn shapes, generated on the fly (no files): the built-in data set.

    The class is the shape (disk, square, triangle, ...); position, size, colours,
    background gradient and noise are random, so the mean colour says next to nothing
    about the class (nearest class-mean on mean RGB: ~15 % for 10 classes). Image `index`
    of `split` is a pure function of `(seed, split, index)`; labels are
    `index % num_classes` (exactly balanced). Returns PIL images through `transform`,
    or float tensors in [0, 1] (C, H, W) when `transform` is None.
    """

    def __init__(self, num_samples: int, num_classes: int = 10, img_size: int = 32,
                 seed: int = 0, split: str = "train", transform: Optional[Callable] = None):
        if not 2 <= num_classes <= len(SHAPE_NAMES):
            raise UserError(f"--synthetic-classes {num_classes} is out of range; "
                            f"use 2 to {len(SHAPE_NAMES)}")
        if split not in SPLIT_IDS:
            raise ValueError(f"split must be one of {sorted(SPLIT_IDS)}, got {split!r}")
        if num_samples < 1 or img_size < 8:
            raise UserError(f"synthetic data needs >= 1 sample and >= 8 px, got "
                            f"{num_samples} samples at {img_size} px")
        self.num_samples = num_samples
        self.num_classes = num_classes
        self.img_size = img_size
        self.seed = seed
        self.split = split
        self.transform = transform
        self.classes = list(SHAPE_NAMES[:num_classes])
        self.targets = [i % num_classes for i in range(num_samples)]

    def __len__(self) -> int:
        return self.num_samples

    def draw(self, index: int) -> Image.Image:
        rng = np.random.default_rng([self.seed, SPLIT_IDS[self.split], index])
        shape = SHAPE_NAMES[self.targets[index]]
        return Image.fromarray(draw_shape_image(rng, shape, self.img_size))

    def __getitem__(self, index: int):
        if not 0 <= index < self.num_samples:
            raise IndexError(index)
        image = self.draw(index)
        if self.transform is None:
            return transforms.functional.to_tensor(image), self.targets[index]
        return self.transform(image), self.targets[index]


# --------------------------------------------------------------------------------------
# build_dataset
# --------------------------------------------------------------------------------------

def resolve_dataset_name(name: str) -> str:
    resolved = DATASET_ALIASES.get(name.upper(), name.upper())
    if resolved not in DATASET_NAMES:
        raise UserError(f"unknown --data-set {name!r}; choose one of "
                        f"{', '.join(DATASET_NAMES + tuple(DATASET_ALIASES))}")
    return resolved


def _require_data_dir(path: str, expected: str) -> None:
    if not path:
        raise UserError(f"--data-path is empty; pass the folder holding {expected}")
    if not os.path.isdir(path):
        raise UserError(f"data path {path} {path_problem(path)}; expected {expected}")
    if not os.listdir(path):
        raise UserError(f"data path {path} is empty; expected {expected}")


def _torchvision_dataset(factory: Callable, name: str, args, **kwargs):
    """Build a torchvision data set; missing files without --download -> one-line UserError."""
    if not args.download:
        _require_data_dir(args.data_path, f"the {name} files (or pass --download)")
    try:
        return factory(root=args.data_path, download=bool(args.download), **kwargs)
    except RuntimeError as err:
        if args.download:
            raise
        raise UserError(f"{name} not found or corrupted under {args.data_path}; pass "
                        "--download or point --data-path at the torchvision layout") from err


def _image_folder_splits(args, name: str, is_train: bool, transform):
    root = args.data_path
    expected = f"{root}/train/<class>/<image> and {root}/val/<class>/<image>"
    _require_data_dir(root, expected)
    split_dir = os.path.join(root, "train" if is_train else "val")
    if not os.path.isdir(split_dir):
        raise UserError(f"{name}: missing folder {split_dir}; expected {expected}")
    classes = list_class_folders(os.path.join(root, "train"), os.path.join(root, "val"))
    if not classes:
        raise UserError(f"{name}: no class folders under {root}; expected {expected}")
    dataset = TolerantImageFolder(split_dir, classes=classes, transform=transform,
                                  strict=bool(args.strict_data))
    return dataset, len(classes)


def check_class_count(num_classes: int, args, training: bool) -> None:
    """Training needs at least two classes (one class gives a 1-output head, loss 0 and 100%
    accuracy, which learns nothing); evaluating a 1-class set proceeds with a warning."""
    if num_classes >= 2:
        return
    where = f"--data-path {args.data_path}" if args.data_path else f"--data-set {args.data_set}"
    if training:
        raise UserError(f"{where}: the training set has {num_classes} class(es); training a classifier needs "
                        f"at least 2 (add class folders, or evaluate with --eval)")
    _logger.warning(f"{where}: the evaluation set has {num_classes} class(es): accuracy is trivially 100%")


def build_dataset(is_train: bool, args):
    """DeiT's entry point: `(dataset, nb_classes)` for the split named by `is_train`."""
    name = resolve_dataset_name(args.data_set)
    transform = build_transform(is_train, args)
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        _logger.warning("PIL ImageFile.LOAD_TRUNCATED_IMAGES was set to True by another "
                        "module: truncated images will load silently instead of being skipped")

    if name == "SYNTHETIC":
        size = args.synthetic_train_size if is_train else args.synthetic_val_size
        dataset = SyntheticShapes(size, num_classes=args.synthetic_classes,
                                  img_size=args.input_size, seed=args.seed,
                                  split="train" if is_train else "val", transform=transform)
        return dataset, args.synthetic_classes
    if name == "IMNET":
        dataset, found = _image_folder_splits(args, name, is_train, transform)
        if found > IMAGENET_CLASSES:
            raise UserError(f"IMNET expects at most {IMAGENET_CLASSES} class folders under {args.data_path}, "
                            f"found {found}; use --data-set IMAGEFOLDER for other folder datasets")
        # DeiT's head always has 1000 outputs, so official checkpoints load on ImageNet subsets too.
        return dataset, IMAGENET_CLASSES
    if name == "IMAGEFOLDER":
        return _image_folder_splits(args, name, is_train, transform)
    if name == "CIFAR10":
        return _torchvision_dataset(tv_datasets.CIFAR10, name, args, train=is_train,
                                    transform=transform), 10
    if name == "CIFAR100":
        return _torchvision_dataset(tv_datasets.CIFAR100, name, args, train=is_train,
                                    transform=transform), 100
    if name == "FLOWERS102":
        # Transfer-learning convention (DeiT paper, Table 6): train+val (2,040) / test (6,149).
        splits = ("train", "val") if is_train else ("test",)
        parts = [_torchvision_dataset(tv_datasets.Flowers102, name, args, split=split,
                                      transform=transform) for split in splits]
        return (ConcatDataset(parts) if len(parts) > 1 else parts[0]), 102
    if name == "CARS":
        return _torchvision_dataset(tv_datasets.StanfordCars, name, args,
                                    split="train" if is_train else "test",
                                    transform=transform), 196
    # INAT18 / INAT19
    _require_data_dir(args.data_path, "the iNaturalist json files and image folders")
    year = 2018 if name == "INAT18" else 2019
    dataset = INatDataset(args.data_path, train=is_train, year=year, category=args.inat_category,
                          transform=transform, strict=bool(args.strict_data))
    return dataset, dataset.nb_classes


# --------------------------------------------------------------------------------------
# Transforms
# --------------------------------------------------------------------------------------

def _auto_augment(aa: Optional[str]) -> Optional[str]:
    return None if aa in (None, "", "none", "None") else aa


def _resize_interp(name: str):
    # timm's 'random' interpolation only exists for RandomResizedCrop.
    return str_to_interp_mode("bilinear" if name == "random" else name)


def build_transform(is_train: bool, args):
    """DeiT's transforms; see the module docstring for the options added."""
    size = args.input_size
    if not is_train:
        # DeiT skips the resize at <= 32 px; Resize(size) + CenterCrop(size) is the identity
        # on 32 px images (CIFAR, SYNTHETIC) and keeps larger images usable.
        resize_to = int(size / args.eval_crop_ratio) if size > 32 else size
        return transforms.Compose([
            transforms.Resize(resize_to, interpolation=_resize_interp(args.eval_interpolation)),
            transforms.CenterCrop(size),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
        ])
    if getattr(args, "ThreeAugment", False):
        return three_augment_transform(args)

    raft_crop = args.train_crop == "resize_random_crop"
    if args.train_crop not in ("rrc", "resize_random_crop"):
        raise UserError(f"unknown --train-crop {args.train_crop!r}; use rrc or resize_random_crop")
    primary, secondary, final = transforms_imagenet_train(
        size,
        color_jitter=args.color_jitter,
        # RaftMLP applies ColorJitter *and* RandAugment; timm drops the jitter under
        # RandAugment unless forced (DeiT relies on that).
        force_color_jitter=raft_crop,
        auto_augment=_auto_augment(args.aa),
        interpolation=args.train_interpolation,
        re_prob=args.reprob,
        re_mode=args.remode,
        re_count=args.recount,
        separate=True,
    )
    allow_zero_bit_posterize(secondary)
    crop = primary.transforms
    if raft_crop:
        crop[0:1] = [transforms.Resize(int(size / args.eval_crop_ratio),
                                       interpolation=_resize_interp(args.train_interpolation)),
                     transforms.RandomCrop(size)]
    elif size <= 32:
        crop[0] = transforms.RandomCrop(size, padding=4)
    return transforms.Compose(crop + secondary.transforms + final.transforms)


def posterize_allowing_zero_bits(img: Image.Image, bits_to_keep: int, **kwargs) -> Image.Image:
    """timm's posterize with the old Pillow meaning of 0 bits kept: a black image.

    Pillow 13 rejects 0 bits, which timm's 'PosterizeIncreasing' asks for at magnitude 10,
    reached by DeiT's `rand-m9-mstd0.5` about once in a thousand images: without this the
    default recipe crashes a DataLoader worker in the first epoch.
    """
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return auto_augment.posterize(img, bits_to_keep, **kwargs)


def allow_zero_bit_posterize(transform: transforms.Compose) -> None:
    """Swap `posterize_allowing_zero_bits` into the posterize ops of timm's RandAugment,
    AutoAugment or AugMix inside `transform` (in place, this instance only)."""
    for stage in transform.transforms:
        ops = list(getattr(stage, "ops", []))
        for sub_policy in getattr(stage, "policy", []):
            ops.extend(sub_policy)
        for op in ops:
            if getattr(op, "aug_fn", None) is auto_augment.posterize:
                op.aug_fn = posterize_allowing_zero_bits


class RandomGaussianBlur:
    """PIL Gaussian blur with a radius drawn uniformly in [radius_min, radius_max]."""

    def __init__(self, radius_min: float = 0.1, radius_max: float = 2.0):
        self.radius_min = radius_min
        self.radius_max = radius_max

    def __call__(self, img: Image.Image) -> Image.Image:
        radius = random.uniform(self.radius_min, self.radius_max)
        return img.filter(ImageFilter.GaussianBlur(radius))


class Solarize:
    def __call__(self, img: Image.Image) -> Image.Image:
        return ImageOps.solarize(img)


def three_augment_transform(args):
    """DeiT-III's 3-Augment: RRC (or Resize + RandomCrop with `--src`), flip, one of
    grayscale / solarize / blur, colour jitter, ToTensor, Normalize."""
    size = args.input_size
    interp = _resize_interp(args.train_interpolation)
    if getattr(args, "src", False):
        crop = [transforms.Resize(size, interpolation=interp),
                transforms.RandomCrop(size, padding=4, padding_mode="reflect")]
    else:
        crop = [transforms.RandomResizedCrop(size, scale=(0.08, 1.0), interpolation=interp)]
    ops = crop + [transforms.RandomHorizontalFlip(),
                  transforms.RandomChoice([transforms.Grayscale(num_output_channels=3),
                                           Solarize(), RandomGaussianBlur()])]
    if args.color_jitter:
        ops.append(transforms.ColorJitter(args.color_jitter, args.color_jitter, args.color_jitter))
    ops += [transforms.ToTensor(),
            transforms.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)]
    return transforms.Compose(ops)
