"""Fine-tunes that learn, or say they did not: the LP-FT start at the training resolution, the signs
of a run that has not started learning, its one restart, the distortions that would change the
classes, and epochs fitted to the time a run has."""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from tlpipe.config import FinetuneConfig, load_config
from tlpipe.data import prepare_dataset
from tlpipe.models import dataset_codes
from tlpipe.training.checks import Diverged, EpochAllowance, LearningCheck
from tlpipe.training.fits import RESTARTS, DidNotLearn, fit_finetune, train_until_learning

STROKES = {"slash": ((0, 1), (1, 0)), "backslash": ((0, 0), (1, 1)), "bar": ((0.5, 0), (0.5, 1))}


def line_drawings(root: Path, per_class: int = 16, size: int = 40) -> Path:
    """White strokes on black, far from ImageNet's photos: '/', '\\' and '|' at random offsets and
    widths. A mirror turns a '/' into a '\\': the class does not survive it."""
    rng = np.random.default_rng(0)
    for name, ((x0, y0), (x1, y1)) in STROKES.items():
        for k in range(per_class):
            image = Image.new("L", (size, size))
            shift, width = rng.uniform(-0.2, 0.2) * size, int(rng.integers(3, 6))
            points = [(x0 * size + shift, y0 * size), (x1 * size + shift, y1 * size)]
            ImageDraw.Draw(image).line(points, fill=int(rng.integers(180, 256)), width=width)
            (root / name).mkdir(parents=True, exist_ok=True)
            image.save(root / name / f"{k:02d}.png")
    return root


def test_the_signs_of_a_run_that_has_not_started_learning():
    check = LearningCheck(n_classes=4, val_chance=0.25, val_images=400, val_counts=(100,) * 4)  # 2 SE above chance: 0.293
    assert check.verdict(1, {"train_loss": float("nan"), "val_accuracy": 0.9}).startswith("the train loss is nan")
    late = check.verdict(1, {"train_loss": 1.3, "train_loss_end": 1.5, "val_accuracy": 0.9})
    assert "train loss 1.500 at the end of the first epoch, above chance (ln 4 = 1.386)" in late
    assert check.verdict(1, {"train_loss": 1.9, "train_loss_end": 1.2, "val_accuracy": 0.9}) is None  # warmup's start
    assert check.verdict(1, {"train_loss": 1.2, "val_accuracy": 0.25}) is None  # one epoch: val may still be low
    assert "at chance" in check.verdict(2, {"train_loss": 1.2, "val_accuracy": 0.29, "val_balanced_accuracy": 0.29})
    assert check.verdict(2, {"train_loss": 1.2, "val_accuracy": 0.30, "val_balanced_accuracy": 0.30}) is None
    assert check.verdict(3, {"train_loss": 1.5, "val_accuracy": 0.25}) is None  # later epochs: the best one is kept


def test_a_class_weighted_run_on_imbalanced_data_that_learns_is_not_taken_for_chance():
    # 90 / 10 val: a class-weighted model trades plain accuracy (0.894, under the largest class's 0.9) for the rare class
    check = LearningCheck(n_classes=2, val_chance=0.5, val_images=400, val_counts=(360, 40))
    assert check.verdict(2, {"train_loss": 0.4, "val_accuracy": 0.894, "val_balanced_accuracy": 0.88}) is None
    assert "at chance" in check.verdict(2, {"train_loss": 0.4, "val_accuracy": 0.9, "val_balanced_accuracy": 0.5})
    # multi-label, rare classes' positives weighed 10x: chance is the weighted loss of the best constant guess
    plain = LearningCheck(n_classes=4, val_chance=0.05, val_images=400, label_shares=(0.05,) * 4)
    weighted = LearningCheck(n_classes=4, val_chance=0.05, val_images=400, label_shares=(0.05,) * 4, positive_weights=(10.0,) * 4)
    assert plain.verdict(1, {"train_loss": 0.35, "val_accuracy": 0.5}) is not None  # above the unweighted 0.199
    assert weighted.verdict(1, {"train_loss": 0.35, "val_accuracy": 0.5}) is None  # below the weighted chance, 0.94


def test_the_first_epoch_fits_the_epochs_to_the_time_left():
    now = time.monotonic()
    alone = EpochAllowance(now + 100, epochs=8)  # no trial queued after it: all the time, up to 2x the epochs
    assert alone.fitted(1, 10.0) == 10 and EpochAllowance(now + 1000, epochs=8).fitted(1, 10.0) == 16
    assert EpochAllowance(now + 5, epochs=8, least=3).fitted(1, 10.0) == 3  # the deadline still cuts it
    # A queued trial that still fits whole after this one's 8 epochs: 8 here, the rest left to it.
    assert EpochAllowance(now + 250, epochs=8, queued=1).fitted(1, 10.0) == 8
    # One that no longer fits whole at the measured pace: this trial takes the time, the other waits.
    assert EpochAllowance(now + 150, epochs=8, queued=1).fitted(1, 10.0) == 15


def test_a_run_that_does_not_learn_is_restarted_once_lower_from_the_same_start_then_given_up(tmp_path):
    model = torch.nn.Linear(3, 2)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    attempts = []

    def never_learns(attempt: FinetuneConfig, checkpoints: Path):
        attempts.append((attempt.lr, checkpoints.name))
        assert all(torch.equal(start[k], v) for k, v in model.state_dict().items())  # each attempt from the start
        with torch.no_grad():
            model.weight.add_(1.0)
        raise Diverged(f"train loss {9 + len(attempts)}.0 after the first epoch, above chance")

    with pytest.raises(DidNotLearn, match=r"the fine-tune did not learn: at head LR 0.001, train loss 10.0 .*; "
                                          r"then at head LR 0.0001, train loss 11.0"):
        train_until_learning(model, FinetuneConfig(lr=1e-3), tmp_path, never_learns)
    assert attempts == [(1e-3, tmp_path.name), (pytest.approx(1e-4), "restart-1")]

    # A re-run (a killed restart) goes straight to the attempt it was on, its restart recorded.
    recorded = json.loads((tmp_path / RESTARTS).read_text())
    assert [r["lr"] for r in recorded] == [1e-3] and recorded[0]["backbone_lr"] == pytest.approx(1e-3 * 0.3)
    learned, restarts = train_until_learning(model, FinetuneConfig(lr=1e-3), tmp_path, lambda a, c: (a.lr, c.name))
    assert learned == (pytest.approx(1e-4), "restart-1") and restarts == recorded


@pytest.fixture(scope="module")
def lines_fine_tune(tmp_path_factory, backbone):
    """A full fine-tune at 64 px (the backbone's native size: 224) on the line drawings, 3 epochs,
    with far data's learning rates and the augmentation a grey source gets (no mirror: it swaps classes)."""
    root = tmp_path_factory.mktemp("lines")
    config = load_config("default", strategy="full", batch_size=16, num_workers=0, val_fraction=0.25,
                         finetune={"image_size": 64, "epochs": 3, "patience": 3, "lr": 1e-3, "backbone_lr_mult": 0.5},
                         augment={"hflip": 0.0, "color_p": 0.0, "affine_p": 0.0, "crop_scale": [0.8, 1.0]})
    spec = prepare_dataset(line_drawings(root / "data"), config.val_fraction, config.seed, report_dir=None)
    codes = {s: dataset_codes(backbone, spec, s, config) for s in ("train", "val")}  # at 224 px, as the fit has them
    tuned = dataclasses.replace(backbone, model=copy.deepcopy(backbone.model))
    return spec, fit_finetune(tuned, spec, config, root / "out", codes)


def test_the_lpft_head_starts_right_at_a_training_resolution_other_than_the_native_one(lines_fine_tune):
    spec, trained = lines_fine_tune
    chance = math.log(len(spec.classes))
    details = trained.details
    assert details["image_size"] == 64 and details["restarts"] == []
    assert details["start_loss"] < 0.5 * chance  # the probe fitted on 64 px codes, on them
    assert details["first_batch_loss"] < chance and details["first_epoch_loss"] < chance


def test_a_fine_tune_on_far_data_learns(lines_fine_tune):
    spec, trained = lines_fine_tune
    assert trained.details["val_accuracy"] >= 0.9, trained.history
    assert trained.details["epochs_run"] == 3 and not trained.details["cut_by_deadline"]


def test_grey_and_upscaled_sources_get_only_the_distortions_they_can_take(tmp_path, image_folder):
    from tlpipe.config import AugmentConfig
    from tlpipe.data.profile import greyscale_share
    from tlpipe.strategy.plan import source_augmentation

    recipe = AugmentConfig()
    augment, notes = source_augmentation(recipe, side=32, size=128, grey_share=1.0)
    assert augment.color_p == 0 and augment.affine_p == 0 and augment.crop_scale == [0.8, 1.0]
    assert augment.hflip == recipe.hflip and len(notes) == 2 and "upscaled 4.0x" in notes[1]
    assert source_augmentation(recipe, side=300, size=224, grey_share=0.1) == (recipe, [])
    lines = sorted(line_drawings(tmp_path / "lines", per_class=2).rglob("*.png"))
    colours = sorted(image_folder("colours", {"red": 2, "blue": 2}).rglob("*.jpg"))
    assert greyscale_share(lines) == 1.0 and greyscale_share(colours) == 0.0


def test_a_fine_tune_that_never_learns_says_so_and_the_linear_classifier_stands(tmp_path):
    import tlpipe

    data = line_drawings(tmp_path / "data", per_class=8)
    config = load_config("default", strategy="full", batch_size=8, num_workers=0, val_fraction=0.25, test_time=False,
                         linear={"classifiers": ["logreg"], "c_grid": [0.1], "cv_folds": 2}, tuning={"trials": 1},
                         finetune={"image_size": 64, "epochs": 2, "lr": 50.0})  # AdamW at 50 (then 5) cannot learn
    result = tlpipe.fit(data, config, output=tmp_path / "out", tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["status"] == "complete" and summary["strategy"] == "linear"
    fallback = summary["head"]["finetune_fallback"]
    assert fallback.startswith("The fine-tune did not learn: at head LR 50, ") and "; then at head LR 5, " in fallback
    assert summary["strategy_reason"] == f"Full asked for (--strategy or the recipe). {fallback}"  # what was asked, then why not
    assert summary["tuning"]["pruned"] == 1 and "did not learn" in summary["tuning"]["pruned_reasons"]["0"]
    assert result.summary["val_accuracy"] == summary["val_accuracy"]
