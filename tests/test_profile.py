"""The dataset profile finds exactly what was planted: class counts, sizes, grey images, exact and
near duplicates, and the pairs that leak across splits; nothing else, and the folder is only read."""
from __future__ import annotations

import json
import shutil

import imagehash
import numpy as np
import pytest
from PIL import Image, ImageDraw

from conftest import make_image, shared_dataset, tree_snapshot
from tlpipe.data.dataset import prepare_dataset
from tlpipe.data.profile import profile_dataset


def _picture(seed: int, size: tuple[int, int] = (320, 240)) -> Image.Image:
    """A seeded picture with structure (coloured ellipses on a coloured ground), unlike any other seed's."""
    rng = np.random.default_rng(seed)
    colour = lambda: tuple(int(v) for v in rng.integers(0, 256, 3))  # noqa: E731
    img = Image.new("RGB", size, colour())
    draw = ImageDraw.Draw(img)
    for _ in range(12):
        x, y = int(rng.integers(0, size[0])), int(rng.integers(0, size[1]))
        w, h = (int(v) for v in rng.integers(30, 140, 2))
        draw.ellipse([x - w // 2, y - h // 2, x + w // 2, y + h // 2], fill=colour())
    return img


def _stripes(seed: int, size: tuple[int, int] = (320, 240)) -> Image.Image:
    """Vertical stripes of seeded colours and widths (DTD's "banded" look)."""
    rng = np.random.default_rng(seed)
    columns = np.concatenate([np.tile(rng.integers(0, 256, 3), (int(rng.integers(4, 30)), 1)) for _ in range(size[0] // 4)])
    return Image.fromarray(np.repeat(columns[None, : size[0]].astype(np.uint8), size[1], axis=0))


@pytest.fixture
def planted(image_folder):
    """train: cats 8 + 4 planted, dogs 4 + 3 planted; val: cats 2, dogs 2 + 2 planted."""
    root = image_folder("data", split={"train": {"cats": 8, "dogs": 4}, "val": 2})
    _picture(1).save(root / "train/cats/photo.png")
    _picture(1).resize((256, 192)).save(root / "train/cats/photo_small.jpg", quality=40)  # near, same split
    make_image(root / "train/cats/noise_a.png", size=(64, 64), noise=127, seed=1)
    make_image(root / "train/cats/noise_b.png", size=(64, 64), noise=127, seed=2)
    _picture(2).save(root / "train/dogs/scene.png")
    _picture(2).save(root / "val/dogs/scene_q30.jpg", quality=30)  # near, leaks train/val
    shutil.copyfile(root / "train/dogs/dogs_000.jpg", root / "val/dogs/copy.jpg")  # exact, leaks train/val
    _picture(3, (200, 300)).convert("L").save(root / "train/dogs/grey.png")
    _picture(4, (300, 200)).convert("L").convert("RGB").save(root / "train/dogs/grey_rgb.jpg", quality=90)
    return root


def test_profile_finds_what_was_planted(planted):
    before = tree_snapshot(planted)
    spec = prepare_dataset(planted, 0.2, 0, report_dir=None)
    profile = profile_dataset(spec)

    assert profile.images_per_class == {"train": {"cats": 12, "dogs": 7}, "val": {"cats": 2, "dogs": 4}}
    assert profile.imbalance_ratio == pytest.approx(12 / 7)
    n = 25
    assert profile.greyscale_share == pytest.approx(2 / n)
    assert profile.exact_duplicates == [["train/dogs/dogs_000.jpg", "val/dogs/copy.jpg"]]
    assert profile.near_duplicates == [
        ["train/cats/photo.png", "train/cats/photo_small.jpg"],
        ["train/dogs/scene.png", "val/dogs/scene_q30.jpg"],
    ]
    leaks = [{k: v for k, v in leak.items() if k != "distance"} for leak in profile.leakage]
    assert leaks == [
        {"a": "train/dogs/dogs_000.jpg", "b": "val/dogs/copy.jpg", "splits": "train/val", "kind": "exact"},
        {"a": "train/dogs/scene.png", "b": "val/dogs/scene_q30.jpg", "splits": "train/val", "kind": "near"},
    ]
    assert profile.leakage[0]["distance"] == 0
    assert 0 < profile.leakage[1]["distance"] <= 32

    # 17 of 48x40 (the copy too), 2 noise 64x64, 3 pictures 320x240, 256x192, 200x300, 300x200
    widths = [48] * 17 + [64] * 2 + [320] * 3 + [256, 200, 300]
    heights = [40] * 17 + [64] * 2 + [240] * 3 + [192, 300, 200]
    assert profile.image_sizes == {
        "width": {"min": 48, "median": float(np.median(widths)), "max": 320},
        "height": {"min": 40, "median": float(np.median(heights)), "max": 300},
        "small_share": pytest.approx(22 / n),
    }
    assert profile.seconds > 0
    assert json.loads(json.dumps(profile.to_dict()))["leakage"] == profile.leakage
    assert tree_snapshot(planted) == before


def test_exact_copies_within_a_split_are_not_leakage_nor_near(image_folder):
    root = image_folder("flat", {"cats": 4, "dogs": 4})
    for k in range(2):
        shutil.copyfile(root / "cats/cats_000.jpg", root / f"cats/again_{k}.jpg")
    spec = prepare_dataset(root, 0.2, 0, report_dir=None, hold_out=False)
    profile = profile_dataset(spec, workers=1)
    assert profile.exact_duplicates == [["cats/again_0.jpg", "cats/again_1.jpg", "cats/cats_000.jpg"]]
    assert profile.near_duplicates == []
    assert profile.leakage == []
    assert profile.imbalance_ratio == pytest.approx(6 / 4)
    assert profile.greyscale_share == 0.0


def test_leakage_names_train_before_val_before_test(image_folder):
    root = image_folder("three", split=["train", "val", "test"])
    shutil.copyfile(root / "train/cats/cats_000.jpg", root / "test/cats/from_train.jpg")
    shutil.copyfile(root / "val/dogs/dogs_001.jpg", root / "test/dogs/from_val.jpg")
    profile = profile_dataset(prepare_dataset(root, 0.2, 0, report_dir=None))
    assert [(leak["a"], leak["b"], leak["splits"]) for leak in profile.leakage] == [
        ("train/cats/cats_000.jpg", "test/cats/from_train.jpg", "train/test"),
        ("val/dogs/dogs_001.jpg", "test/dogs/from_val.jpg", "val/test"),
    ]
    assert set(profile.images_per_class) == {"train", "val", "test"}


def test_exif_rotation_swaps_reported_size(image_folder):
    root = image_folder("rot", {"cats": 2, "dogs": 2})
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: stored 300x100, shown 100x300
    make_image(root / "cats/turned.jpg", size=(300, 100), exif=exif)
    profile = profile_dataset(prepare_dataset(root, 0.2, 0, report_dir=None, hold_out=False))
    assert profile.image_sizes["width"]["max"] == 100
    assert profile.image_sizes["height"]["max"] == 300


def test_pictures_sharing_only_a_layout_are_not_near_duplicates(image_folder):
    root = image_folder("stripes", {"cats": 2, "dogs": 2})
    pictures = [_stripes(seed) for seed in range(4)]
    for seed, picture in enumerate(pictures):
        picture.save(root / f"cats/stripes_{seed}.jpg", quality=90)
    # pHash alone would pair them: a vertical-stripe picture has only one row of DCT coefficients
    hashes = [imagehash.phash(p, hash_size=16) for p in pictures]
    assert min(a - b for k, a in enumerate(hashes) for b in hashes[k + 1:]) <= 32
    profile = profile_dataset(prepare_dataset(root, 0.2, 0, report_dir=None, hold_out=False))
    assert profile.near_duplicates == []
    assert profile.exact_duplicates == []


@pytest.mark.integration
def test_profile_hymenoptera():
    spec = prepare_dataset(shared_dataset("hymenoptera"), 0.2, 0, report_dir=None)
    profile = profile_dataset(spec)
    assert set(profile.images_per_class["train"]) == {"ants", "bees"}
    assert profile.images_per_class == {split: spec.class_counts(split) for split in spec.splits}
    assert 1.0 <= profile.imbalance_ratio < 1.5
    assert 0 <= profile.image_sizes["small_share"] < 0.2
    assert profile.image_sizes["width"]["min"] < profile.image_sizes["width"]["median"] < profile.image_sizes["width"]["max"]
    assert profile.greyscale_share < 0.1
    assert profile.exact_duplicates == []
    json.dumps(profile.to_dict())


def test_pictures_too_small_for_the_hash_are_duplicates_only_when_byte_identical(image_folder):
    """At 32 px a re-save and a look-alike cannot be told apart (pHash reads 64x64): no near pairs there."""
    root = image_folder("tiny", split=["train", "val"])
    picture = _picture(3).resize((32, 32))
    picture.save(root / "train/cats/tiny.png")
    picture.save(root / "val/cats/tiny_resaved.jpg", quality=90)
    shutil.copyfile(root / "train/cats/tiny.png", root / "val/dogs/tiny_copy.png")
    profile = profile_dataset(prepare_dataset(root, 0.2, 0, report_dir=None))
    assert profile.near_duplicates == []
    assert [(leak["a"], leak["b"], leak["kind"]) for leak in profile.leakage] == [
        ("train/cats/tiny.png", "val/dogs/tiny_copy.png", "exact")]
