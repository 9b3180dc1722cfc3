"""What the commands on a saved bundle print: ``tlpipe predict`` (tables, CSV or JSON), ``evaluate``
and ``export``; the fit report's tables (``tlpipe.run.report``) where they are the same."""
from __future__ import annotations

from rich.markup import escape
from rich.table import Table

from tlpipe.run.report import console, print_class_metrics, print_confusion_matrix, print_label_metrics


def print_predictions(predictions, fmt: str) -> None:
    """``table`` for people, ``csv`` / ``json`` for scripts (one row per image, ranks 1..k). An image of
    no class the model knows says ``unknown`` with its score; its classes are what the model would
    have said."""
    import csv
    import json
    import sys

    scored = any(p.unknown_score is not None for p in predictions)
    unknown = lambda p: {"unknown": p.unknown, "unknown_score": round(p.unknown_score, 3)} if scored else {}  # noqa: E731
    if fmt == "json":
        rows = [{"path": p.path, **unknown(p), "predictions": [{"label": l, "probability": round(pr, 6)}
                 for l, pr in zip(p.labels, p.probabilities)]} for p in predictions]
        sys.stdout.write(json.dumps(rows, indent=2, ensure_ascii=False) + "\n")
    elif fmt == "csv":
        writer = csv.writer(sys.stdout)
        writer.writerow(["path", "rank", "label", "probability", *(["unknown", "unknown_score"] if scored else [])])
        for p in predictions:
            flags = [str(p.unknown).lower(), f"{p.unknown_score:.3f}"] if scored else []
            for rank, (label, prob) in enumerate(zip(p.labels, p.probabilities), 1):
                writer.writerow([p.path, rank, label, f"{prob:.6f}", *flags])
            if not p.labels:  # a multi-label image with no class over its threshold is still listed
                writer.writerow([p.path, "", "", "", *flags])
    else:
        table = Table()
        table.add_column("image")
        for rank in range(1, max((len(p.labels) for p in predictions), default=1) + 1):
            table.add_column(f"#{rank}")
        for p in predictions:
            classes = [f"{escape(l)} ({pr:.3f})" for l, pr in zip(p.labels, p.probabilities)]
            if p.unknown:
                classes = [f"[yellow]unknown[/] (score {p.unknown_score:.0f}; else {classes[0] if classes else 'none'})", *classes[1:]]
            table.add_row(escape(p.path), *classes)
        console.print(table)


def print_evaluation(metrics: dict) -> None:
    """``tlpipe evaluate``: the same tables as the fit report, for the split scored."""
    from tlpipe.data.scan import WHOLE_FOLDER

    split, n, data = metrics["split"], metrics["n_images"], metrics["data"]
    whole = split == WHOLE_FOLDER
    scored = f"all {n} images of {data} (no train/ val/ test/ folders)" if whole else f"the {split} split of {data} ({n} images)"
    console.print(f"Scored {scored}", markup=False, highlight=False, soft_wrap=True)
    for warning in metrics.get("warnings", []):
        console.print(f"[yellow]Warning[/] {escape(warning)}", soft_wrap=True)
    if "unknown_rejected" in metrics:
        console.print(f"Flagged unknown: {metrics['unknown_rejected']:.1%} of these labelled images (set for "
                      f"{metrics['unknown_false_rejection_target']:.0%} of val; all are scored below)")
    if metrics.get("task") == "multilabel":
        print_label_metrics(metrics, "All images" if whole else f"{split}/")
        return
    low, high = metrics["accuracy_ci"]
    f1_low, f1_high = metrics["macro_f1_ci"]
    top_k = next((f", {k.replace('_', '-').replace('-accuracy', '')} accuracy {v:.3f}" for k, v in metrics.items()
                  if k.startswith("top_")), "")
    console.print(f"Accuracy {metrics['accuracy']:.3f} (95% interval {low:.3f}-{high:.3f}, Wilson), balanced "
                  f"{metrics['balanced_accuracy']:.3f}, macro-F1 {metrics['macro_f1']:.3f} ({f1_low:.3f}-{f1_high:.3f}, "
                  f"bootstrap){top_k}")
    console.print(f"Probabilities: NLL {metrics['nll']:.3f}, Brier {metrics['brier']:.3f}, "
                  f"expected calibration error {metrics['ece']:.3f} (15 bins)")
    print_class_metrics(metrics, "All images" if whole else f"{split}/")
    print_confusion_matrix(metrics["confusion_matrix"], list(metrics["per_class"]))
    if metrics["most_confused"]:
        console.print("Most confused: " + "; ".join(
            f"{escape(p['true'])} -> {escape(p['predicted'])} ({p['count']})" for p in metrics["most_confused"]))


def print_export(exported) -> None:
    """The parity table of an export (``tlpipe.bundle.export.Exported``), then where it went."""
    record, parity = exported.record, exported.record["parity"]
    table = Table(title=f"Exported vs bundle on {parity['images']} images ({escape(parity['images_from'])})")
    for column in ("batch", "top-1 agreement", "max |Δp|", "accuracy"):
        table.add_column(column, justify="right")
    for size, row in parity["batches"].items():
        accuracy = "-" if row["accuracy"] is None else f"{row['accuracy']:.3f}"
        table.add_row(size, f"{row['top1_agreement']:.1%}", f"{row['max_abs_difference']:.1e}", accuracy)
    console.print(table)
    if parity["bundle_accuracy"] is not None:
        console.print(f"Bundle accuracy on the same images: {parity['bundle_accuracy']:.3f}")
    for note in record.get("exporter_notes", []):
        console.print(f"[yellow]Note[/] {escape(note)}")
    if parity["forced"]:
        console.print(f"[bold red]Forced[/] {escape(parity['verdict'])}")
    opset = f", opset {record['opset']}" if "opset" in record else ""
    console.print(f"[bold green]{record['format']}[/] {escape(str(exported.path))} ({record['exporter']}{opset}, "
                  f"{record['bytes'] / 1e6:.1f} MB); metadata in {escape(str(exported.sidecar))}")
    console.print(exported.logged, markup=False, highlight=False)
