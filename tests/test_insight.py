"""What a fit says about the data: wrong labels (label_issues.csv, --exclude-label-issues) and the
learning curve (what more images would buy)."""
from __future__ import annotations

import csv
import json
import shutil
from urllib.parse import parse_qs, urlsplit

import numpy as np
from PIL import Image

from conftest import FAST, class_color, dataset, make_image, one_line, tlpipe
from tlpipe.insight.learning_curve import FRACTIONS, learning_curve, nested_subsets

CLASSES = ["rouge", "vert ü", "bleu"]


def _listing(root):
    return sorted((p.relative_to(root).as_posix(), p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*"))


def test_a_fit_names_the_train_images_filed_under_the_wrong_class_and_can_train_without_them(tmp_path):
    root = dataset(tmp_path / "colours", CLASSES, split={"train": 30, "val": 5})
    planted = {f"train/{CLASSES[1]}/red-{k}.jpg" for k in range(2)}  # red images filed under green
    for k, name in enumerate(sorted(planted)):
        make_image(root / name, class_color(0), size=(40, 32), noise=20, seed=[99, k])
    before = _listing(root)

    result = tlpipe("fit", root, "-o", tmp_path / "out", *FAST)
    assert result.exit_code == 0, result.output
    with (tmp_path / "out" / "label_issues.csv").open(encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert {row["path"] for row in rows} == planted
    assert {(row["given"], row["suggested"]) for row in rows} == {(CLASSES[1], CLASSES[0])}
    assert all(0 <= float(row["quality"]) < 0.5 for row in rows)
    assert "2 of 92 train images have a label their codes contradict" in " ".join(result.output.split())
    page = (tmp_path / "out" / "report.html").read_text(encoding="utf-8")
    assert page.count(f"given <b>{CLASSES[1]}</b>, looks like <b>{CLASSES[0]}</b>") == 2 and page.count('<img alt="train/') == 2

    result = tlpipe("fit", root, "-o", tmp_path / "clean", "--exclude-label-issues", *FAST)
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "clean" / "summary.json").read_text())
    assert summary["splits"]["train"] == 90 and summary["label_issues"]["excluded"]["images"] == 2
    assert summary["val_accuracy"] == 1.0
    assert _listing(root) == before  # the dataset is never touched


def test_a_class_of_one_train_image_still_gets_a_learning_curve(tmp_path):
    root = dataset(tmp_path / "colours", CLASSES, split={"train": 24, "val": 4})
    for path in sorted((root / "train" / CLASSES[2]).iterdir())[1:]:
        path.unlink()  # one image: too few to hold any out for the label check
    result = tlpipe("fit", root, "-o", tmp_path / "out", *FAST)
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert "note" in summary["label_issues"] and "sentence" in summary["learning_curve"], summary["learning_curve"]


def test_the_learning_curve_is_nested_and_says_what_twice_the_images_would_give():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 32))
    draw = lambda n: (lambda y: (centres[y] * 0.35 + rng.normal(size=(n, 32)), y))(rng.integers(0, 4, n))  # noqa: E731
    (X, y), (X_val, y_val) = draw(240), draw(400)

    subsets = nested_subsets(y, FRACTIONS, seed=0)
    assert all(set(small) <= set(large) for small, large in zip(subsets, subsets[1:]))
    assert all(len(np.unique(y[rows])) == 4 for rows in subsets) and len(subsets[-1]) == len(y)

    curve = learning_curve(X, y, X_val, y_val, "logreg", 1.0)
    assert curve.sizes == sorted(curve.sizes) and curve.sizes[-1] == 240
    assert curve.scores[-1] > curve.scores[0] and curve.metric == "accuracy"  # this data rewards more images
    double, quadruple = curve.predicted["2x"], curve.predicted["4x"]
    assert double["images"] == 480 and double["low"] <= double["score"] <= double["high"]
    assert curve.scores[-1] <= double["score"] <= quadruple["score"] <= 1
    assert "(240 -> 480)" in curve.sentence() and "all" not in curve.predicted
    sampled = learning_curve(X, y, X_val, y_val, "logreg", 1.0, whole=720)  # train a sample the time limit allowed
    assert sampled.predicted["all"]["images"] == 720
    assert double["score"] <= sampled.predicted["all"]["score"] <= quadruple["score"]  # 3x: between 2x and 4x
    assert "all 720 train images, not only the sample the time limit allowed" in sampled.sentence()
    assert learning_curve(X[:20], y[:20], X_val, y_val, "logreg", 1.0) is None  # too few for a curve
    one_each = np.arange(40)  # 40 classes of one image: every fraction is the same 40, no slope to fit
    assert learning_curve(X[:40], one_each, X_val[:40], one_each, "logreg", 1.0) is None


def test_on_a_large_train_the_curve_is_drawn_on_a_part_and_extrapolated_to_all_of_it(monkeypatch):
    import tlpipe.insight.learning_curve as curves

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 32))
    draw = lambda n: (lambda y: (centres[y] * 0.35 + rng.normal(size=(n, 32)), y))(rng.integers(0, 4, n))  # noqa: E731
    (X, y), (X_val, y_val) = draw(240), draw(400)
    monkeypatch.setattr(curves, "CURVE_MAX_IMAGES", 120)  # 240 train images stand in for tens of thousands
    curve = curves.learning_curve(X, y, X_val, y_val, "logreg", 1.0)
    assert curve.sizes[-1] == 120 and curve.images == 240 and curve.predicted["2x"]["images"] == 480
    assert curve.scores[-1] <= curve.now <= curve.predicted["2x"]["score"]  # the law's figure at 240, between
    assert "(240 -> 480)" in curve.sentence() and "drawn on up to 120 of them" in curve.sentence()


def test_the_learning_curve_of_a_multi_label_set_is_in_map_and_nested():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 32))
    draw = lambda n: (lambda Y: (Y @ centres * 0.3 + rng.normal(size=(n, 32)), Y))(rng.integers(0, 2, (n, 4)))  # noqa: E731
    (X, Y), (X_val, Y_val) = draw(240), draw(300)

    subsets = nested_subsets(Y, FRACTIONS, seed=0)
    assert all(set(small) <= set(large) for small, large in zip(subsets, subsets[1:])) and len(subsets[-1]) == 240
    curve = learning_curve(X, Y, X_val, Y_val, "logreg", 1.0)
    assert curve.metric == "mAP" and curve.scores[-1] > curve.scores[0]  # this data rewards more images
    double = curve.predicted["2x"]
    assert double["images"] == 480 and double["low"] <= double["score"] <= double["high"] <= 1
    assert "points of val mAP" in curve.sentence()


def _checkerboards(folder, n: int = 4):
    """High-contrast patterns: nothing like the flat colour classes a bundle_dir model knows."""
    folder.mkdir(parents=True)
    for k in range(n):
        cells = (np.indices((40, 32)).sum(axis=0) // (2 + k)) % 2
        Image.fromarray((cells[..., None] * [255, 40 * k, 255 - 60 * k]).astype(np.uint8)).save(folder / f"board{k}.png")
    return folder


def test_an_image_of_no_known_class_is_answered_unknown_by_predict_and_the_onnx_export(bundle_dir, tmp_path):
    root, bundle = bundle_dir
    boards = _checkerboards(tmp_path / "boards")
    result = tlpipe("predict", bundle, boards, root / "cats", "--format", "json", "--workers", "0")
    assert result.exit_code == 0, result.output
    answered = json.loads(result.stdout)
    assert all(r["unknown"] for r in answered if "/boards/" in r["path"])
    assert not any(r["unknown"] for r in answered if "/cats/" in r["path"]) and len(answered) == 4 + 6
    assert all(r["predictions"] for r in answered)  # what it would have said stays

    kept = tlpipe("predict", bundle, boards, "--format", "json", "--no-reject", "--workers", "0")
    assert not any(r["unknown"] for r in json.loads(kept.stdout))

    exported = tlpipe("export", bundle, "--format", "onnx", "--out", tmp_path / "m.onnx", "--check", boards)
    assert exported.exit_code == 0, exported.output
    import onnxruntime as ort
    from tlpipe.bundle.graph import pixels
    from tlpipe.bundle.folder import load_bundle

    loaded = load_bundle(bundle, "cpu")
    threshold = json.loads((tmp_path / "m.onnx.json").read_text())["preprocessing"]["unknown"]["threshold"]
    images = sorted(boards.iterdir()) + sorted((root / "cats").iterdir())
    _, scores = ort.InferenceSession(str(tmp_path / "m.onnx")).run(None, {"images": pixels(loaded, images)})
    assert list(scores > threshold) == [True] * 4 + [False] * (len(images) - 4)
    assert np.allclose(scores, loaded.unknown_scores(loaded.codes(images))[0], rtol=1e-4)


def test_a_bundle_whose_unknown_detector_was_altered_is_refused_in_one_line(bundle_dir, tmp_path):
    root, bundle = bundle_dir
    copy = shutil.copytree(bundle, tmp_path / "model")
    data = bytearray((copy / "unknown.safetensors").read_bytes())
    data[-1] ^= 1
    (copy / "unknown.safetensors").write_bytes(bytes(data))
    one_line(tlpipe("predict", copy, root / "cats" / "0.jpg"), "unknown.safetensors does not match the checksum")


def test_suggest_picks_unlabelled_images_to_label_skips_copies_of_train_and_writes_three_files(bundle_dir, tmp_path):
    root, bundle = bundle_dir
    unlabelled = tmp_path / "unlabelled"
    unlabelled.mkdir()
    for k in range(2):  # copies of the fit's images: their labels are known
        shutil.copy(root / "cats" / f"{k}.jpg", unlabelled / f"copy{k}.jpg")
    for k in range(6):  # names a URL must encode
        make_image(unlabelled / "new" / f"{k} #&+é.png", class_color(k % 3), size=(40, 32), noise=40, seed=[7, k])
    (unlabelled / "broken.jpg").write_bytes(b"not an image")

    result = tlpipe("suggest", bundle, unlabelled, "--n", "3", "-o", tmp_path / "picks", "--workers", "0")
    assert result.exit_code == 0, result.output
    assert "suggested 3 of 8 images; 2 skipped as near-copies of the fit's labelled images" in result.stdout
    assert "skipped" in result.stderr and "broken.jpg" in result.stderr and "Traceback" not in result.output
    with (tmp_path / "picks" / "suggestions.csv").open(encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [r["rank"] for r in rows] == ["1", "2", "3"] and all("/new/" in r["path"] for r in rows)
    assert len({r["path"] for r in rows}) == 3 and {r["model_guess"] for r in rows} <= {"cats", "dogs"}
    tasks = json.loads((tmp_path / "picks" / "label_studio.json").read_text(encoding="utf-8"))
    urls = [urlsplit(t["data"]["image"]) for t in tasks]  # a local-files URL as Label Studio's server parses it
    assert [parse_qs(url.query)["d"][0] for url in urls] == [r["path"].lstrip("/") for r in rows] and not any(u.fragment for u in urls)
    assert tasks[0]["predictions"][0]["result"][0]["value"]["choices"][0] == rows[0]["model_guess"]
    assert Image.open(tmp_path / "picks" / "contact_sheet.png").size == (3 * 128, 142)

    one_line(tlpipe("suggest", bundle, unlabelled, "-o", tmp_path / "picks"), "already holds suggestions.csv", "--overwrite")
    one_line(tlpipe("suggest", bundle, unlabelled, "-o", unlabelled / "out"), "--out")
    for command in (("suggest", bundle.parent, unlabelled, "-o"), ("predict", bundle, unlabelled / "copy0.jpg", "--explain")):
        one_line(tlpipe(*command, root / "picks"), "inside the dataset folder")  # the fit's own (its output folder given)
    assert not (root / "picks").exists()
    cut = shutil.copytree(bundle.parent, tmp_path / "cut")  # a re-run cut before it saved: a summary naming no data
    summary = json.loads((cut / "summary.json").read_text())
    (cut / "summary.json").write_text(json.dumps({"status": "cut", "cut": "stopped by SIGTERM", "tlpipe_version": summary["tlpipe_version"]}))
    result = tlpipe("suggest", cut / "model", unlabelled, "-n", "1", "-o", tmp_path / "after_cut", "--workers", "0")
    assert result.exit_code == 0 and "the fit's images were not found" in result.stdout, result.output
    damaged = shutil.copytree(bundle.parent, tmp_path / "damaged")  # its data there, its config.yaml not a recipe
    (damaged / "config.yaml").write_text("strategy: [\n")
    result = tlpipe("suggest", damaged / "model", unlabelled, "-n", "1", "-o", tmp_path / "after_damage", "--workers", "0")
    assert result.exit_code == 0 and "the fit's images were not found" in result.stdout, result.output
    (tmp_path / "empty").mkdir()
    one_line(tlpipe("suggest", bundle, tmp_path / "empty"), "holds no image files")


def test_suggestions_stay_spread_over_the_data_rather_than_on_its_most_uncertain_region():
    from tlpipe.insight.suggest import MAX_CLUSTERS, suggest

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(20, 64))
    y_known, y_pool = rng.integers(0, 20, 10 * MAX_CLUSTERS), rng.integers(0, 20, 2000)
    known, pool = (centres[y] + rng.normal(size=(len(y), 64)) * 0.8 for y in (y_known, y_pool))
    probabilities = np.where((y_pool == 0)[:, None], 0.5, np.array([0.98, 0.02]))  # region 0 the most uncertain
    picks = suggest(probabilities, pool, 100, known).rows
    assert len(set(picks.tolist())) == 100 and len(np.unique(y_pool[picks])) >= 15  # not 100 picks of region 0
    assert (y_pool[picks[:10]] == 0).all()  # the most uncertain first


def test_suggestions_among_copies_of_one_image_pick_it_once_and_print_no_warning():
    import warnings

    from tlpipe.insight.suggest import suggest

    codes = np.array([[1.0, 0, 0]] * 3 + [[0, 1.0, 0]])  # three copies: fewer distinct codes than groups asked
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        picks = suggest(np.full((4, 2), 0.5), codes, 4).rows
    assert len(picks) == 2 and 3 in picks


def test_predict_explain_writes_a_heatmap_per_image_and_never_into_the_images_folder(bundle_dir, tmp_path):
    root, bundle = bundle_dir
    result = tlpipe("predict", bundle, root / "cats", "--explain", tmp_path / "why", "--workers", "0")
    assert result.exit_code == 0, result.output
    written = sorted((tmp_path / "why").iterdir())
    assert [p.name.split("-", 1)[1] for p in written] == [f"{k}.png" for k in range(6)]
    side = json.loads((bundle / "bundle.json").read_text())["data_config"]["input_size"][1:]
    shown = Image.open(written[0])
    assert list(shown.size) == side[::-1] and shown.mode == "RGB"
    plain = np.asarray(Image.open(root / "cats" / "0.jpg").convert("RGB").resize(shown.size), dtype=float)
    assert np.abs(np.asarray(shown, dtype=float) - plain).mean() > 10  # the heat is laid over the picture

    one_line(tlpipe("predict", bundle, root / "cats", "--explain", tmp_path / "why"), "already holds", "--overwrite")
    one_line(tlpipe("predict", bundle, root / "cats", "--explain", root / "cats" / "why"), "inside the dataset folder")
    one_line(tlpipe("predict", bundle, root / "cats" / "0.jpg", "--explain", root / "cats"), "holds images given to predict")
    photos = tmp_path / "photos"
    photos.mkdir()
    shutil.copy(root / "cats" / "0.jpg", photos / "a.jpg")  # loose photos: a folder of overlays among them is the user's to choose
    beside = tlpipe("predict", bundle, photos / "a.jpg", "--explain", photos / "heat", "--workers", "0")
    assert beside.exit_code == 0 and len(list((photos / "heat").iterdir())) == 1
    assert not (root / "cats" / "why").exists()


def test_the_heatmap_of_a_flip_averaging_bundle_mirrors_with_its_image(bundle_dir, tmp_path):
    """Its prediction is the same for an image and its mirror, so its explanation must mirror too."""
    from tlpipe.bundle.folder import load_bundle
    from tlpipe.insight.heatmaps import heatmaps

    bundle = load_bundle(bundle_dir[1], "cpu")
    bundle.extractor.hflip = True  # as when the fit chose test-time flip averaging on val
    pixels = np.zeros((64, 64, 3), np.uint8)
    pixels[:, :24] = class_color(0)
    pixels[10:50, 40:60] = class_color(1)
    Image.fromarray(pixels).save(tmp_path / "image.png")
    Image.fromarray(pixels[:, ::-1]).save(tmp_path / "mirror.png")
    (_, heat, top), (_, mirrored, mirrored_top) = heatmaps(bundle, [tmp_path / "image.png", tmp_path / "mirror.png"])
    assert top == mirrored_top and heat.std() > 0.01
    assert np.abs(mirrored - heat[:, ::-1]).max() < 1e-3


def test_a_tuning_worker_leaves_out_the_same_suspects_as_its_lead_and_changes_nothing_it_was_given(tmp_path):
    from tlpipe.config import load_config
    from tlpipe.data import DatasetSpec, Sample
    from tlpipe.stages.diagnose import without_label_issues

    rng = np.random.default_rng(0)
    y = np.repeat([0, 1, 2], 30)
    X = np.eye(3)[y] * 4 + rng.normal(size=(90, 3)) * 0.3
    y_given = y.copy()
    y_given[[5, 40]] = [2, 0]  # two images filed under the wrong class
    samples = [Sample(tmp_path / f"{k}.jpg", int(label)) for k, label in enumerate(y_given)]
    spec = DatasetSpec(tmp_path, ["a", "b", "c"], {"train": samples, "val": samples[:3]}, "folder")
    codes = {"train": (X, y_given), "val": (X[:3], y_given[:3])}

    kept_spec, kept_codes = without_label_issues(spec, codes, load_config("default", exclude_label_issues=True))
    assert {s.path.name for s in samples} - {s.path.name for s in kept_spec.splits["train"]} == {"5.jpg", "40.jpg"}
    assert len(kept_codes["train"][0]) == 88 and kept_codes["val"] is codes["val"]
    assert len(spec.splits["train"]) == 90 and len(codes["train"][0]) == 90  # what it was given is unchanged
    assert without_label_issues(spec, codes, load_config("default")) == (spec, codes)  # off: as given


def test_leaving_out_suspects_never_takes_more_than_half_a_class(tmp_path):
    from tlpipe.config import load_config
    from tlpipe.data import DatasetSpec, Sample
    from tlpipe.insight.label_issues import find_label_issues
    from tlpipe.stages.diagnose import without_label_issues

    rng = np.random.default_rng(0)
    y = np.repeat([0, 1, 2], [30, 30, 4])  # class 2: four images whose codes sit among class 0's
    X = np.eye(3)[np.where(y == 2, 0, y)] * 4 + rng.normal(size=(64, 3)) * 0.3
    samples = [Sample(tmp_path / f"{k}.jpg", int(label)) for k, label in enumerate(y)]
    spec = DatasetSpec(tmp_path, ["a", "b", "c"], {"train": samples, "val": samples[:3]}, "folder")
    codes = {"train": (X, y), "val": (X[:3], y[:3])}
    flagged = find_label_issues(X, y, (0.1, 1.0))
    in_c = int(np.isin(np.flatnonzero(y == 2), flagged.rows).sum())
    assert in_c >= 3  # confident learning flags (nearly) the whole class

    kept_spec, kept_codes = without_label_issues(spec, codes, load_config("default", exclude_label_issues=True))
    assert np.bincount(kept_codes["train"][1]).tolist()[2] == 2  # half of it stays: the class is not lost
    assert len(kept_spec.splits["train"]) == len(kept_codes["train"][1]) == 64 - len(flagged) + in_c - 2


def test_label_issues_of_a_multi_label_set_name_the_images_whose_set_the_codes_contradict():
    from tlpipe.insight.label_issues import find_label_issues

    rng = np.random.default_rng(0)
    Y = (rng.random((300, 4)) < 0.35).astype(int)
    Y[Y.sum(axis=1) == 0, 0] = 1
    X = Y @ rng.normal(size=(4, 16)) * 2 + rng.normal(size=(300, 16))
    given, planted = Y.copy(), rng.choice(300, 20, replace=False)
    given[planted, rng.integers(0, 4, 20)] ^= 1  # one class added or dropped from each planted set

    issues = find_label_issues(X, given, (1e-3, 1e-2, 0.1, 1.0))
    hits = len(set(issues.rows) & set(planted))
    assert hits >= 16 and hits / len(issues) >= 0.7  # most planted sets found, few clean ones
    assert issues.suggested.shape == (len(issues), 4) and ((issues.quality >= 0) & (issues.quality <= 1)).all()
    assert (issues.suggested[:5] == Y[issues.rows[:5]]).mean() > 0.9  # what it suggests is the true set


def test_on_a_large_train_label_issues_fit_each_fold_on_a_part_and_still_score_every_image(monkeypatch):
    from sklearn.datasets import make_classification
    import tlpipe.insight.label_issues as label_issues
    import tlpipe.training.linear as linear

    X, y = make_classification(300, 30, n_informative=10, n_classes=3, n_clusters_per_class=1, class_sep=3.0, random_state=0)
    flipped = np.arange(0, 300, 50)
    given = y.copy()
    given[flipped] = (y[flipped] + 1) % 3
    monkeypatch.setattr(linear, "CV_MAX_IMAGES", 90)  # 300 train images stand in for tens of thousands
    fitted_on = []
    estimator = label_issues.linear_estimator

    def recording(*args):
        pipeline = estimator(*args)
        fit = pipeline.fit
        pipeline.fit = lambda X, y: (fitted_on.append(len(y)), fit(X, y))[1]
        return pipeline

    monkeypatch.setattr(label_issues, "linear_estimator", recording)
    probabilities, _ = label_issues.out_of_fold_probabilities(X, given, (0.01, 0.1, 1.0))
    assert probabilities.shape == (300, 3) and np.allclose(probabilities.sum(axis=1), 1)  # every image scored
    assert fitted_on and max(fitted_on) == 90
    issues = label_issues.find_label_issues(X, given, (0.01, 0.1, 1.0))
    assert len(set(issues.rows) & set(flipped)) >= 5 and issues.checked == 300
