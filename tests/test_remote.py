"""Datasets given as a URL (fsspec): a real in-memory store and local ``file://`` URLs."""
from __future__ import annotations

import json
from pathlib import Path

import fsspec
import pytest

from conftest import FAST, dataset, one_line, tlpipe
from tlpipe.data.remote import local_copy


@pytest.fixture
def store(tmp_path, monkeypatch):
    """fsspec's in-memory store holding ``/shop/pets/{train,val}/{cats,dogs}/*.jpg``; copies go to a
    cache under tmp_path."""
    monkeypatch.setenv("TLPIPE_DATA_CACHE", str(tmp_path / "cache"))
    fs = fsspec.filesystem("memory")
    source = dataset(tmp_path / "pets", ["cats", "dogs"], split={"train": 6, "val": 4})
    fs.put(str(source), "/shop/pets", recursive=True)
    yield fs
    fs.rm("/shop", recursive=True)


def test_a_fit_reads_a_dataset_from_a_store_through_its_local_copy(store, tmp_path):
    result = tlpipe("fit", "memory://shop/pets", "-o", tmp_path / "out", *FAST)
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["data"].startswith(str(tmp_path / "cache")) and summary["val_accuracy"] == 1.0
    assert sorted(store.find("/shop/pets")) == sorted(f"/shop/pets/{s}/{c}/{k}.jpg" for s, n in (("train", 6), ("val", 4))
                                                      for c in ("cats", "dogs") for k in range(n))  # the store untouched


def test_a_second_copy_fetches_only_what_changed_and_drops_what_is_gone(store):
    copy = local_copy("memory://shop/pets")
    kept, changed, gone = (copy / "train" / "cats" / f"{k}.jpg" for k in range(3))
    kept_mtime = kept.stat().st_mtime_ns
    store.pipe("/shop/pets/train/cats/1.jpg", b"other bytes")
    store.rm("/shop/pets/train/cats/2.jpg")
    assert local_copy("memory://shop/pets") == copy
    assert changed.read_bytes() == b"other bytes" and not gone.exists()
    assert kept.stat().st_mtime_ns == kept_mtime  # not fetched again


def test_a_killed_copy_resumes_with_the_files_it_lacks(store):
    copy = local_copy("memory://shop/pets")
    whole = (copy / "val" / "dogs" / "0.jpg").read_bytes()
    (copy.parent / "listing.json").unlink()  # killed before any record was written...
    (copy / "val" / "dogs" / "0.jpg").write_bytes(whole[:10])  # ...while a file was half written
    kept_mtime = (copy / "val" / "dogs" / "1.jpg").stat().st_mtime_ns
    local_copy("memory://shop/pets")
    assert (copy / "val" / "dogs" / "0.jpg").read_bytes() == whole
    assert (copy / "val" / "dogs" / "1.jpg").stat().st_mtime_ns == kept_mtime


def test_a_copy_cut_short_after_a_change_in_the_store_fetches_the_change_when_run_again(store, monkeypatch):
    import shutil

    from tlpipe.data import remote
    from tlpipe.errors import TlpipeError

    copy = local_copy("memory://shop/pets")
    old = (copy / "train" / "cats" / "0.jpg").read_bytes()
    store.pipe("/shop/pets/train/cats/0.jpg", old[::-1])  # the same size, other bytes
    store.rm("/shop/pets/val/dogs/3.jpg")
    real_get = type(store).get
    monkeypatch.setattr(type(store), "get", lambda *a, **k: (_ for _ in ()).throw(OSError("connection reset")))
    with pytest.raises(TlpipeError, match="run again to resume"):
        local_copy("memory://shop/pets")  # the network fails before the changed file came
    monkeypatch.setattr(type(store), "get", real_get)
    local_copy("memory://shop/pets")
    assert (copy / "train" / "cats" / "0.jpg").read_bytes() == old[::-1] and not (copy / "val" / "dogs" / "3.jpg").exists()

    shutil.rmtree(copy)  # the copy removed by hand, its record left
    assert local_copy("memory://shop/pets") == copy and (copy / "train" / "cats" / "1.jpg").is_file()
    assert remote.data_cache() in copy.parents and copy.name == "pets"


def test_a_copy_that_fails_midway_leaves_every_file_whole_under_its_name(store, monkeypatch):
    from tlpipe.errors import TlpipeError

    copy = local_copy("memory://shop/pets")
    old = (copy / "train" / "cats" / "0.jpg").read_bytes()
    store.pipe("/shop/pets/train/cats/0.jpg", old[::-1])

    def half_then_reset(self, sources, targets, **kwargs):  # the network fails with half a file written
        Path(targets[0]).write_bytes(old[::-1][:10])
        raise OSError("connection reset")

    real_get = type(store).get
    monkeypatch.setattr(type(store), "get", half_then_reset)
    with pytest.raises(TlpipeError, match="run again to resume"):
        local_copy("memory://shop/pets")
    assert (copy / "train" / "cats" / "0.jpg").read_bytes() == old  # a fit reading the copy meanwhile sees whole files
    monkeypatch.setattr(type(store), "get", real_get)
    local_copy("memory://shop/pets")
    assert (copy / "train" / "cats" / "0.jpg").read_bytes() == old[::-1] and not list(copy.rglob("*.tlpipe-part"))


def test_a_file_url_is_the_local_folder_itself(bundle_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("TLPIPE_DATA_CACHE", str(tmp_path / "cache"))
    data, bundle = bundle_dir
    result = tlpipe("evaluate", bundle, data.resolve().as_uri(), "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["n_images"] == 12 and not (tmp_path / "cache").exists()


def test_a_url_that_cannot_be_read_is_one_line(store, tmp_path):
    one_line(tlpipe("fit", "nosuchstore://bucket/data", "-o", tmp_path / "a"), "cannot read nosuchstore://bucket/data")
    one_line(tlpipe("fit", "memory://shop/nothing", "-o", tmp_path / "b"), "nothing at memory://shop/nothing")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
