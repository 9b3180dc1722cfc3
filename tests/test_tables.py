"""Datasets given as a table of image paths and labels (CSV, TSV, Parquet, a DataFrame): the same
checked DatasetSpec as a class folder, every unusable row quarantined or refused in one line."""
from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pandas as pd
import pytest

from conftest import FAST, class_color, make_image, one_line, shared_dataset, tlpipe, tree_snapshot
from tlpipe.data import prepare_dataset
from tlpipe.data.table import LabelTable
from tlpipe.errors import TlpipeError


def _images(root: Path, classes=("cat", "dog"), per_split=(("train", 6), ("val", 3))) -> list[dict]:
    """Small noisy images in one flat folder; the rows a table of them would hold."""
    rows = []
    for c, name in enumerate(classes):
        for split, n in per_split:
            for k in range(n):
                path = make_image(root / "images" / f"{name}_{split}_{k}.jpg", class_color(c), noise=20, seed=[c, k])
                rows.append({"file": path.relative_to(root).as_posix(), "label": name, "split": split})
    return rows


def _csv(path: Path, rows: list[dict], columns=("file", "label", "split")) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def _quarantined(spec) -> dict[str, str]:
    return {spec.relative(path): why for path, why in spec.quarantined}


def test_a_csv_tsv_parquet_and_dataframe_give_the_same_spec_as_the_rows_say(tmp_path):
    rows = _images(tmp_path)
    frame = pd.DataFrame(rows)
    frame.to_csv(tmp_path / "labels.tsv", sep="\t", index=False)
    frame.to_parquet(tmp_path / "labels.parquet")
    specs = [prepare_dataset(_csv(tmp_path / "labels.csv", rows)), prepare_dataset(tmp_path / "labels.tsv"),
             prepare_dataset(tmp_path / "labels.parquet"), prepare_dataset(LabelTable(frame, root=tmp_path))]
    for spec in specs:
        assert spec.classes == ["cat", "dog"] and spec.counts() == {"train": 12, "val": 6} and spec.val_from == "folder"
        assert {(spec.relative(s.path), spec.classes[s.label]) for s in spec.splits["val"]} == {
            (r["file"], r["label"]) for r in rows if r["split"] == "val"}


def test_a_table_written_on_windows_finds_its_images(tmp_path):
    rows = [dict(r, file=r["file"].replace("/", "\\")) for r in _images(tmp_path)]  # images\cat_train_0.jpg
    spec = prepare_dataset(_csv(tmp_path / "labels.csv", rows))
    assert spec.counts() == {"train": 12, "val": 6} and not spec.quarantined


def test_a_label_spelt_composed_and_decomposed_is_one_class(tmp_path):
    import unicodedata

    rows = [dict(r, label=unicodedata.normalize("NFD" if k % 2 else "NFC", {"cat": "café", "dog": "thé"}[r["label"]]))
            for k, r in enumerate(_images(tmp_path))]
    spec = prepare_dataset(_csv(tmp_path / "labels.csv", rows))
    assert spec.classes == ["café", "thé"] and spec.counts() == {"train": 12, "val": 6}


def test_without_a_split_column_val_is_held_out_and_unicode_labels_are_classes(tmp_path):
    rows = [dict(r, label={"cat": "猫 🐱", "dog": "chien"}[r["label"]]) for r in _images(tmp_path)]
    spec = prepare_dataset(_csv(tmp_path / "labels.csv", rows, ("file", "label")), val_fraction=0.25)
    assert spec.classes == ["chien", "猫 🐱"] and spec.val_from == "split" and sum(spec.counts().values()) == 18


def test_unusable_rows_are_quarantined_with_their_row_and_the_table_folder_is_never_written(tmp_path):
    rows = _images(tmp_path)
    make_image(tmp_path.parent / f"{tmp_path.name}-outside.jpg")
    (tmp_path / "images" / "broken.jpg").write_bytes(b"not a jpeg")
    (tmp_path / "images" / "notes.txt").write_text("hello")
    rows += [
        {"file": "images/missing.jpg", "label": "cat", "split": "train"},
        {"file": f"../{tmp_path.name}-outside.jpg", "label": "cat", "split": "train"},
        {"file": "images/broken.jpg", "label": "dog", "split": "train"},
        {"file": "images/notes.txt", "label": "dog", "split": "train"},
        {"file": "images/cat_train_0.jpg", "label": "cat", "split": "train"},  # the same row again: counted, kept once
        {"file": "images/dog_train_0.jpg", "label": "cat", "split": "train"},  # the same file, another label
        {"file": "images/cat_val_0.jpg", "label": "", "split": "val"},  # listed above with its label: a conflict
        {"file": "", "label": "dog", "split": "train"},
    ]
    table = _csv(tmp_path / "labels.csv", rows)
    before = tree_snapshot(tmp_path)
    spec = prepare_dataset(table, report_dir=tmp_path.parent / f"{tmp_path.name}-report")
    assert tree_snapshot(tmp_path) == before
    bad = _quarantined(spec)
    assert bad["images/missing.jpg"] == "no such file (row 20)"
    assert bad[f"../{tmp_path.name}-outside.jpg"].startswith("path ") and "leaves the image root" in bad[f"../{tmp_path.name}-outside.jpg"]
    assert "images/broken.jpg" in bad and bad["images/notes.txt"] == "not an image file (row 23)"
    assert bad["images/dog_train_0.jpg"].startswith("listed twice with different labels or splits (rows")
    assert bad["images/cat_val_0.jpg"].startswith("listed twice")
    assert spec.skipped == {"duplicate table row": 1, "table row without a path": 1}
    assert spec.counts() == {"train": 11, "val": 5}  # dog_train_0 and cat_val_0 out
    report = (tmp_path.parent / f"{tmp_path.name}-report" / "quarantine.csv").read_text(encoding="utf-8")
    assert "images/missing.jpg,no such file (row 20)" in report


@pytest.mark.parametrize("case, row, columns, fragments", [
    ("no label column", None, ("file", "split"), ["has no label column", "--label-col", "file, split"]),
    ("a bad split", {"label": "cat", "split": "holdout"}, None, ["row 20", "'holdout' is not train, val or test"]),
    ("a label only in val", {"label": "bird", "split": "val"}, None, ["'bird' appear only in val/test rows", "add train rows"]),
    ("a control character", {"label": "bad\x07name", "split": "train"}, None, ["label 'bad\\x07name'", "rename the label"]),
])
def test_a_table_that_cannot_be_used_is_one_line_naming_the_row_or_column(tmp_path, case, row, columns, fragments):
    data, out = tmp_path / "data", tmp_path / "out"
    rows = _images(data)  # rows 2 to 19 (the header is row 1)
    if row:  # row 20, a picture of its own
        rows.append({"file": make_image(data / "images" / "extra.jpg").relative_to(data).as_posix(), **row})
    table = _csv(data / "labels.csv", rows, columns or ("file", "label", "split"))
    one_line(tlpipe("fit", str(table), "-o", str(out), *FAST), *fragments)
    assert not out.exists()  # a fit that wrote nothing leaves nothing, not a lock and an owner record


def test_a_fit_that_failed_on_its_data_leaves_its_quarantine_and_no_claim_on_the_folder(tmp_path):
    rows, out = _images(tmp_path / "data"), tmp_path / "out"
    broken = [dict(r, file=f"gone/{k}.jpg") if r["label"] == "dog" else r for k, r in enumerate(rows)]
    one_line(tlpipe("fit", str(_csv(tmp_path / "data" / "broken.csv", broken)), "-o", str(out), *FAST),
             "class 'dog' has no valid training image")
    assert sorted(p.name for p in out.iterdir()) == [".tlpipe-fit.json", ".tlpipe.lock", "quarantine.csv"]
    assert "key" not in json.loads((out / ".tlpipe-fit.json").read_text())  # tlpipe's folder, claimed by no fit
    result = tlpipe("fit", str(_csv(tmp_path / "data" / "fixed.csv", rows)), "-o", str(out), *FAST)
    assert result.exit_code == 0, result.output  # other data, yet no --overwrite needed: the failed fit owned nothing


def test_unreadable_and_missing_tables_and_misnamed_columns_are_one_line(tmp_path):
    _images(tmp_path)
    one_line(tlpipe("fit", str(tmp_path / "nope.csv"), *FAST), "table not found", "nope.csv")
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    one_line(tlpipe("fit", str(tmp_path / "bad.parquet"), *FAST), "cannot read the table", "bad.parquet")
    table = _csv(tmp_path / "labels.csv", _images(tmp_path))
    one_line(tlpipe("fit", str(table), "--label-col", "kind", *FAST), "no column 'kind' (--label-col)", "file, label, split")
    one_line(tlpipe("fit", str(tmp_path / "images"), "--label-col", "label", *FAST), "--label-col is for a table")
    one_line(tlpipe("fit", str(table), "-o", str(tmp_path), *FAST), "holds the image folder", "beside it")


def test_fit_of_a_table_with_named_columns_and_root_records_it_and_predicts(tmp_path):
    data = tmp_path / "data"
    rows = [{"picture": r["file"].removeprefix("images/"), "kind": r["label"], "fold": r["split"]}
            for r in _images(data)]
    (data / "meta").mkdir()
    table = _csv(data / "meta" / "train.csv", rows, ("picture", "kind", "fold"))
    out = tmp_path / "out"
    result = tlpipe("fit", str(table), "--root", str(data / "images"), "--path-col", "picture",
                    "--label-col", "kind", "--split-col", "fold", "-o", str(out), *FAST)
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert summary["data"] == str(table.resolve()) and summary["data_root"] == str((data / "images").resolve())
    assert summary["classes"] == ["cat", "dog"] and summary["splits"] == {"train": 12, "val": 6}
    assert summary["val_accuracy"] == 1.0
    with (out / "val_predictions.csv").open(encoding="utf-8") as f:
        assert {row["path"] for row in csv.DictReader(f)} == {r["picture"] for r in rows if r["fold"] == "val"}
    predicted = tlpipe("predict", str(out / "model"), str(data / "images" / "dog_val_1.jpg"), "-f", "json")
    assert json.loads(predicted.stdout)[0]["predictions"][0]["label"] == "dog"
    assert tlpipe("report", str(out)).exit_code == 0  # the page rebuilt from the table's rows
    columns = ["--root", str(data / "images"), "--path-col", "picture", "--label-col", "kind", "--split-col", "fold"]
    scored = tlpipe("evaluate", str(out / "model"), str(table), *columns, "--split", "val", "--json")
    assert scored.exit_code == 0, scored.output
    metrics = json.loads(scored.stdout)
    assert (metrics["split"], metrics["n_images"], metrics["accuracy"]) == ("val", 6, summary["val_accuracy"])


def test_a_csv_of_hymenoptera_holds_the_very_splits_and_labels_of_its_folders(tmp_path):
    root = shared_dataset("hymenoptera")
    rows = [{"path": p.relative_to(root).as_posix(), "label": p.parent.name, "split": p.parts[-3]}
            for p in sorted(root.glob("*/*/*")) if p.is_file()]
    folder, table = prepare_dataset(root), prepare_dataset(LabelTable(_csv(tmp_path / "h.csv", rows, ("path", "label", "split")), root=root))
    assert table.classes == folder.classes and table.val_from == folder.val_from
    assert table.splits == folder.splits and _quarantined(table) == _quarantined(folder)


def test_prepare_dataset_refuses_a_table_whose_root_is_not_a_folder(tmp_path):
    table = _csv(tmp_path / "labels.csv", _images(tmp_path))
    with pytest.raises(TlpipeError, match="is not a folder: give the folder the paths are relative to with --root"):
        prepare_dataset(LabelTable(table, root=tmp_path / "nowhere"))


def test_one_file_under_several_spellings_is_one_file_and_hostile_names_are_quarantined(tmp_path):
    rows = _images(tmp_path)
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    (tmp_path / "images" / "away.jpg").symlink_to(make_image(tmp_path.parent / f"{tmp_path.name}-away.jpg"))
    frame = pd.DataFrame(rows + [
        {"file": str(tmp_path / "images" / "cat_train_1.jpg"), "label": "dog", "split": "train"},  # absolute: the same file
        {"file": "images/../images/dog_train_1.jpg", "label": "dog", "split": "val"},  # another split: a leak
        {"file": "loop", "label": "cat", "split": "train"},
        {"file": "a\x00b.jpg", "label": "cat", "split": "train"},
        {"file": "x" * 300 + ".jpg", "label": "cat", "split": "train"},
        {"file": "images/away.jpg", "label": "cat", "split": "train"},  # a link out of the root
    ], index=range(100, 124))
    spec = prepare_dataset(LabelTable(frame, root=tmp_path))
    bad = _quarantined(spec)
    assert bad["images/cat_train_1.jpg"] == "listed twice with different labels or splits (rows 101 and 118)"
    assert bad["images/dog_train_1.jpg"].startswith("listed twice")
    assert bad["loop"].startswith("unreadable path") and bad["x" * 300 + ".jpg"].startswith("unreadable path")
    assert bad["a\x00b.jpg"].startswith("unreadable path (ValueError")
    assert "leaves the image root" in bad["images/away.jpg"]
    assert spec.counts() == {"train": 10, "val": 6}


@pytest.mark.parametrize("labels, fragment", [
    ({"cat": "cat", "dog": "cat"}, "has 1 label(s) in its train rows ('cat'): a classifier needs at least two"),
    ({"cat": "cat", "dog": "ghost"}, "class 'ghost' has no valid training image: its 6 file(s) failed the check"),
])
def test_train_rows_that_leave_fewer_than_two_usable_labels_are_one_line(tmp_path, labels, fragment):
    rows = [dict(r, label=labels[r["label"]]) for r in _images(tmp_path)]
    if "ghost" in labels.values():  # every ghost picture missing: the label has rows but no usable image
        rows = [dict(r, file=f"gone/{k}.jpg") if r["label"] == "ghost" else r for k, r in enumerate(rows)]
    with pytest.raises(TlpipeError, match=re.escape(fragment)):
        prepare_dataset(_csv(tmp_path / "labels.csv", rows))


def test_a_dataframe_fits_through_the_api_into_the_default_output_beside_its_images(tmp_path, monkeypatch):
    import tlpipe
    from conftest import tlpipe as tlpipe_cli
    from tlpipe.config import load_config

    frame = pd.DataFrame(_images(tmp_path)).rename(columns={"file": "path"})
    monkeypatch.chdir(tmp_path)  # the images' root, the working folder, and where runs/ goes by default
    config = load_config("quick", strategy="linear", num_workers=0, device="cpu", tuning={"trials": 0})
    result = tlpipe.fit(frame, config, tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert result.output_dir.parent == Path("runs") and result.output_dir.name.startswith("table-")
    assert result.summary["data_table"]["file"] is False and result.summary["val_accuracy"] == 1.0
    assert tlpipe_cli("report", str(result.output_dir)).exit_code == 0  # rebuilt later: the rows are not kept
    assert "DataFrame, of which tlpipe keeps no copy" in (result.output_dir / "report.html").read_text(encoding="utf-8")


def test_a_relabelled_table_starts_a_study_of_its_own_and_no_two_datasets_share_one(tmp_path):
    """A label fixed in the table (one label_issues.csv flagged, say) and the fit run again must not
    reuse trials scored on the old labels; nor may two datasets meet in one shared storage."""
    from tlpipe import tuning
    from tlpipe.config import load_config

    def objective(trial, config, on_epoch):
        return config.finetune.lr

    rows = _images(tmp_path)
    table = _csv(tmp_path / "labels.csv", rows)
    labels = prepare_dataset(table).identity
    rows[0] = {**rows[0], "label": "dog"}  # the same files, one label fixed
    relabelled = prepare_dataset(_csv(table, rows)).identity
    other = prepare_dataset(_csv(tmp_path / "other.csv", rows[1:])).identity
    assert len({labels, relabelled, other}) == 3 and prepare_dataset(table).identity == relabelled

    config, storage = load_config("default", strategy="partial", tuning={"trials": 2}), tmp_path / "out"
    first = tuning.tune(config, storage, objective, data=labels)
    assert tuning.tune(config, storage, objective, data=labels).summary["finished_before"] == 2  # a re-run continues
    for data in (relabelled, other):
        fresh = tuning.tune(config, storage, objective, data=data)
        assert fresh.summary["finished_before"] == 0 and fresh.study.study_name != first.study.study_name
