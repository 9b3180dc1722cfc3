"""The data stage as users meet it: which files count, how they decode, what is quarantined, which
mistakes stop the run (and how they are worded), how the split is drawn, and that the dataset
folder is only ever read. Fast: real small images, no model."""
from __future__ import annotations

import csv
import os
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import make_image, tree_snapshot
from tlpipe.data import QUARANTINE_REPORT, check_image, load_rgb, prepare_dataset, scan_folder
from tlpipe.data.dataset import check_files
from tlpipe.errors import TlpipeError

BOMB_WARNING = "ignore::PIL.Image.DecompressionBombWarning"


def rel(root: Path, paths) -> set[str]:
    return {Path(p).relative_to(root).as_posix() for p in paths}


def fit_paths(spec) -> set[str]:
    return {spec.relative(s.path) for samples in spec.splits.values() for s in samples}


def write_truncated_jpeg(path: Path) -> Path:
    """The first half of a real (noisy, so not tiny) JPEG's bytes."""
    full = make_image(path.with_name("full_" + path.name), color=(90, 120, 150), size=(160, 120), noise=60)
    data = full.read_bytes()
    full.unlink()
    path.write_bytes(data[: len(data) // 2])
    return path


# --------------------------------------------------------------------------------------- scanning


def test_scan_flat_class_folders(image_folder):
    root = image_folder("data", {"cats": 3, "dogs": 2})
    scanned = scan_folder(root)
    assert scanned.classes == ["cats", "dogs"]
    assert list(scanned.files) == ["train"]
    assert {c: len(ps) for c, ps in scanned.files["train"].items()} == {"cats": 3, "dogs": 2}
    assert scanned.files["train"]["cats"] == sorted(scanned.files["train"]["cats"])
    assert not scanned.skipped


def test_two_folders_naming_one_split_are_one_line(image_folder):
    root = image_folder("data", {"cats": 4, "dogs": 3}, split={"train": 4, "val": 2, "valid": 2})
    with pytest.raises(TlpipeError, match=r"has val/, valid/: all name the val split; merge them into one folder"):
        scan_folder(root)


@pytest.mark.parametrize("val_name", ["val", "valid", "validation", "Validation"])
def test_split_folders_with_val_aliases(image_folder, val_name):
    root = image_folder("data", {"cats": 4, "dogs": 3}, split={"train": 4, val_name: 2, "test": 1})
    scanned = scan_folder(root)
    assert set(scanned.files) == {"train", "val", "test"}
    assert scanned.classes == ["cats", "dogs"]
    assert all(p.parent.parent.name == val_name for ps in scanned.files["val"].values() for p in ps)

    spec = prepare_dataset(root)
    assert spec.val_from == "folder"
    assert spec.counts() == {"train": 8, "val": 4, "test": 2}  # no hold-out from train
    assert spec.class_counts("val") == {"cats": 2, "dogs": 2}


def test_extensions_any_letter_case(tmp_path):
    root = tmp_path / "data"
    names = ["a.JPG", "b.Png", "c.jpeg", "d.JPEG", "e.bmp", "f.TIF", "g.webp", "h.gif"]
    for i, name in enumerate(names):
        make_image(root / "cats" / name, color=(200, 30, 30), seed=i, noise=5)
        make_image(root / "dogs" / name, color=(30, 30, 200), seed=i, noise=5)
    scanned = scan_folder(root)
    assert rel(root / "cats", scanned.files["train"]["cats"]) == set(names)
    spec = prepare_dataset(root, hold_out=False)
    assert not spec.quarantined
    assert spec.class_counts() == {"cats": len(names), "dogs": len(names)}


def test_a_large_photo_is_checked_as_decoded_not_refused_as_a_bomb(tmp_path, monkeypatch):
    from tlpipe.data.images import check_image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5_000_000)  # as a 108-megapixel photo stands to Pillow's 89
    pixels = np.random.default_rng(0).integers(0, 256, (2400, 3000, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "photo.jpg", quality=80)
    Image.fromarray(pixels).save(tmp_path / "scan.png")
    assert check_image(tmp_path / "photo.jpg") is None  # decoded at half size (1500 x 1200), as training decodes it
    assert check_image(tmp_path / "scan.png").startswith("refused as a decompression bomb")  # no draft for a PNG


def test_hidden_non_image_and_loose_files_are_skipped_and_counted(image_folder):
    root = image_folder("data", {"cats": 3, "dogs": 3})
    make_image(root / "cats" / ".hidden.jpg")                     # hidden file in a class
    make_image(root / "cats" / ".thumbs" / "t1.jpg")              # hidden folder in a class
    make_image(root / "cats" / ".thumbs" / "t2.png")
    (root / ".DS_Store").write_bytes(b"\0\1")                     # hidden file in the root
    make_image(root / ".ipynb_checkpoints" / "x.jpg")            # hidden folder: not a class
    (root / "cats" / "notes.txt").write_text("not an image")      # non-image files
    (root / "dogs" / "Thumbs.db").write_bytes(b"\0" * 16)
    make_image(root / "loose.jpg")                                # files in the root: not samples
    (root / "README.md").write_text("# my data")
    latin1 = os.path.join(os.fsencode(root / "dogs"), b"caf\xe9.jpg")  # a name from a Latin-1 zip: no CSV could hold it
    with open(latin1, "wb") as f:
        f.write((root / "cats" / "cats_000.jpg").read_bytes())

    expected = Counter({"hidden file": 4, "not an image file": 2, "file outside a class folder": 2,
                        "file name not in UTF-8 (rename it)": 1})
    scanned = scan_folder(root)
    assert scanned.classes == ["cats", "dogs"]
    assert scanned.skipped == expected
    spec = prepare_dataset(root, hold_out=False)
    assert spec.skipped == expected
    assert not spec.quarantined
    assert fit_paths(spec) == {f"{c}/{c}_{k:03d}.jpg" for c in ("cats", "dogs") for k in range(3)}


# ------------------------------------------------------------------------------------ conversions


def _alpha_png(path):
    rgba = np.zeros((40, 48, 4), np.uint8)
    rgba[:, :24] = (200, 20, 20, 255)  # left: opaque red
    rgba[:, 24:] = (0, 0, 255, 0)      # right: fully transparent (its colour must not show)
    Image.fromarray(rgba, "RGBA").save(path)
    return {(5, 5): (200, 20, 20), (40, 5): (255, 255, 255)}


def _grey(path):
    make_image(path, color=(100, 100, 100), mode="L")
    return {(5, 5): (100, 100, 100)}


def _grey_alpha(path):
    make_image(path, color=(60, 0), mode="LA")  # grey 60, fully transparent
    return {(5, 5): (255, 255, 255)}


def _palette(path):
    make_image(path, color=(30, 160, 90), mode="P")
    return {(5, 5): (30, 160, 90)}


def _palette_transparent_gif(path):
    img = Image.new("P", (48, 40), 0)
    img.putpalette([0, 0, 0, 200, 20, 20] + [0] * 762)
    img.paste(1, (0, 0, 24, 40))
    img.save(path, transparency=0)  # palette index 0 (black, the right half) is transparent
    return {(5, 5): (200, 20, 20), (40, 5): (255, 255, 255)}


def _cmyk_jpeg(path):
    make_image(path, color=(0, 255, 255, 0), mode="CMYK", fmt="JPEG")  # pure red in CMYK
    return {(5, 5): (255, 0, 0)}


def _grey16(value):
    def write(path):
        Image.fromarray(np.full((40, 48), value, np.uint16)).save(path)
        assert Image.open(path).mode.startswith("I")  # really a 16-bit file
        return {(5, 5): (round(value / 257),) * 3}
    return write


def _exif_rotated_jpeg(path):
    left_red = np.zeros((40, 48, 3), np.uint8)
    left_red[:, :24] = (220, 20, 20)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to view
    Image.fromarray(left_red).save(path, exif=exif, quality=95)
    # 48x40 stored, 40x48 upright; the stored left half becomes the top half.
    return {"size": (40, 48), (20, 5): (220, 20, 20), (20, 42): (0, 0, 0)}


@pytest.mark.parametrize(
    "name, write",
    [
        ("grey.png", _grey),
        ("alpha.png", _alpha_png),
        ("grey_alpha.png", _grey_alpha),
        ("palette.png", _palette),
        ("palette_transparent.gif", _palette_transparent_gif),
        ("cmyk.jpg", _cmyk_jpeg),
        ("mid_grey16.png", _grey16(32896)),   # 32896 / 257 = 128: scaled, not clipped to white
        ("dark_grey16.png", _grey16(2570)),   # 10
        ("near_black16.png", _grey16(200)),   # ~0: a dark 16-bit image stays dark
        ("rotated.jpg", _exif_rotated_jpeg),
    ],
)
def test_load_rgb_converts_to_upright_8bit_rgb(tmp_path, name, write):
    path = tmp_path / name
    expected = write(path)
    img = load_rgb(path)
    assert img.mode == "RGB"
    pixels = np.asarray(img)
    assert pixels.dtype == np.uint8 and pixels.shape[2] == 3
    assert img.size == expected.pop("size", (48, 40))
    for xy, rgb in expected.items():
        assert np.abs(np.subtract(img.getpixel(xy), rgb)).max() <= 8, (name, xy, img.getpixel(xy), rgb)
    assert check_image(path) is None


def test_load_rgb_min_size_decodes_large_jpeg_smaller_but_not_below(tmp_path):
    path = make_image(tmp_path / "big.jpg", color=(10, 200, 10), size=(800, 600))
    img = load_rgb(path, min_size=140)
    assert img.mode == "RGB"
    assert min(img.size) >= 140 and img.size[0] < 800
    assert load_rgb(path).size == (800, 600)


# ------------------------------------------------------------------------------------- quarantine


def test_bad_files_are_quarantined_reported_and_left_out(image_folder, tmp_path):
    root = image_folder("data", {"cats": 4, "dogs": 4})
    write_truncated_jpeg(root / "cats" / "truncated.jpg")
    (root / "cats" / "empty.jpg").write_bytes(b"")
    (root / "dogs" / "x.png").write_text("this is not a png\n")
    bad = {"cats/truncated.jpg": "truncated", "cats/empty.jpg": "empty", "dogs/x.png": "not an image"}

    out = tmp_path / "out"
    spec = prepare_dataset(root, report_dir=out)
    reasons = {spec.relative(p): reason for p, reason in spec.quarantined}
    assert set(reasons) == set(bad)
    for path, word in bad.items():
        assert word in reasons[path] and "\n" not in reasons[path]
        assert check_image(root / path) == reasons[path]

    with open(out / QUARANTINE_REPORT, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["path", "reason"]
    assert {r[0] for r in rows[1:]} == set(bad) and len(rows) == 1 + len(bad)
    assert all(r[1] for r in rows[1:])

    assert fit_paths(spec).isdisjoint(bad)
    assert len(fit_paths(spec)) == 8


def test_clean_dataset_writes_header_only_report(image_folder, tmp_path):
    root = image_folder("data", {"cats": 3, "dogs": 3})
    spec = prepare_dataset(root, report_dir=tmp_path / "out")
    assert spec.quarantined == []
    assert (tmp_path / "out" / QUARANTINE_REPORT).read_text().splitlines() == ["path,reason"]


@pytest.mark.filterwarnings(BOMB_WARNING)
@pytest.mark.parametrize("size", [(40, 40), (100, 100)], ids=["over-limit", "over-twice-limit"])
def test_decompression_bomb_is_refused(tmp_path, monkeypatch, size):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # monkeypatch restores it after the test
    path = make_image(tmp_path / "bomb.png", size=size)
    with pytest.raises(Image.DecompressionBombError):
        load_rgb(path)
    assert "decompression bomb" in check_image(path)
    assert check_image(make_image(tmp_path / "ok.png", size=(30, 30))) is None  # 900 pixels: fine


@pytest.mark.filterwarnings(BOMB_WARNING)
def test_bombs_refused_by_threaded_check_without_touching_warning_filters(image_folder, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    root = image_folder("data", {"cats": 3, "dogs": 3}, size=(30, 30))
    bombs = [make_image(root / "dogs" / f"bomb_{i}.png", size=(40, 40), seed=i) for i in range(40)]
    filters = list(warnings.filters)
    reasons = check_files(sorted(root.rglob("*.*")), workers=4)
    assert set(reasons) == set(bombs)
    assert warnings.filters == filters  # the check changes no process-wide state
    spec = prepare_dataset(root, hold_out=False)
    assert {p for p, _ in spec.quarantined} == set(bombs)


# ------------------------------------------------------------------------------------------ errors


def _missing(tmp_path):
    return tmp_path / "no_such_folder", ["no_such_folder", "not found"]


def _a_file(tmp_path):
    return make_image(tmp_path / "photo.jpg"), ["photo.jpg", "not a folder"]


def _no_class_folders(tmp_path):
    root = tmp_path / "flat"
    make_image(root / "a.jpg")
    make_image(root / "b.jpg")
    return root, ["no class folders", str(root)]


def _three_cats(tmp_path):
    root = tmp_path / "data"
    for k in range(3):
        make_image(root / "cats" / f"{k}.jpg")
    return root


def _one_class(tmp_path):
    return _three_cats(tmp_path), ["cats", "at least 2 classes"]


def _all_bad_class(tmp_path):
    root = _three_cats(tmp_path)
    (root / "dogs").mkdir()
    (root / "dogs" / "empty.jpg").write_bytes(b"")
    (root / "dogs" / "fake.png").write_text("text")
    return root, ["'dogs'", "2 file(s) failed", QUARANTINE_REPORT]


def _all_bad_class_nested(tmp_path):
    root, _ = _all_bad_class(tmp_path)
    sub = root / "dogs" / "2019"  # images may sit in subfolders of a class folder
    sub.mkdir()
    (root / "dogs" / "fake.png").rename(sub / "fake.png")
    return root, ["'dogs'", "2 file(s) failed"]


def _class_without_images(tmp_path):
    root = _three_cats(tmp_path)
    (root / "dogs").mkdir()
    (root / "dogs" / "notes.txt").write_text("later")
    return root, ["'dogs'", "no image files"]


def _single_valid_image(tmp_path):
    root = tmp_path / "data"
    for k in range(5):
        make_image(root / "cats" / f"{k}.jpg")
    make_image(root / "dogs" / "0.jpg")
    (root / "dogs" / "broken.jpg").write_bytes(b"")
    return root, ["'dogs'", "at least 2 per class", "val/"]


def _no_train_folder(tmp_path):
    root = tmp_path / "data"
    for split in ("val", "test"):
        for c in ("cats", "dogs"):
            make_image(root / split / c / "0.jpg")
    return root, ["no train/", "val/", "test/", str(root)]


def _val_class_not_in_train(tmp_path):
    root = tmp_path / "data"
    for c in ("cats", "dogs"):
        make_image(root / "train" / c / "0.jpg")
        make_image(root / "val" / c / "0.jpg")
    make_image(root / "val" / "birds" / "0.jpg")
    return root, ["birds", "every class must have training images"]


@pytest.mark.parametrize(
    "build",
    [
        _missing, _a_file, _no_class_folders, _one_class, _all_bad_class, _all_bad_class_nested,
        _class_without_images, _single_valid_image, _no_train_folder,
        _val_class_not_in_train,
    ],
)
def test_layout_and_content_errors_are_one_line_tlpipe_errors(tmp_path, build):
    root, words = build(tmp_path)
    with pytest.raises(TlpipeError) as info:
        prepare_dataset(root, report_dir=tmp_path / "out")
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word in message, (word, message)


def test_report_is_written_before_failing_on_an_all_bad_class(tmp_path):
    root, _ = _all_bad_class(tmp_path)
    with pytest.raises(TlpipeError):
        prepare_dataset(root, report_dir=tmp_path / "out")
    rows = list(csv.reader(open(tmp_path / "out" / QUARANTINE_REPORT, newline="")))
    assert {r[0] for r in rows[1:]} == {"dogs/empty.jpg", "dogs/fake.png"}


# ------------------------------------------------------------------------------------------- split


@pytest.fixture
def three_classes(image_folder):
    return image_folder("data", {"birds": 10, "cats": 20, "dogs": 30}, size=(16, 16))


@pytest.mark.parametrize("val_fraction", [0.1, 0.2, 0.25, 0.5])
def test_split_is_stratified_and_respects_val_fraction(three_classes, val_fraction):
    spec = prepare_dataset(three_classes, val_fraction=val_fraction, seed=0)
    assert spec.val_from == "split"
    train, val = spec.splits["train"], spec.splits["val"]
    assert len(val) == int(np.ceil(val_fraction * 60))
    assert {s.path for s in train}.isdisjoint(s.path for s in val)
    assert len(train) + len(val) == 60
    for name, n in {"birds": 10, "cats": 20, "dogs": 30}.items():
        assert abs(spec.class_counts("val")[name] - val_fraction * n) <= 1, spec.class_counts("val")
        assert spec.class_counts("train")[name] >= 1


@pytest.mark.parametrize("val_fraction", [0.2, 0.6])
def test_a_held_out_split_keeps_every_class_on_both_sides_even_a_class_of_two(image_folder, val_fraction):
    root = image_folder("data", {**{f"rare{k}": 2 for k in range(10)}, "common": 100}, size=(8, 8))
    spec = prepare_dataset(root, val_fraction=val_fraction, seed=0)
    assert min(spec.class_counts("val").values()) >= 1 and min(spec.class_counts("train").values()) >= 1
    assert len(spec.splits["train"]) + len(spec.splits["val"]) == 120


def test_split_is_seeded_and_ordered(three_classes):
    def split(seed):
        spec = prepare_dataset(three_classes, seed=seed)
        return spec.splits["train"], spec.splits["val"]

    first, again, other = split(0), split(0), split(1)
    assert first == again
    assert {s.path for s in first[1]} != {s.path for s in other[1]}
    for samples in (*first, *other):
        assert samples == sorted(samples, key=lambda s: (s.label, str(s.path)))


def test_val_folder_means_no_hold_out(image_folder):
    root = image_folder("data", {"cats": 5, "dogs": 5}, split={"train": 5, "val": 2})
    spec = prepare_dataset(root, val_fraction=0.5)
    assert spec.val_from == "folder"
    assert spec.class_counts("train") == {"cats": 5, "dogs": 5}
    assert all(spec.relative(s.path).startswith("train/") for s in spec.splits["train"])
    assert all(spec.relative(s.path).startswith("val/") for s in spec.splits["val"])


def test_hold_out_can_be_turned_off(image_folder):
    root = image_folder("data", {"cats": 1, "dogs": 1})  # one per class is fine without a split
    spec = prepare_dataset(root, hold_out=False)
    assert list(spec.splits) == ["train"] and spec.counts() == {"train": 2}


# ----------------------------------------------------------------------------------- read-only


@pytest.mark.parametrize("split", [None, {"train": 4, "val": 2}])
def test_dataset_folder_is_never_written_to(image_folder, tmp_path, split):
    root = image_folder("data", {"cats": 4, "dogs": 4}, split=split)
    class_dir = root / ("train/cats" if split else "cats")
    write_truncated_jpeg(class_dir / "truncated.jpg")
    (class_dir / "empty.jpg").write_bytes(b"")
    (class_dir / ".hidden.jpg").write_bytes(b"")
    (root / "notes.txt").write_text("notes")
    before = tree_snapshot(root)

    spec = prepare_dataset(root, report_dir=tmp_path / "out")
    for samples in spec.splits.values():
        for s in samples:
            load_rgb(s.path)

    assert len(spec.quarantined) == 2
    with open(tmp_path / "out" / QUARANTINE_REPORT, newline="") as f:  # the report lands outside the dataset
        assert sorted(Path(row["path"]).name for row in csv.DictReader(f)) == ["empty.jpg", "truncated.jpg"]
    assert tree_snapshot(root) == before


def test_folders_beside_the_split_folders_are_left_out_and_reported(tmp_path):
    root = tmp_path / "data"
    for split in ("train", "val"):
        for c in ("cats", "dogs"):
            make_image(root / split / c / "0.jpg")
    make_image(root / "test_simple" / "cats" / "0.jpg")  # an extra split, as in bloodcells
    spec = prepare_dataset(root)
    assert spec.counts() == {"train": 2, "val": 2}
    assert spec.skipped["folder beside train/ ignored (test_simple/)"] == 1
