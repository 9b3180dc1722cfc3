"""The time budget: --time-limit as users write it, the plan it leads to, epochs and trials that
stop before it, and a fit stopped by SIGTERM that leaves a model that predicts and says it was cut."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import class_color, make_image
from tlpipe.budget import format_duration, parse_duration
from tlpipe.config import load_config
from tlpipe.data import DatasetSpec, Sample
from tlpipe.errors import TlpipeError
from tlpipe.strategy.plan import make_plan, train_sizes

SPEEDS = {"size": 224, "batch": 16, "reps": 3, "train_images_per_second": 10.0, "eval_images_per_second": 40.0}


@pytest.mark.parametrize("text, seconds", [
    ("90s", 90), ("10m", 600), ("1.5h", 5400), ("2h15m", 8100), ("45", 45), ("1m 30s", 90), (120, 120),
])
def test_time_limits_parse_as_users_write_them(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", [None, "none", "None", "off"])
def test_none_lifts_the_time_limit(text):
    assert parse_duration(text) is None


@pytest.mark.parametrize("text", ["10 minutes", "m", "-5m", "0s", "1h-5m"])
def test_a_time_limit_that_is_not_a_duration_is_one_clear_error(text):
    with pytest.raises(TlpipeError, match="time limit"):
        parse_duration(text)


def test_durations_print_as_time_limits_a_user_can_pass_back():
    assert [format_duration(s) for s in (45, 90, 600, 7800, 7200.2)] == ["45s", "1m30s", "10m", "2h10m", "2h01m"]
    assert parse_duration(format_duration(7800)) == 7800


def test_the_default_recipe_has_a_budget_and_the_cli_refuses_a_bad_one(tmp_path):
    assert parse_duration(load_config("default").budget) == 30 * 60
    result = subprocess.run([sys.executable, "-m", "tlpipe", "fit", str(tmp_path), "--time-limit", "ten minutes"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "time limit 'ten minutes' is not a duration" in lines[0], result.stderr
    assert lines[0].startswith("error: --time-limit") and "recipe" not in lines[0]  # the flag gave it, not the recipe


def _spec(n_train: int, n_val: int) -> DatasetSpec:
    splits = {"train": [Sample(Path(f"t{i}.jpg"), i % 2) for i in range(n_train)],
              "val": [Sample(Path(f"v{i}.jpg"), i % 2) for i in range(n_val)]}
    return DatasetSpec(Path("."), ["a", "b"], splits, "folder")


def test_small_images_train_at_a_small_resolution_and_large_ones_at_the_native_one():
    assert train_sizes(224, 32) == [128]  # a 32 px source gains nothing from 224 px
    assert train_sizes(224, 150) == [160, 128]
    assert train_sizes(224, 400) == [224, 192, 160, 128]
    assert train_sizes(64, 48) == [64]  # never above the fit's own resolution


def test_the_plan_trains_smaller_when_the_native_resolution_does_not_fit():
    config = load_config("default").model_copy(update={"strategy": "full"})
    spec = _spec(800, 400)  # an epoch at 224 px: 80 s train + 10 s val
    roomy = make_plan(config, spec, SPEEDS, train_sizes(224, 400), 224, left=7200, trials=8, reserve=30)
    assert (roomy.train_size, roomy.trials, roomy.epochs) == (224, 8, 8) and roomy.deserved["fits"]
    assert roomy.pruner == "median" and roomy.eval_sizes == (224,)
    tight = make_plan(config, spec, SPEEDS, train_sizes(224, 400), 224, left=600, trials=8, reserve=30)
    assert tight.train_size < 224 and tight.trials >= 1 and tight.eval_sizes == (tight.train_size, 224)
    assert (tight.train_size, tight.trials) == (160, 1)  # one trial at 160 px fits; two would need 128 px: resolution first
    assert tight.seconds["study"] <= (600 - 30)  # planned within what is left
    assert not tight.deserved["fits"] and "--time-limit" in tight.notes[0]
    assert parse_duration(tight.deserved["time_limit"]) >= roomy.seconds["study"]
    assert tight.pruner == "none"  # too few trials for the pruner to compare


def test_when_no_fine_tune_fits_the_plan_keeps_the_linear_classifier():
    config = load_config("default").model_copy(update={"strategy": "full"})
    plan = make_plan(config, _spec(800, 400), SPEEDS, train_sizes(224, 400), 224, left=60, trials=8, reserve=30)
    assert plan.strategy == "linear" and "linear classifier stands" in plan.notes[-1]


def _small_fine_tune(tmp_path, image_folder, backbone, epochs: int, **kwargs):
    import copy
    import dataclasses

    from tlpipe.data import prepare_dataset
    from tlpipe.models import dataset_codes
    from tlpipe.training.fits import fit_finetune

    data = image_folder("data", {"red": 12, "blue": 12}, size=(64, 64))
    config = load_config("default", strategy="full", image_size=64, batch_size=8, num_workers=0, val_fraction=0.5,
                         finetune={"epochs": epochs, "patience": epochs})
    spec = prepare_dataset(data, config.val_fraction, config.seed, report_dir=None)
    model = dataclasses.replace(backbone, model=copy.deepcopy(backbone.model), data_config={**backbone.data_config, "input_size": (3, 64, 64)})
    codes = {s: dataset_codes(model, spec, s, config) for s in ("train", "val")}
    return spec, model, config, fit_finetune(model, spec, config, tmp_path / "out", codes, **kwargs)


def test_a_fine_tune_past_its_deadline_stops_at_an_epoch_boundary_with_its_best_epoch(tmp_path, image_folder, backbone):
    *_, trained = _small_fine_tune(tmp_path, image_folder, backbone, 6, deadline=time.monotonic())
    assert trained.details["epochs_run"] == 1 and trained.details["cut_by_deadline"]
    assert trained.details["best_epoch"] == 1


def test_a_fine_tune_trains_its_own_copy_of_the_backbone(tmp_path, image_folder, backbone):
    from tlpipe.models.backbones import state_dict_sha256

    before = state_dict_sha256(backbone.model)
    _, given, _, trained = _small_fine_tune(tmp_path, image_folder, backbone, 1)
    assert trained.backbone is not None and trained.backbone.model is not given.model
    assert state_dict_sha256(given.model) == before != state_dict_sha256(trained.backbone.model)


def test_epochs_of_a_large_val_split_are_scored_on_a_fixed_subset_and_the_trial_on_all_of_it(
        tmp_path, image_folder, backbone, monkeypatch):
    from tlpipe.training import fits as strategies

    monkeypatch.setattr(strategies, "EPOCH_VAL_IMAGES", 6)  # a "large" val split of 12 images
    from tlpipe.models import PENULTIMATE, dataset_codes
    from tlpipe.training.linear import accuracy

    spec, _, config, trained = _small_fine_tune(tmp_path, image_folder, backbone, 2)
    assert len(spec.splits["val"]) == 12 and trained.details["epoch_val_images"] == 6
    assert all(round(epoch["val_accuracy"] * 6) == pytest.approx(epoch["val_accuracy"] * 6) for epoch in trained.history)
    whole = accuracy(trained.head, *dataset_codes(trained.backbone, spec, "val", config, PENULTIMATE))  # the prediction path, all 12
    assert trained.details["val_accuracy"] == pytest.approx(whole)


RECIPE = """
image_size: 96
batch_size: 8
num_workers: 0
strategy: full
linear: {classifiers: [logreg], c_grid: [0.1], cv_folds: 2}
finetune: {epochs: 40, patience: 40}
tuning: {trials: 3}
"""


def _data(root: Path) -> Path:
    for c, name in enumerate(["red", "green", "blue"]):
        for k in range(12):
            make_image(root / name / f"{k}.jpg", class_color(c), size=(96, 96), noise=40, seed=[c, k])
    return root


def _fit(data: Path, out: Path, recipe: Path, *flags: str) -> list[str]:
    return [sys.executable, "-m", "tlpipe", "fit", str(data), "--recipe", str(recipe), "--output", str(out),
            "--tracking-uri", f"sqlite:///{out.parent / 'mlflow.db'}", *flags]


def _group_ends(group: int, seconds: float = 15) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.2)
    return False


def test_a_fit_keeps_its_time_limit_and_says_what_the_budget_cut(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE)
    out, limit = tmp_path / "out", 40
    start = time.monotonic()
    subprocess.run(_fit(_data(tmp_path / "data"), out, recipe, "--time-limit", f"{limit}s"), check=True,
                   capture_output=True, timeout=600)
    wall = time.monotonic() - start
    summary = json.loads((out / "summary.json").read_text())
    assert wall <= limit * 1.1 + 15, wall  # 15 s: Python, torch and timm start before the clock does
    assert summary["status"] == "complete" and summary["budget"]["limit_seconds"] == limit
    plan = json.loads((out / "plan.json").read_text())["plan"]
    assert plan["epochs"] * plan["trials"] < 40 * 3 and not plan["deserved"]["fits"]
    assert summary["plan"] == plan
    pace = summary["budget"]["epoch_seconds"]  # the plan's seconds per epoch beside the ones measured
    assert pace["planned"] == plan["seconds"]["epoch"] and pace["measured"] > 0


def test_a_fit_stopped_by_sigterm_leaves_a_model_that_predicts_and_a_summary_that_says_so(tmp_path):
    """The signal goes to the whole process group, DataLoader workers included, as a terminal's
    Ctrl+C or systemd's stop sends it: the workers must not die first and take the fit with them."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE.replace("epochs: 40, patience: 40", "epochs: 8, patience: 8").replace("trials: 3", "trials: 2")
                      .replace("num_workers: 0", "num_workers: 2"))
    data, out = _data(tmp_path / "data"), tmp_path / "out"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(_fit(data, out, recipe, "--time-limit", "none"), env=env, start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (out / "summary.json").exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)  # the linear classifier, saved before the fine-tune
    # any moment of the fine-tune that follows (about 7 s here: a signal once the fit is over finds nothing to cut)
    time.sleep(random.uniform(0.5, 4.0))
    assert process.poll() is None, "the fit ended before it could be stopped"
    os.killpg(process.pid, signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr
    assert "stopped by SIGTERM" in stderr and "Traceback" not in stderr, stderr
    assert _group_ends(process.pid), "DataLoader workers outlived the fit"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "cut" and summary["cut"] == "stopped by SIGTERM"
    assert summary["strategy"] == "linear" and "before the full fine-tune ended" in summary["strategy_reason"], summary
    assert summary["strategy_reason"].endswith("the linear classifier saved first stands.")  # not the user's choice
    assert not (out / ".model.staging").exists()
    predicted = subprocess.run([sys.executable, "-m", "tlpipe", "predict", str(out / "model"), str(data / "red" / "0.jpg"),
                                "--format", "json"], capture_output=True, text=True, timeout=300, check=True)
    assert json.loads(predicted.stdout)[0]["predictions"][0]["label"] == "red"
    from mlflow.tracking import MlflowClient

    run = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(summary["run_id"])
    assert run.info.status == "KILLED" and run.data.tags["tlpipe_status"] == "cut"
    assert run.data.tags["tlpipe_stage"] in ("plan", "tune", "train")  # where the signal found it: after the linear model

    plan = (out / "plan.json").read_text() if (out / "plan.json").exists() else None
    subprocess.run(_fit(data, out, recipe, "--time-limit", "none"), check=True, capture_output=True, timeout=600)
    resumed = json.loads((out / "summary.json").read_text())
    assert resumed["status"] == "complete" and resumed["plan"]["trials"] == 2
    assert resumed["run_id"] == summary["run_id"]  # the killed run continued, FINISHED now
    finished = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(summary["run_id"])
    assert finished.info.status == "FINISHED" and not {"tlpipe_stage", "tlpipe_cut"} & finished.data.tags.keys()
    assert plan is None or (out / "plan.json").read_text() == plan  # the re-run continued the saved plan


def test_a_sigterm_after_the_final_record_leaves_the_fit_complete(tmp_path):
    """A stop while the MLflow model is logged, after summary.json says complete: the fine-tune stays
    the fit's model and summary (the provisional linear classifier was recorded over it as cut)."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE.replace("epochs: 40, patience: 40", "epochs: 1, patience: 1").replace("trials: 3", "trials: 0"))
    data, out = _data(tmp_path / "data"), tmp_path / "out"
    process = subprocess.Popen(_fit(data, out, recipe, "--time-limit", "none"), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while process.poll() is None and time.monotonic() < deadline:
        try:
            if json.loads((out / "summary.json").read_text()).get("status") == "complete":
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.02)
    assert process.poll() is None, "the fit ended before it could be stopped"
    process.send_signal(signal.SIGTERM)  # the MLflow model and the report page are still to come
    _, stderr = process.communicate(timeout=120)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "complete" and summary["strategy"] == "full", (summary.get("strategy_reason"), stderr)
    assert summary["last_cut"]["cut"] == "stopped by SIGTERM"
    assert summary["bundle_sha256"] == json.loads((out / "model" / "bundle.json").read_text())["head"]["sha256"]


def test_a_stop_as_the_linear_classifier_is_saved_first_keeps_it_as_the_cut_fits_model(tmp_path, monkeypatch):
    """SIGTERM just after the provisional record of a fine-tune's linear classifier: the summary
    records that model as cut (its metrics and why it stands), not a bare summary that lost them."""
    import tlpipe.stages.record as record
    from tlpipe.budget import FitCut
    from tlpipe.pipeline import fit

    monkeypatch.setattr(record, "announce", lambda line: os.kill(os.getpid(), signal.SIGTERM))
    (tmp_path / "recipe.yaml").write_text(RECIPE)
    config, out = load_config(tmp_path / "recipe.yaml"), tmp_path / "out"
    with pytest.raises(FitCut):
        fit(_data(tmp_path / "data"), config, output=out, tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "cut" and summary["strategy"] == "linear" and "val_accuracy" in summary, summary
    assert summary["strategy_reason"].endswith("the linear classifier saved first stands.")


def test_no_trial_starts_that_the_time_left_cannot_finish(tmp_path):
    """Trials queued, but estimated (then measured) longer than what is left: they wait for a re-run,
    which finishes them, instead of overrunning the limit."""
    from optuna.trial import TrialState

    from tlpipe import tuning

    def one_second(trial, config, on_epoch):
        time.sleep(1.0)
        return config.finetune.lr

    def states(tuned):
        return [t.state for t in tuned.study.trials]

    config = load_config("default", strategy="full", tuning={"trials": 3})
    estimated_too_long = tuning.tune(config, tmp_path, one_second, timeout=5, trial_seconds=6)
    assert states(estimated_too_long) == [TrialState.WAITING] * 3
    measured_too_long = tuning.tune(config, tmp_path, one_second, timeout=1.5, trial_seconds=0.1)
    assert states(measured_too_long).count(TrialState.COMPLETE) == 1  # after it, 0.5 s left: less than a trial
    finished = tuning.tune(config, tmp_path, one_second, timeout=30, trial_seconds=1.0)
    assert states(finished) == [TrialState.COMPLETE] * 3


def test_a_signal_while_a_record_is_written_waits_for_it_to_end():
    from tlpipe.budget import FitCut, signals_held, stop_on_signals

    written = []
    with pytest.raises(FitCut, match="SIGTERM") as cut, stop_on_signals():
        with signals_held():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.2)
            written.append("the whole record")
        written.append("not reached")
    assert written == ["the whole record"] and cut.value.exit_code == 143


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the swallowed cut, printed
def test_a_signal_whose_cut_python_swallows_still_stops_the_fit_at_its_next_step(monkeypatch):
    """A signal handled inside a ``__del__`` (or a garbage collector's weakref callback, as seen in
    SQLAlchemy) raises ``FitCut`` where Python would only print it; the next step raises it again."""
    from tlpipe.budget import FitCut, raise_if_stopped, recording_cut, stop_on_signals

    class SignalledWhileCollected:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.1)  # the handler runs here, and its FitCut goes no further than __del__

    printed = []  # what Python's hook would print as "Exception ignored ..." with a traceback
    monkeypatch.setattr(sys, "unraisablehook", printed.append)
    steps = []
    with pytest.raises(FitCut, match="SIGTERM"), stop_on_signals():
        SignalledWhileCollected()
        steps.append("went on")
        raise_if_stopped()
        steps.append("not reached")
    assert steps == ["went on"]
    assert printed == []  # the swallowed cut printed no traceback
    with stop_on_signals():
        raise_if_stopped()  # a new fit starts with no stop pending
        with pytest.raises(FitCut):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.1)
        recording_cut()
        raise_if_stopped()  # the cut's record is written, not cut again


def test_dataloader_workers_live_through_a_sigterm_sent_to_the_whole_process_group(image_folder, backbone):
    """A group's SIGTERM reaches the workers too: they leave it to the fit (which cuts and shuts
    them down) instead of dying under a loader still in use ("DataLoader worker is killed")."""
    import multiprocessing

    from tlpipe.data import Sample, eval_loader

    root = image_folder("data", {"a": 12, "b": 12})
    samples = [Sample(path, 0) for path in sorted(root.rglob("*.jpg"))]
    loader = eval_loader(samples, {**backbone.data_config, "input_size": (3, 32, 32)}, batch_size=4, workers=2)
    others = {child.pid for child in multiprocessing.active_children()}  # earlier tests' loaders may live on
    batches = iter(loader)
    next(batches), next(batches)  # one batch from each worker, in turn: both are past their start-up
    workers = [child for child in multiprocessing.active_children() if child.pid not in others]
    assert len(workers) == 2
    for worker in workers:
        os.kill(worker.pid, signal.SIGTERM)
    time.sleep(0.5)
    assert sum(len(labels) for _, labels in batches) == len(samples) - 8


def _note_mask_then_ignore(folder: Path, worker_id: int) -> None:
    from tlpipe.budget import ignore_stop_signals

    stops = {signal.SIGTERM, signal.SIGINT}
    at_start = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    ignore_stop_signals(worker_id)
    (folder / f"{worker_id}.json").write_text(json.dumps({
        "blocked_at_start": stops <= at_start, "blocked_after": bool(stops & signal.pthread_sigmask(signal.SIG_BLOCK, [])),
        "ignored": signal.getsignal(signal.SIGTERM) == signal.SIG_IGN}))


@pytest.mark.skipif(not hasattr(signal, "pthread_sigmask"), reason="no signal masks on this platform")
def test_loader_workers_start_with_stop_signals_blocked_until_they_ignore_them(tmp_path):
    """Between a worker's start and its worker_init_fn, PyTorch's SIGTERM handler would kill it (a fit
    stopped at that moment ended with exit 1): the signals wait, blocked, and are then ignored."""
    from functools import partial

    from torch.utils.data import DataLoader

    from tlpipe.budget import worker_options

    options = worker_options(2)
    if options["multiprocessing_context"] is None:
        pytest.skip("workers are not forked here: the shield applies to fork")
    options["worker_init_fn"] = partial(_note_mask_then_ignore, tmp_path)
    assert list(DataLoader(range(8), batch_size=2, **options)) != []
    notes = [json.loads(path.read_text()) for path in sorted(tmp_path.glob("*.json"))]
    assert notes == [{"blocked_at_start": True, "blocked_after": False, "ignored": True}] * 2
    assert not {signal.SIGTERM, signal.SIGINT} & signal.pthread_sigmask(signal.SIG_BLOCK, [])  # the fit's own mask is back


def test_a_fit_that_ends_well_before_its_limit_says_why():
    from tlpipe.budget import Budget
    from tlpipe.strategy.plan import Plan, budget_use

    early = Budget(600.0, started=time.monotonic() - 120)
    finetune = Plan("full", 128, (128,), epochs=8, trials=2, seconds={"epoch": 20.0})
    pace = {"epoch_seconds": 30.0, "epochs_run": 5, "epochs_fitted": 8, "stopped_early": True}
    assert budget_use(Budget(600.0, started=time.monotonic() - 580), finetune, pace, {}) == {
        "epoch_seconds": {"planned": 20.0, "measured": 30.0}}  # 97 % used: nothing to explain
    assert "1 planned trial(s) did not fit the time left: a trial needs at least 3 epochs, about 1m30s" in \
        budget_use(early, finetune, pace, {"waiting": 1})["stopped_early"]
    assert "the best stopped early at epoch 5 of 8" in budget_use(early, finetune, pace, {})["stopped_early"]
    assert budget_use(early, Plan("linear"), {}, {})["stopped_early"].startswith("the model is a linear classifier")
