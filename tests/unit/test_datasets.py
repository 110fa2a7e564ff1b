"""Tests for datasets.py: SYNTHETIC, transforms, fault-tolerant image folders, iNat, errors."""
import argparse
import io
import json
import os
import pickle
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile
from torch.utils.data import DataLoader, default_collate
from torch.utils.data._utils.pin_memory import pin_memory
from torchvision import transforms

import datasets
from datasets import (LoadedBatch, SyntheticShapes, TolerantImageFolder, build_dataset,
                      build_transform, collate_skipping, pil_rgb_loader)
from utils.errors import UserError


def make_args(**overrides) -> argparse.Namespace:
    """The data flags of main.py with DeiT's defaults (tiny sizes for tests)."""
    args = dict(
        data_path="", data_set="SYNTHETIC", download=False, strict_data=False,
        synthetic_train_size=60, synthetic_val_size=20, synthetic_classes=10,
        inat_category="name", input_size=32, eval_crop_ratio=0.875, train_crop="rrc",
        train_interpolation="bicubic", eval_interpolation="bicubic", color_jitter=0.3,
        aa="rand-m9-mstd0.5-inc1", reprob=0.25, remode="pixel", recount=1, resplit=False,
        mixup=0.8, cutmix=1.0, cutmix_minmax=None, mixup_prob=1.0, mixup_switch_prob=0.5,
        mixup_mode="batch", mix_mode="timm", smoothing=0.1, ThreeAugment=False, seed=0,
    )
    args.update(overrides)
    return argparse.Namespace(**args)


# ----------------------------------------------------------------------------- SYNTHETIC

def test_synthetic_is_deterministic_per_seed_index_and_split():
    first = SyntheticShapes(20, img_size=32, seed=3, split="train")
    again = SyntheticShapes(20, img_size=32, seed=3, split="train")
    val = SyntheticShapes(20, img_size=32, seed=3, split="val")
    other_seed = SyntheticShapes(20, img_size=32, seed=4, split="train")
    for index in (0, 7, 19):
        image, target = first[index]
        assert torch.equal(image, again[index][0]) and target == again[index][1]
        assert not torch.equal(image, val[index][0])
        assert not torch.equal(image, other_seed[index][0])
    assert not torch.equal(first[0][0], first[10][0])  # same class, different image


@pytest.mark.parametrize("size", [17, 32, 64, 96])
def test_synthetic_any_resolution(size):
    image, _ = SyntheticShapes(4, img_size=size)[1]
    assert image.shape == (3, size, size)
    assert image.dtype == torch.float32 and 0.0 <= image.min() and image.max() <= 1.0


def test_synthetic_classes_are_balanced():
    dataset = SyntheticShapes(103, num_classes=10)
    counts = Counter(dataset.targets)
    assert sorted(counts) == list(range(10))
    assert max(counts.values()) - min(counts.values()) <= 1
    assert [dataset[i][1] for i in range(len(dataset))] == dataset.targets


def test_synthetic_class_is_not_given_by_mean_colour():
    dataset = SyntheticShapes(400, num_classes=10, img_size=32, seed=1)
    means = torch.stack([dataset[i][0].mean(dim=(1, 2)) for i in range(len(dataset))])
    targets = torch.tensor(dataset.targets)
    centroids = torch.stack([means[targets == c].mean(0) for c in range(10)])
    nearest = torch.cdist(means, centroids).argmin(1)
    assert (nearest == targets).float().mean() < 0.3  # chance is 0.1


def test_synthetic_rejects_bad_class_count():
    with pytest.raises(UserError, match="synthetic-classes"):
        SyntheticShapes(10, num_classes=len(datasets.SHAPE_NAMES) + 1)


def test_build_dataset_synthetic_goes_through_transforms():
    args = make_args(input_size=48, synthetic_classes=6)
    train, nb_classes = build_dataset(True, args)
    val, _ = build_dataset(False, args)
    assert nb_classes == 6 and len(train) == 60 and len(val) == 20
    assert train[0][0].shape == val[0][0].shape == (3, 48, 48)
    # Normalized (ImageNet mean/std), so values leave [0, 1].
    assert val[0][0].min() < 0


# ----------------------------------------------------------------------------- transforms

def test_eval_transform_resizes_then_center_crops():
    ops = build_transform(False, make_args(input_size=224)).transforms
    assert isinstance(ops[0], transforms.Resize) and ops[0].size == 256
    assert isinstance(ops[1], transforms.CenterCrop)
    out = build_transform(False, make_args(input_size=224))(Image.new("RGB", (400, 300)))
    assert out.shape == (3, 224, 224)


def test_train_transform_small_inputs_use_padded_random_crop():
    ops = build_transform(True, make_args(input_size=32)).transforms
    assert isinstance(ops[0], transforms.RandomCrop) and ops[0].padding == 4
    out = build_transform(True, make_args(input_size=32))(Image.new("RGB", (32, 32)))
    assert out.shape == (3, 32, 32)


def test_train_transform_large_inputs_use_bicubic_rrc_and_random_erasing():
    ops = build_transform(True, make_args(input_size=64)).transforms
    names = [type(op).__name__ for op in ops]
    assert names[0] == "RandomResizedCropAndInterpolation"
    assert "RandAugment" in names and "RandomErasing" in names
    assert "ColorJitter" not in names  # DeiT: disabled while RandAugment is on


def test_train_transform_raftmlp_resize_random_crop():
    args = make_args(input_size=64, train_crop="resize_random_crop", color_jitter=0.4,
                     aa="rand-n2-m9-mstd101", train_interpolation="bilinear")
    ops = build_transform(True, args).transforms
    assert isinstance(ops[0], transforms.Resize) and ops[0].size == int(64 / 0.875)
    assert isinstance(ops[1], transforms.RandomCrop) and ops[1].padding is None
    names = [type(op).__name__ for op in ops]
    assert "RandomHorizontalFlip" in names and "ColorJitter" in names and "RandAugment" in names
    assert build_transform(True, args)(Image.new("RGB", (100, 80))).shape == (3, 64, 64)


def test_three_augment_transform():
    transform = build_transform(True, make_args(input_size=32, ThreeAugment=True))
    assert "RandomChoice" in [type(op).__name__ for op in transform.transforms]
    assert transform(Image.new("RGB", (40, 40), "red")).shape == (3, 32, 32)


# ----------------------------------------------------------------------------- broken files

def _image_bytes(fmt: str, seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def _write(path, data: bytes):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    return str(path)


@pytest.fixture
def broken_folder(tmp_path):
    """train/: 5 good images, 2 truncated JPEGs, 2 corrupt PNGs, 1 zero-byte file,
    1 .txt file and 1 empty class folder; val/: 2 good images, class 'c_empty' missing."""
    root = tmp_path / "data"
    train = root / "train"
    good = [_write(train / "a_jpeg" / f"good{i}.jpg", _image_bytes("JPEG", i)) for i in range(3)]
    jpeg = _image_bytes("JPEG", 10)
    broken = [_write(train / "a_jpeg" / "trunc0.jpg", jpeg[: len(jpeg) // 2]),
              _write(train / "a_jpeg" / "trunc1.jpg", jpeg[: len(jpeg) - 40])]
    _write(train / "a_jpeg" / "notes.txt", b"not an image")
    good += [_write(train / "b_png" / f"good{i}.png", _image_bytes("PNG", 20 + i))
             for i in range(2)]
    png = _image_bytes("PNG", 30)
    broken += [_write(train / "b_png" / "garbage.png", png[:16] + bytes(200)),
               _write(train / "b_png" / "zz_cut.png", png[: len(png) // 3])]
    zero = _write(train / "b_png" / "empty.jpg", b"")
    (train / "c_empty").mkdir()
    _write(root / "val" / "a_jpeg" / "v0.jpg", _image_bytes("JPEG", 40))
    _write(root / "val" / "b_png" / "v1.png", _image_bytes("PNG", 41))
    return dict(root=str(root), good=good, broken=broken, zero=zero,
                txt=str(train / "a_jpeg" / "notes.txt"), empty=str(train / "c_empty"))


def test_broken_fixture_files_really_fail_to_load(broken_folder):
    for path in broken_folder["good"]:
        assert pil_rgb_loader(path).size == (32, 32)
    for path in broken_folder["broken"]:
        with pytest.raises(datasets.IMAGE_LOAD_ERRORS):
            pil_rgb_loader(path)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_scan_report_counts_are_exact(broken_folder):
    args = make_args(data_set="IMAGEFOLDER", data_path=broken_folder["root"])
    train, nb_classes = build_dataset(True, args)
    val, nb_classes_val = build_dataset(False, args)
    assert nb_classes == nb_classes_val == 3
    assert train.class_to_idx == val.class_to_idx == {"a_jpeg": 0, "b_png": 1, "c_empty": 2}
    report = datasets.scan_report(train)
    assert report.counts == {"images": 9, "non_image_files": 1, "zero_byte_files": 1,
                             "empty_classes": 1}
    assert report.non_image_files == [broken_folder["txt"]]
    assert report.zero_byte_files == [broken_folder["zero"]]
    assert report.empty_classes == [broken_folder["empty"]]
    assert datasets.scan_report(val).counts == {"images": 2, "non_image_files": 0,
                                                "zero_byte_files": 0, "empty_classes": 1}


def test_broken_image_is_replaced_by_next_readable_one(broken_folder):
    dataset = TolerantImageFolder(os.path.join(broken_folder["root"], "train"))
    paths = [path for path, _ in dataset.samples]
    first_broken = paths.index(broken_folder["broken"][0])
    replacement = next(i for i in range(first_broken, len(paths))
                       if paths[i] in broken_folder["good"])
    image, target = dataset[first_broken]
    expected_image, expected_target = dataset[replacement]
    assert np.array_equal(np.asarray(image), np.asarray(expected_image))
    assert target == expected_target
    assert dataset[first_broken].skipped == paths[first_broken:replacement]
    assert dataset[replacement].skipped == []


@pytest.mark.parametrize("num_workers", [0, 2])
def test_skipped_paths_reach_the_main_process(broken_folder, num_workers):
    args = make_args(data_set="IMAGEFOLDER", data_path=broken_folder["root"], input_size=32)
    dataset, _ = build_dataset(True, args)
    loader = DataLoader(dataset, batch_size=2, num_workers=num_workers,
                        collate_fn=collate_skipping)
    skipped, sizes = set(), []
    for batch in loader:
        assert isinstance(batch, LoadedBatch)
        samples, targets = batch
        assert samples.shape[1:] == (3, 32, 32)
        sizes.append(len(targets))
        skipped.update(batch.skipped)
    assert sizes == [2, 2, 2, 2, 1]  # 9 samples, none dropped
    assert skipped == set(broken_folder["broken"])


def test_strict_data_raises_on_build_naming_the_path(broken_folder):
    args = make_args(data_set="IMAGEFOLDER", data_path=broken_folder["root"], strict_data=True)
    with pytest.raises(UserError, match=broken_folder["empty"]):
        build_dataset(True, args)


def test_strict_data_raises_on_unreadable_image_naming_the_path(tmp_path):
    _write(tmp_path / "train" / "a" / "ok.jpg", _image_bytes("JPEG", 1))
    jpeg = _image_bytes("JPEG", 2)
    bad = _write(tmp_path / "train" / "b" / "bad.jpg", jpeg[: len(jpeg) // 2])
    dataset = TolerantImageFolder(str(tmp_path / "train"), strict=True)
    assert dataset[0][1] == 0
    with pytest.raises(UserError, match="bad.jpg") as err:
        dataset[1]
    assert bad in str(err.value) and "\n" not in str(err.value)


def test_collate_accepts_plain_samples():
    batch = collate_skipping([(torch.zeros(3, 4, 4), 1), (torch.ones(3, 4, 4), 2)])
    assert batch[0].shape == (2, 3, 4, 4) and batch[1].tolist() == [1, 2] and batch.skipped == []


def test_loaded_samples_still_work_with_the_default_collate():
    samples, targets = default_collate([datasets.LoadedSample(torch.zeros(2), 1, ["x.jpg"]),
                                        datasets.LoadedSample(torch.ones(2), 0)])
    assert samples.shape == (2, 2) and targets.tolist() == [1, 0]


# ----------------------------------------------------------------------------- errors

def test_missing_data_path_is_a_user_error(tmp_path):
    missing = str(tmp_path / "nowhere")
    with pytest.raises(UserError, match=missing):
        build_dataset(True, make_args(data_set="IMNET", data_path=missing))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="is empty"):
        build_dataset(False, make_args(data_set="IMAGEFOLDER", data_path=str(tmp_path / "empty")))


def test_missing_split_folder_is_a_user_error(tmp_path):
    _write(tmp_path / "train" / "a" / "x.jpg", _image_bytes("JPEG", 0))
    with pytest.raises(UserError, match="val"):
        build_dataset(False, make_args(data_set="IMNET", data_path=str(tmp_path)))


@pytest.mark.parametrize("name", ["CIFAR10", "CIFAR", "FLOWERS102", "CARS"])
def test_torchvision_sets_without_download_are_user_errors(tmp_path, name):
    with pytest.raises(UserError, match="--download"):
        build_dataset(True, make_args(data_set=name, data_path=str(tmp_path / "none")))
    _write(tmp_path / "other" / "unrelated.bin", b"x")
    with pytest.raises(UserError, match="--download"):
        build_dataset(True, make_args(data_set=name, data_path=str(tmp_path / "other")))


def test_unknown_dataset_name_is_a_user_error():
    with pytest.raises(UserError, match="--data-set"):
        build_dataset(True, make_args(data_set="MNIST"))


# ----------------------------------------------------------------------------- iNaturalist

def _fake_inat(root, official_layout: bool):
    categories = [{"id": 0, "name": "oak", "genus": "Quercus"},
                  {"id": 1, "name": "beech", "genus": "Fagus"},
                  {"id": 2, "name": "holm oak", "genus": "Quercus"}]

    def images(entries):
        out = []
        for image_id, (category, fname) in enumerate(entries):
            file_name = f"train_val2018/Plantae/{category}/{fname}"
            rel = file_name if official_layout else f"train_val2018/{category}/{fname}"
            _write(os.path.join(root, rel), _image_bytes("JPEG", image_id))
            out.append({"id": image_id, "file_name": file_name})
        return out

    train_entries = [(2, "t0.jpg"), (0, "t1.jpg"), (1, "t2.jpg"), (2, "t3.jpg")]
    train = {"images": images(train_entries),
             "annotations": [{"image_id": i, "category_id": c}
                             for i, (c, _) in enumerate(train_entries)]}
    val = {"images": images([(1, "v0.jpg"), (0, "v1.jpg")])}
    for name, content in (("train2018.json", train), ("val2018.json", val),
                          ("categories.json", categories)):
        with open(os.path.join(root, name), "w") as f:
            json.dump(content, f)


@pytest.mark.parametrize("official_layout", [True, False])
def test_inat_json_parsing(tmp_path, official_layout):
    _fake_inat(str(tmp_path), official_layout)
    args = make_args(data_set="INAT", data_path=str(tmp_path))
    train, nb_classes = build_dataset(True, args)
    val, _ = build_dataset(False, args)
    assert nb_classes == 3
    # Indices follow first appearance in the train annotations: holm oak, oak, beech.
    assert train.targets == [0, 1, 2, 0] and val.targets == [2, 1]
    assert train[3][0].shape == (3, 32, 32) and train[3][1] == 0

    genus, nb_genera = build_dataset(False, make_args(data_set="INAT18", data_path=str(tmp_path),
                                                      inat_category="genus"))
    assert nb_genera == 2 and genus.targets == [1, 0]


def test_inat_missing_json_is_a_user_error(tmp_path):
    _write(tmp_path / "readme.txt", b"x")
    with pytest.raises(UserError, match="train2019.json|val2019.json"):
        build_dataset(False, make_args(data_set="INAT19", data_path=str(tmp_path)))


def test_loaded_batch_keeps_skipped_paths_through_pin_memory_and_pickle():
    class FakeTensor:  # pinning needs an accelerator; only the plumbing is under test
        def __init__(self, pinned=False):
            self.pinned = pinned

        def pin_memory(self):
            return FakeTensor(pinned=True)

    pinned = pin_memory(LoadedBatch(FakeTensor(), FakeTensor(), ["a.jpg"]))
    assert isinstance(pinned, LoadedBatch) and pinned.skipped == ["a.jpg"]
    assert pinned[0].pinned and pinned[1].pinned
    restored = pickle.loads(pickle.dumps(LoadedBatch(torch.zeros(2), torch.ones(2), ["b.png"])))
    assert isinstance(restored, LoadedBatch) and restored.skipped == ["b.png"]
    assert torch.equal(restored[1], torch.ones(2))


@pytest.mark.parametrize("aa", ["rand-m10-mstd0-inc1", "v0"])
def test_posterize_keeping_zero_bits_gives_black_image_not_an_error(aa):
    transform = build_transform(True, make_args(input_size=32, aa=aa))
    stage = next(t for t in transform.transforms if hasattr(t, "ops") or hasattr(t, "policy"))
    ops = list(getattr(stage, "ops", []))
    ops += [op for sub in getattr(stage, "policy", []) for op in sub]
    posterize_ops = [op for op in ops if "Posterize" in op.name]
    assert posterize_ops
    image = Image.new("RGB", (32, 32), (200, 120, 40))
    assert np.asarray(posterize_ops[0].aug_fn(image, 0)).max() == 0
    assert np.asarray(posterize_ops[0].aug_fn(image, 4)).max() > 0
    if aa.startswith("rand"):  # magnitude 10 -> 0 bits kept
        posterize_ops[0].prob = 1.0
        assert np.asarray(posterize_ops[0](image)).max() == 0


def test_imnet_keeps_a_1000_way_head_on_a_subset_and_imagefolder_counts_folders(tmp_path):
    for split in ("train", "val"):
        for cls in ("n01", "n02"):
            _write(tmp_path / split / cls / "x.jpg", _image_bytes("JPEG", 0))
    _, imnet_classes = build_dataset(False, make_args(data_set="IMNET", data_path=str(tmp_path)))
    _, folder_classes = build_dataset(False, make_args(data_set="IMAGEFOLDER", data_path=str(tmp_path)))
    assert (imnet_classes, folder_classes) == (1000, 2)
