"""What ``tlpipe`` prints: rich tables over the results the API returns (no logic of its own)."""
from __future__ import annotations

import shlex
from pathlib import Path
from typing import Sequence

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from tlpipe.run.folder import RunFolder

console = Console()


def print_fit_report(summary: dict, metrics: dict, quarantined: Sequence[tuple[str, str]]) -> None:
    splits = ", ".join(f"{k} {v}" for k, v in summary["splits"].items())
    console.print(f"[bold]Data[/]  {escape(summary['data'])}: {len(summary['classes'])} classes; {splits} "
                  f"(val {'from the val/ folder' if summary['val_from'] == 'folder' else 'held out, stratified'})")
    if quarantined:
        console.print(f"[yellow]{len(quarantined)} file(s) quarantined[/] (see quarantine.csv):")
        for path, why in quarantined[:10]:
            console.print(f"  {escape(path)}: {escape(why)}")
    if summary["skipped"]:
        console.print("Skipped: " + ", ".join(f"{n} {why}" for why, n in summary["skipped"].items()))
    for note in summary.get("data_notes", []):
        console.print(f"[yellow]Note[/] {escape(note)}")
    backbone = summary["backbone"]
    console.print(f"[bold]Backbone[/]  {backbone['name']} ({backbone['arch']}), weights from {backbone['kind']} "
                  f"{backbone['location']} (sha256 {backbone['sha256'][:12]}…)")
    if summary.get("backbone_ranking"):
        console.print("Candidates by transfer signals: " + "; ".join(
            f"{r['backbone']} probe {r['probe_accuracy']:.3f}, LogME {r['logme']:.2f}" for r in summary["backbone_ranking"]))
    console.print(f"[bold]Strategy[/]  {summary['strategy']}: {summary['strategy_reason']}")

    if "candidates" in summary["head"]:
        print_linear_heads(summary["head"])
    else:
        print_finetune(summary["head"], "mAP" if summary.get("task") == "multilabel" else "accuracy")

    multilabel = summary.get("task") == "multilabel"
    print_tuning(summary.get("tuning") or {}, "mAP" if multilabel else "accuracy")
    (print_label_metrics if multilabel else print_class_metrics)(metrics, "Validation")
    print_test_time(summary["head"].get("test_time"))
    print_calibration(summary["head"].get("calibration"))
    print_diagnosis(summary)
    if not multilabel:
        print_confusion_matrix(metrics["confusion_matrix"], summary["classes"])
    times = ", ".join(f"{k} {v:.1f}s" for k, v in summary["timings"].items())
    console.print(f"Timings: {times}")
    print_budget(summary)
    print_score(summary)
    for warning in summary.get("warnings", []):  # the fit is whole; a part of its record is not
        console.print(f"[yellow]Warning[/] {escape(warning)}")
    console.print(f"[bold green]Bundle[/] {escape(summary['bundle'])}   MLflow run {summary['run_id']} "
                  f"({escape(summary['tracking_uri'])})")
    registered = summary.get("registered") or {}
    if "version" in registered:
        alias = f", models:/{registered['name']}@{registered['alias']}" if registered["alias"] else ""
        console.print(f"[bold green]Registered[/] models:/{escape(registered['name'])}/{registered['version']}{escape(alias)}")
    print_next_steps(summary)


def print_score(summary: dict) -> None:
    """The figure the fit is summed up by, and what it is worth (``outputs.score_line``)."""
    if score := summary.get("score"):
        interval = f" ({score['interval'][0]:.3f}-{score['interval'][1]:.3f})" if score.get("interval") else ""
        colour = "bold green" if score["split"] == "test" else "bold yellow"
        console.print(f"[{colour}]Score[/]  {score['split']} {score['metric']} {score['value']:.3f}{interval} "
                      f"{escape(score['note'])}", soft_wrap=True)


def print_diagnosis(summary: dict) -> None:
    """What the data says, a line each: the train images whose label the codes contradict, what more would buy,
    when an image counts as unknown."""
    issues, curve = summary.get("label_issues") or {}, summary.get("learning_curve") or {}
    if "flagged" in issues:
        whose = "the fine-tuned network's codes" if issues.get("network") == "fine-tuned" else "their codes"
        line = (f"{issues['flagged']} of {issues['checked']} train images have a label {whose} contradict "
                f"({RunFolder.LABEL_ISSUES}, most suspect first)")
        if excluded := issues.get("excluded"):
            line += (f"; {excluded['images']} left out of training: val {excluded['score']} {excluded['val_with']:.3f} "
                     f"with them, {excluded['val_without']:.3f} without (logistic regression on the codes)")
            if kept := excluded.get("kept_for_their_class"):
                line += f"; {kept} kept so that every class keeps half of its images"
        elif issues["flagged"]:
            line += ("; --exclude-label-issues trains without those of the pretrained codes, found before training"
                     if issues.get("network") == "fine-tuned" else "; --exclude-label-issues trains without them")
        console.print(f"[bold]Label issues[/]  {escape(line)}")
    if "sentence" in curve:
        console.print(f"[bold]More data[/]  {escape(curve['sentence'][0].upper() + curve['sentence'][1:])}")
    if "threshold" in (unknowns := summary.get("unknowns") or {}):
        console.print(f"[bold]Unknown images[/]  an image farther from every class than all but {unknowns['false_rejection']:.0%} "
                      "of val is answered unknown (predict --no-reject answers a class anyway)")


def print_budget(summary: dict) -> None:
    """The time limit against the wall time, and what the plan had to leave out."""
    from tlpipe.budget import format_duration

    budget, plan = summary.get("budget") or {}, summary.get("plan") or {}
    if budget.get("limit_seconds"):
        console.print(f"[bold]Budget[/]  {format_duration(budget['elapsed_seconds'])} of "
                      f"{format_duration(budget['limit_seconds'])}")
    pace = budget.get("epoch_seconds") or {}
    if pace.get("measured"):
        console.print(f"Seconds per fine-tuning epoch: {pace['measured']:.1f} measured, {pace['planned']:.1f} planned")
    if budget.get("overran"):
        console.print(f"[yellow]Over the limit[/]: {escape(budget['overran'])}")
    if budget.get("stopped_early"):
        console.print(f"[yellow]Ended before the limit[/]: {escape(budget['stopped_early'])}")
    for note in plan.get("notes", []):
        console.print(f"[yellow]Note[/] {escape(note)}")
    waiting = (summary.get("tuning") or {}).get("waiting", 0)
    if waiting:
        console.print(f"[yellow]Note[/] {waiting} planned trial{'s' if waiting > 1 else ''} did not fit the time left: "
                      f"the same command with --output {shlex.quote(str(Path(summary['bundle']).parent))} runs "
                      f"{'them' if waiting > 1 else 'it'} (give it more time with --time-limit)")


def print_next_steps(summary: dict) -> None:
    """The commands to run next, with this fit's paths quoted for a POSIX shell, so they can be pasted
    as they are (class or folder names may hold spaces, quotes or non-ASCII letters)."""
    from tlpipe.run.store import resolve_tracking_uri

    bundle, data, table = shlex.quote(summary["bundle"]), shlex.quote(summary["data"]), summary.get("data_table")
    if table:  # the table again, read as the fit read it
        data += "".join(f" --{flag.replace('_', '-')} {shlex.quote(str(table[flag]))}"
                        for flag in ("root", "path_col", "label_col", "split_col") if table[flag] is not None)
    labelled = data if "test" in summary["splits"] and (not table or table["file"]) else "LABELLED_FOLDER"  # test/ first
    store, output = summary["tracking_uri"], shlex.quote(str(Path(summary["bundle"]).parent))
    ui = "tlpipe ui" + ("" if store == resolve_tracking_uri() else f" --tracking-uri {shlex.quote(store)}")
    console.print("[bold]Next[/]")
    for command, what in [(f"tlpipe predict {bundle} IMAGES...", "labels for new images (files or folders)"),
                          (f"tlpipe evaluate {bundle} {labelled}", "scores on labelled images the fit never saw" +
                           ("" if labelled == data else " (or a test/ split beside train/: the fit scores it itself)")),
                          (f"tlpipe export {bundle} --format onnx", "one ONNX file, checked against the bundle"),
                          (f"tlpipe serve {output}", "the fit's MLflow model over HTTP on 127.0.0.1:5001"),
                          (ui, "this run and its trials in the MLflow UI")]:
        console.print(f"  {command}  # {what}", markup=False, highlight=False, soft_wrap=True)


def print_tuning(tuning: dict, score: str = "accuracy") -> None:
    if not tuning.get("trials"):
        console.print(f"Tuning: off{' (' + tuning['skipped'] + ')' if 'skipped' in tuning else ''}")
        return
    line = (f"[bold]Tuning[/]  {tuning['trials']} Optuna trials ({tuning['complete']} complete, "
            f"{tuning['pruned']} pruned, {tuning['fail']} failed)")
    if tuning.get("waiting"):  # --timeout ran out before they started
        line += f", {tuning['waiting']} still queued (a re-run of this fit, or tlpipe fit --worker, runs them)"
    if tuning.get("finished_before"):
        line += f", continuing a study that had {tuning['finished_before']} finished"
    if "best_trial" in tuning:
        params = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in tuning["best_params"].items())
        default = f" against {tuning['default_value']:.4f} for the recipe's own (trial 0)" if "default_value" in tuning else ""
        line += f"; best trial {tuning['best_trial']}: val {score} {tuning['best_value']:.4f}{default}; {params}"
    console.print(line)


def print_class_metrics(metrics: dict, title: str) -> None:
    table = Table(title=f"{title}: accuracy {metrics['accuracy']:.4f}, macro F1 {metrics['macro_f1']:.4f}")
    for column in ("class", "precision", "recall", "F1", "support"):
        table.add_column(column, justify="right" if column != "class" else "left")
    for name, m in metrics["per_class"].items():
        table.add_row(escape(name), f"{m['precision']:.3f}", f"{m['recall']:.3f}", f"{m['f1']:.3f}", str(m["support"]))
    console.print(table)


def print_label_metrics(metrics: dict, title: str) -> None:
    """A multi-label model's figures: mAP and micro-F1 with their intervals, then per class."""
    (low, high), (f1_low, f1_high) = metrics["mean_average_precision_ci"], metrics["micro_f1_ci"]
    table = Table(title=f"{title}: mAP {metrics['mean_average_precision']:.4f} ({low:.3f}-{high:.3f}), micro-F1 "
                        f"{metrics['micro_f1']:.4f} ({f1_low:.3f}-{f1_high:.3f}), macro-F1 {metrics['macro_f1']:.4f}, "
                        f"subset accuracy {metrics['subset_accuracy']:.4f}, Hamming loss {metrics['hamming_loss']:.4f}")
    for column in ("class", "AP", "precision", "recall", "F1", "support", "threshold"):
        table.add_column(column, justify="right" if column != "class" else "left")
    for name, m in metrics["per_class"].items():
        table.add_row(escape(name), f"{m['average_precision']:.3f}", f"{m['precision']:.3f}", f"{m['recall']:.3f}",
                      f"{m['f1']:.3f}", str(m["support"]), f"{m['threshold']:.3f}")
    console.print(table)
    console.print("Weakest classes by AP: " + ", ".join(escape(c) for c in metrics["worst_classes"]))


def print_test_time(report: dict | None) -> None:
    """The test-time options tried on val: what each scored and costs, and the one kept."""
    if not report:
        return
    if "options" not in report:
        console.print(f"Test-time options not tried: {report['reason']}")
        return
    tried = "; ".join(f"{name} {row['val']:.3f} (gain {row['gain']:+.3f}, SE {row['standard_error']:.3f}, "
                      f"{row['forward_passes']:.2g}x the forward cost)" for name, row in report["options"].items())
    kept = f"{report['choice']} kept" if report["choice"] != "none" else "none kept"
    console.print(f"Test-time options on val {report['score']} (plain {report['val_plain']:.3f}): {escape(tried)}; {kept}")


def print_calibration(report: dict | None) -> None:
    """The temperature fitted on val, and what it did to the NLL and the calibration error."""
    if not report:
        return
    if "temperatures" in report:  # multi-label: one per class
        console.print(f"Calibration on {report['n_val']} val images: a temperature per class ({report['kept']} of "
                      f"{len(report['temperatures'])} kept, the others lowered no NLL); mean NLL {report['nll_before']:.3f} "
                      f"-> {report['nll_after']:.3f}; thresholds {report['threshold_rule']}")
        return
    what = f"temperature {report['temperature']:.3g} kept" if report["kept"] else "no temperature kept (it did not lower the NLL)"
    console.print(f"Calibration on {report['n_val']} val images: {what}; NLL {report['nll_before']:.3f} -> "
                  f"{report['nll_after']:.3f}, ECE {report['ece_before']:.3f} -> {report['ece_after']:.3f}"
                  + (" (few images: a rough estimate)" if report["n_val"] < 100 else ""))


def print_linear_heads(head: dict) -> None:
    table = Table(title="Linear heads (C by cross-validation on train)")
    multilabel = any("val_map" in row for row in head["candidates"].values())
    score, shown = ("map", "mAP") if multilabel else ("accuracy", "accuracy")
    for column in ("head", "C", f"CV {shown}", f"val {shown}", ""):
        table.add_column(column)
    for kind, row in head["candidates"].items():
        chosen = "kept" if kind == head["chosen"] else ""
        table.add_row(kind, f"{row['C']:g}", f"{row[f'cv_{score}']:.3f}", f"{row[f'val_{score}']:.3f}", chosen)
    console.print(table)


def print_finetune(head: dict, score: str = "accuracy") -> None:
    frozen = f", {head['params_frozen']:,} frozen" if head["params_frozen"] else ""
    resumed = f", resumed after epoch {head['resumed_from_epoch']}" if head["resumed_from_epoch"] else ""
    console.print(f"Fine-tuned {head['params_trainable']:,} parameters{frozen}; {head['epochs_run']} epochs{resumed}, "
                  f"best at epoch {head['best_epoch']}; the linear probe it started from: "
                  f"val {score} {head['linear_probe_val_accuracy']:.3f}")
    if head.get("start_loss") is not None and head.get("first_epoch_loss") is not None:
        console.print(f"Train loss at {head['image_size']} px: {head['start_loss']:.3f} for the probe it started from, "
                      f"{head['first_epoch_loss']:.3f} over the first epoch")
    for restart in head.get("restarts") or []:
        console.print(f"[yellow]Restarted[/] at a tenth of the learning rates: at head LR {restart['lr']:.2g}, "
                      f"{escape(restart['reason'])}")
    if head.get("world_size", 1) > 1:
        console.print(f"Distributed: {head['world_size']} processes (DDP), batch {head['batch_size']} each")
    if head["class_weights"]:
        console.print("Class-weighted loss (imbalance over 3x): " + ", ".join(f"{w:.2f}" for w in head["class_weights"]))


def print_confusion_matrix(matrix: list[list[int]], classes: Sequence[str]) -> None:
    if len(classes) > 20:  # wider than a terminal: the PNG holds it
        console.print(f"Confusion matrix: {len(classes)} classes, see confusion_matrix.png")
        return
    table = Table(title="Confusion matrix (rows: true, columns: predicted)")
    table.add_column("")
    for name in classes:
        table.add_column(escape(name), justify="right")
    for name, row in zip(classes, matrix):
        table.add_row(escape(name), *map(str, row))
    console.print(table)


def print_signals(signals: dict, backbone: str) -> None:
    """The transfer signals per tap: what auto's decision reads."""
    table = Table(title=f"Transfer signals ({backbone}, {signals['folds']}-fold CV on train)")
    score = "acc." if signals.get("score", "accuracy") == "accuracy" else signals["score"]
    for column in ("features", f"probe {score}", "± s.e.", f"kNN {score}", "LogME", "BN gap"):
        table.add_column(column, justify="left" if column == "features" else "right")
    for row in [*signals["stages"], {"name": "penultimate", **signals["penultimate"]}]:
        best = " (best earlier stage)" if row["name"] == signals["best_stage"] else ""
        table.add_row(row["name"] + best, f"{row['probe_accuracy']:.3f}", f"{row['probe_sem']:.3f}",
                      f"{row['knn_accuracy']:.3f}", f"{row['logme']:.3f}", f"{row['bn_gap']:.3f}")
    console.print(table)


def print_inspect_report(result: dict) -> None:
    """``tlpipe inspect``: profile, signals, decision and estimate."""
    profile, signals, decision = result["profile"], result["signals"], result["decision"]
    splits = ", ".join(f"{k} {v}" for k, v in result["splits"].items())
    console.print(f"[bold]Data[/]  {result['data']}: {len(result['classes'])} classes; {splits}")
    table = Table(title="Images per class")
    table.add_column("class")
    for split in profile["images_per_class"]:
        table.add_column(split, justify="right")
    for name in result["classes"]:
        table.add_row(escape(name), *(str(counts.get(name, 0)) for counts in profile["images_per_class"].values()))
    console.print(table)
    sizes = profile["image_sizes"]
    console.print(f"Imbalance (largest/smallest class): {profile['imbalance_ratio']:.2f}; greyscale "
                  f"{100 * profile['greyscale_share']:.1f}%; sizes {sizes['width']['min']}-{sizes['width']['max']} x "
                  f"{sizes['height']['min']}-{sizes['height']['max']} px (median {sizes['width']['median']} x "
                  f"{sizes['height']['median']}), {100 * sizes['small_share']:.0f}% under 224 px on the short side")
    duplicates = len(profile["exact_duplicates"]), len(profile["near_duplicates"]), len(profile["leakage"])
    style = "yellow" if any(duplicates) else "green"
    console.print(f"[{style}]Duplicates: {duplicates[0]} exact group(s), {duplicates[1]} near group(s); "
                  f"{duplicates[2]} pair(s) shared across splits (leakage)[/]")
    for pair in profile["leakage"][:10]:
        console.print(f"  {pair['splits']} {pair['kind']}: {pair['a']} ~ {pair['b']}")
    if result["quarantined"]:
        console.print(f"[yellow]{len(result['quarantined'])} file(s) fail the check[/] and would be quarantined")
    for row in result.get("backbone_ranking") or []:
        console.print(f"  candidate {row['backbone']}: probe {row['probe_accuracy']:.3f}, LogME {row['logme']:.3f}")

    print_signals(signals, result["backbone"])
    console.print(f"[bold]Decision[/]  {decision['headline']}. {decision['explanation']}")
    estimate = result["estimate"]
    memory = f"; {estimate['memory_gb']} GB per batch of {estimate['batch_size']}" if "memory_gb" in estimate else ""
    console.print(f"[bold]Estimate[/]  fit at most {estimate['fit_seconds']:.0f} s at "
                  f"{estimate['forward_images_per_second']} images/s forward (a fine-tuning study: at most "
                  f"{estimate['finetune_study_minutes']:g} min){memory}")
    if "plan" in result:
        from tlpipe.strategy.plan import Plan

        plan = Plan.from_dict(result["plan"])
        console.print(f"[bold]Plan[/]  {escape(plan.line)}")
        for note in plan.notes:
            console.print(f"[yellow]Note[/] {escape(note)}")
