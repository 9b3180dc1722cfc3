"""``<output>/report.html``: what a fit did, in one self-contained page a person reads.

Built from the files a fit leaves in its output folder (summary, strategy, metrics, tuning, plots,
val predictions) and the dataset it names, so ``tlpipe report OUTPUT_DIR`` rebuilds it any time.
A Jinja2 template (autoescaped: class names and paths are data); every image inline as a base64
PNG, nothing fetched from the network, so the file opens from disk anywhere.
"""
from __future__ import annotations

import base64
import csv
import io
from pathlib import Path

from jinja2 import Environment, PackageLoader, select_autoescape
from PIL import Image

from tlpipe.cache import cache_key
from tlpipe.data import DatasetSpec
from tlpipe.data.images import load_rgb
from tlpipe.data.table import LABEL_DELIMITER
from tlpipe.errors import TlpipeError
from tlpipe.paths import inside
from tlpipe.run.folder import RunFolder
from tlpipe.models import PENULTIMATE
from tlpipe.utils import atomic_write, read_json, write_json

MISTAKES_SHOWN = 12
TRIALS_SHOWN = 15  # the best ones; tuning/trials.csv holds them all
THUMBNAIL = 128


def write_html_report(out: Path, spec: DatasetSpec | None = None) -> Path:
    """Write ``<out>/report.html`` from the fit's files; ``spec``: the fit's checked data (else the
    dataset the summary names is checked and split again, with the fit's seed)."""
    folder = RunFolder(out)
    out, summary = folder.path, folder.read_summary()
    if "metrics" not in summary:
        raise TlpipeError(f"{out} holds no finished fit to report on (its summary has no metrics): run tlpipe fit first")
    spec = spec or folder.recorded_dataset(summary)
    page = _environment().get_template("report.html.j2").render(
        summary=summary, profile=_profile(out, spec), quarantine=_csv_rows(folder / folder.QUARANTINE)[1:],
        data_missing=None if spec else _missing(summary),
        signals=_taps(_read(folder / folder.STRATEGY, {}).get("signals") or {}),
        trials=_trials(folder / folder.TUNING / folder.TRIALS_CSV), trials_shown=TRIALS_SHOWN,
        metrics=_read(folder / folder.CLASSIFICATION_REPORT),
        calibration=summary["head"].get("calibration"), test_time=summary["head"].get("test_time"),
        images={name: _png_uri(folder / file) for name, file in (("history", f"{folder.TUNING}/{folder.OPTUNA_HISTORY}"),
                ("curves", folder.LEARNING_CURVES), ("data_curve", folder.DATA_CURVE), ("confusion", folder.CONFUSION_MATRIX), ("reliability", folder.RELIABILITY),
                                                                 ("pr_curves", folder.PR_CURVES))},
        **_with_pictures(out, spec, mistakes=_mistakes(out), suspects=_suspects(out)),
    )
    return atomic_write(folder / folder.REPORT, lambda f: f.write(page), encoding="utf-8")


def _environment() -> Environment:
    return Environment(loader=PackageLoader("tlpipe.run", "templates"), autoescape=select_autoescape(["html", "j2"]))


def _read(path: Path, default=None):
    if not path.exists() and default is not None:
        return default
    try:
        return read_json(path)
    except (OSError, ValueError) as exc:
        raise TlpipeError(f"cannot read {path} ({exc}): rerun the fit that wrote it") from None


def _missing(summary: dict) -> str:
    """Why the page shows no image of the fit's data."""
    if summary.get("data_table", {}).get("file", True):
        return f"The dataset is no longer at {summary['data']}"
    return "The fit's data was a DataFrame, of which tlpipe keeps no copy"


def _profile(out: Path, spec: DatasetSpec | None) -> dict | None:
    """The data profile (duplicates, leakage), computed once per dataset state and kept in the
    folder; without the dataset, the one kept (None if none was)."""
    from tlpipe.data.profile import profile_dataset

    if spec is None:
        return _read(out / RunFolder.PROFILE, {}).get("profile")
    samples = [s for split in spec.splits.values() for s in split]
    key = cache_key(samples, what="profile")
    saved = _read(out / RunFolder.PROFILE, {})
    if saved.get("key") == key:
        return saved["profile"]
    profile = profile_dataset(spec).to_dict()
    write_json(out / RunFolder.PROFILE, {"key": key, "profile": profile})
    return profile


def _csv_rows(path: Path) -> list[list[str]]:
    if not path.exists():
        return []
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.reader(f))


def _taps(signals: dict) -> list[dict]:
    """The transfer signals of every tap the strategy looked at: each stage, then the penultimate codes."""
    if not signals:
        return []
    return [*signals.get("stages", []), {"name": PENULTIMATE, **signals["penultimate"]}]


def _trials(path: Path) -> list[dict]:
    """The study's trials, best first: number, value, state and the params drawn (3 significant digits)."""
    rows = _csv_rows(path)
    if not rows:
        return []
    header, body = rows[0], [dict(zip(rows[0], row)) for row in rows[1:]]
    params = [name for name in header if name.startswith("params_")]
    ranked = sorted(body, key=lambda r: -float(r["value"]) if r.get("value") else float("inf"))
    return [{"number": r["number"], "value": f"{float(r['value']):.4f}" if r.get("value") else "",
             "state": r.get("state", ""), "params": ", ".join(f"{p.removeprefix('params_')}={_short(r[p])}" for p in params if r[p])}
            for r in ranked]


def _short(value: str) -> str:
    """A number of the trials table (C=0.10000000000000002) to 3 significant digits; other values as they are."""
    try:
        return f"{float(value):.3g}" if any(c in value for c in ".eE") else value
    except ValueError:
        return value


def _png_uri(path: Path) -> str | None:
    return f"data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()}" if path.exists() else None


def _with_pictures(out: Path, spec: DatasetSpec | None, **grids: list[dict]) -> dict:
    """Each grid's rows with their picture (``image``): the thumbnail with the bundle's heatmap over it
    (what made it predict what it did), the plain thumbnail where the bundle cannot draw one (and
    ``heatmaps_missing`` says why), none without the dataset (images only from inside it)."""
    paths = {row["path"]: spec and inside(spec.root, row["path"]) for rows in grids.values() for row in rows}
    pictures = {name: _thumbnail(path) for name, path in paths.items()}
    shown, missing = [name for name, picture in pictures.items() if picture], None
    try:
        from tlpipe.bundle.folder import load_bundle
        from tlpipe.insight.heatmaps import heatmaps, overlay

        drawn = heatmaps(load_bundle(RunFolder(out).bundle, "cpu"), [paths[name] for name in shown]) if shown else []
        pictures.update({name: _thumbnail(overlay(picture, heat)) for name, (picture, heat, _) in zip(shown, drawn)})
    except Exception as exc:  # noqa: BLE001 - a bundle that cannot be loaded or explained leaves the plain pictures
        missing = f"{type(exc).__name__}: {exc}"
    return {"heatmaps_missing": missing, **{grid: [{**row, "image": pictures[row["path"]]} for row in rows]
                                            for grid, rows in grids.items()}}


def _mistakes(out: Path) -> list[dict]:
    """The val images the model got wrong with the highest probability."""
    try:
        rows = [_as_mistake(row) for row in RunFolder(out).val_predictions()]
        wrong = sorted((r for r in rows if r["true"] != r["predicted"]), key=lambda r: -float(r["probability"]))
        return [{**row, "path": row["path"], "probability": float(row["probability"])} for row in wrong[:MISTAKES_SHOWN]]
    except (KeyError, ValueError, IndexError):
        raise TlpipeError(f"{out / RunFolder.VAL_PREDICTIONS} is damaged: rerun the fit that wrote it") from None


def _suspects(out: Path) -> list[dict]:
    """The train images most likely filed under the wrong class (label_issues.csv)."""
    header, *rows = _csv_rows(out / RunFolder.LABEL_ISSUES) or [[]]
    rows = [dict(zip(header, row)) for row in rows[:MISTAKES_SHOWN]]
    try:
        return [{**row, "path": row["path"], "quality": float(row["quality"])} for row in rows]
    except (KeyError, ValueError):
        raise TlpipeError(f"{out / RunFolder.LABEL_ISSUES} is damaged: rerun the fit that wrote it") from None


def _as_mistake(row: dict[str, str]) -> dict:
    """A val row as (path, true, predicted, probability); a multi-label row's probability: that of its
    most confident wrong answer (the class furthest from its truth)."""
    if "probability" in row:
        return row
    truth = set(row["true"].split(LABEL_DELIMITER))
    errors = [abs(float(p) - (c.removeprefix(RunFolder.VAL_PROBABILITY) in truth))
              for c, p in list(row.items())[3:]]  # after path, true, predicted: a class's probability each
    return {"path": row["path"], "true": row["true"], "predicted": row["predicted"], "probability": max(errors, default=0.0)}


def _thumbnail(source: Path | Image.Image | None) -> str | None:
    """An image file (or picture) as an inline PNG thumbnail; None when the file is gone since the fit or
    not a readable image."""
    if source is None:
        return None
    try:
        image = source.copy() if isinstance(source, Image.Image) else load_rgb(source, min_size=THUMBNAIL)
    except (OSError, ValueError):
        return None
    image.thumbnail((THUMBNAIL, THUMBNAIL))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return f"data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}"

