"""What a study leaves: its summary, the trials table and plots in ``<output>/tuning/``, and the same
on the fit's MLflow run."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from tlpipe.run.folder import RunFolder
from tlpipe.run.tracking import FitRun
from tlpipe.tuning.storage import PRUNED_REASON, _quiet
from tlpipe.utils import write_json


def study_summary(study: optuna.Study) -> dict[str, Any]:
    """Counts by state, the best trial, and trial 0 (the recipe's configuration)."""
    trials = study.get_trials(deepcopy=False)
    summary: dict[str, Any] = {
        "study": study.study_name, "trials": len(trials),
        **{state.name.lower(): sum(t.state == state for t in trials)
           for state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.WAITING)},
    }
    if trials and trials[0].state == TrialState.COMPLETE:
        summary["default_value"], summary["default_params"] = trials[0].value, trials[0].params
    if summary["complete"]:
        best = study.best_trial
        summary.update(best_trial=best.number, best_value=best.value, best_params=best.params)
    pruned = {t.number: t.user_attrs[PRUNED_REASON] for t in trials if PRUNED_REASON in t.user_attrs}
    if pruned:
        summary["pruned_reasons"] = pruned
    return summary


def score_name(codes: dict | None) -> str:
    """What a trial's value measures (its objective's val ``codes`` tell), as the plots name it."""
    return "val mAP" if codes and codes["val"][1].ndim == 2 else "val accuracy"


def _plots(study: optuna.Study, folder: Path, score: str) -> tuple[list[Path], dict[str, str]]:
    """Optimization history (``score`` on its axis) and parameter importances as PNGs; what could not
    be drawn, and why. Optuna sets its own plot style: kept to these plots (``rc_context``), not the
    confusion matrix and curves drawn after them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization.matplotlib import plot_optimization_history, plot_param_importances

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    varying = {name for name in {n for t in complete for n in t.params}
               if len({repr(t.params.get(name)) for t in complete}) > 1}
    plots = {RunFolder.OPTUNA_HISTORY: lambda s: plot_optimization_history(s, target_name=score)}
    skipped = {}
    if len(complete) >= 2 and varying:
        evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)  # the same study, the same plot
        plots["optuna_importances.png"] = lambda s: plot_param_importances(s, evaluator=evaluator)
    else:
        skipped["optuna_importances.png"] = "needs 2 complete trials whose params differ"
    written = []
    for name, plot in plots.items():
        try:
            with matplotlib.rc_context():
                ax = plot(study)
                figure = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
                figure.savefig(folder / name, dpi=110, bbox_inches="tight")
                plt.close(figure)
            written.append(folder / name)
        except Exception as exc:  # noqa: BLE001 - a plot is a nicety: say why it is missing
            skipped[name] = f"{type(exc).__name__}: {exc}"
    return written, skipped


def log_study(study: optuna.Study, parent: FitRun | None, output_dir: Path, score: str = "val accuracy") -> dict[str, Any]:
    """Write ``<output>/tuning/`` (tuning.json, trials.csv, plots) and log it on the fit's run:
    best params (``tuning_best_*``), trial counts and values, the files as artifacts."""
    folder = RunFolder(output_dir) / RunFolder.TUNING
    folder.mkdir(parents=True, exist_ok=True)
    summary = study_summary(study)
    study.trials_dataframe().to_csv(folder / RunFolder.TRIALS_CSV, index=False)
    with _quiet():
        plots, skipped = _plots(study, folder, score)
    if skipped:
        summary["plots_skipped"] = skipped
    write_json(folder / RunFolder.TUNING_SUMMARY, summary)
    if parent is not None:
        parent.log_params({"tuning_study": study.study_name,
                           **{f"tuning_best_{k}": v for k, v in summary.get("best_params", {}).items()}})
        parent.log_metrics({f"tuning_{k}": summary[k] for k in
                            ("trials", "complete", "pruned", "fail", "best_value", "default_value") if k in summary})
        for path in [folder / RunFolder.TUNING_SUMMARY, folder / RunFolder.TRIALS_CSV, *plots]:
            parent.log_artifact(path, "tuning")
    return summary
