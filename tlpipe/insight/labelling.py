"""``tlpipe suggest``: the unlabelled images to label next (``tlpipe.insight.suggest`` picks them),
written for a person and for a labelling tool: ``suggestions.csv`` (rank, path, the model's guess),
``label_studio.json`` (Label Studio tasks with the guess as a pre-annotation) and ``contact_sheet.png``
(the first ``SHEET_MAX`` picks as thumbnails, in order)."""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import numpy as np
from PIL import Image, ImageDraw

from tlpipe.bundle.folder import Bundle
from tlpipe.data import load_rgb
from tlpipe.data.table import LABEL_DELIMITER
from tlpipe.insight.suggest import suggest
from tlpipe.run.folder import RunFolder
from tlpipe.utils import atomic_write

SUGGESTIONS, LABEL_STUDIO, CONTACT_SHEET = "suggestions.csv", "label_studio.json", "contact_sheet.png"
OUTPUTS = (SUGGESTIONS, LABEL_STUDIO, CONTACT_SHEET)
THUMB, COLUMNS = 128, 10
SHEET_MAX = 200  # thumbnails on the contact sheet: a sheet of thousands is too large to look at (or to hold)


@dataclass(frozen=True)
class Suggested:
    folder: Path  # where the three files are
    picked: int
    considered: int
    duplicates: int  # skipped: near-copies of a labelled image
    labelled_known: bool  # False: the fit's images were not found, so no near-copy was skipped


def suggest_to_label(bundle: Bundle, images: list[Path], n: int, out: Path, batch_size: int = 64,
                     workers: int | None = None) -> Suggested:
    """Pick ``n`` of ``images`` to label next with ``bundle`` and write the three files into ``out``."""
    codes = bundle.codes(images, batch_size, workers)
    labelled = _labelled_codes(bundle, batch_size, workers)
    probabilities, top = bundle.ranked(codes, 1)
    picks = suggest(probabilities, codes, n, labelled, bundle.head.multilabel)
    guesses = _guesses(bundle, probabilities[picks.rows], top[picks.rows, 0])
    rows = [(rank, images[i], *guess, float(u)) for rank, (i, guess, u) in enumerate(zip(picks.rows, guesses, picks.uncertainty), 1)]
    _write_csv(out / SUGGESTIONS, rows)
    _write_label_studio(out / LABEL_STUDIO, rows)
    _write_contact_sheet(out / CONTACT_SHEET, rows[:SHEET_MAX])
    return Suggested(out, len(rows), len(images), picks.duplicates, labelled is not None)


def _labelled_codes(bundle: Bundle, batch_size: int, workers: int | None) -> np.ndarray | None:
    """The codes of every labelled image of the fit that made ``bundle`` (all its splits), when its
    folder and data are still there (near-copies of them are not worth labelling); else None."""
    from tlpipe.errors import TlpipeError

    fit = RunFolder.saved(bundle.path)
    try:
        spec = fit and fit.folder.recorded_dataset(fit.summary)
    except TlpipeError:  # its data is there but no longer a dataset (one class left, a damaged config.yaml)
        return None
    if spec is None:
        return None
    return bundle.codes([s.path for split in spec.splits.values() for s in split], batch_size, workers)


def _guesses(bundle: Bundle, probabilities: np.ndarray, best: np.ndarray) -> list[tuple[list[str], float | None]]:
    """The model's answer for each row as ``predict`` gives it, with the probability of its first
    class: the best class (by the logits), or for a multi-label bundle the classes over their
    thresholds (none, maybe: no probability then)."""
    if bundle.head.multilabel:
        return [([bundle.classes[j] for j in chosen], float(p[chosen[0]]) if chosen else None)
                for chosen, p in zip(bundle.label_sets(probabilities), probabilities)]
    return [([bundle.classes[b]], float(p[b])) for b, p in zip(best, probabilities)]


def _write_csv(path: Path, rows) -> None:
    table = [["rank", "path", "model_guess", "probability", "uncertainty"]]
    for rank, image, guess, confidence, u in rows:
        table.append([rank, str(image), LABEL_DELIMITER.join(guess), "" if confidence is None else f"{confidence:.4f}", f"{u:.4f}"])
    atomic_write(path, lambda f: csv.writer(f).writerows(table), newline="", encoding="utf-8")


def _write_label_studio(path: Path, rows) -> None:
    """Label Studio's task import format: one task per image (a local-files URL of its absolute path:
    Label Studio's local storage with ``LOCAL_FILES_DOCUMENT_ROOT=/``), the model's guess as a
    pre-annotation of an image classification config (``<Choices name="choice" toName="image">``,
    ``choice="multiple"`` for a multi-label model; no pre-annotation where it guesses no class)."""
    tasks = [{"data": {"image": f"/data/local-files/?d={quote(image.resolve().as_posix().lstrip('/'))}"},
              "meta": {"rank": rank, "uncertainty": round(u, 4)},
              "predictions": [{"model_version": "tlpipe", "score": round(confidence, 4),
                               "result": [{"from_name": "choice", "to_name": "image", "type": "choices",
                                           "value": {"choices": guess}}]}] if guess else []}
             for rank, image, guess, confidence, u in rows]
    atomic_write(path, lambda f: f.write(json.dumps(tasks, ensure_ascii=False, indent=1)), encoding="utf-8")


def _write_contact_sheet(path: Path, rows) -> None:
    """The picks as a grid of thumbnails, rank and the model's guess under each."""
    columns = max(1, min(COLUMNS, len(rows)))
    sheet = Image.new("RGB", (columns * THUMB, max(1, -(-len(rows) // columns)) * (THUMB + 14)), "white")
    draw = ImageDraw.Draw(sheet)
    for k, (rank, image, guess, _, _) in enumerate(rows):
        x, y = (k % columns) * THUMB, (k // columns) * (THUMB + 14)
        try:
            thumb = load_rgb(image, min_size=THUMB)
            thumb.thumbnail((THUMB, THUMB))
            sheet.paste(thumb, (x + (THUMB - thumb.width) // 2, y + (THUMB - thumb.height) // 2))
        except (OSError, ValueError):
            pass
        try:
            draw.text((x + 2, y + THUMB), f"{rank}: {LABEL_DELIMITER.join(guess)}"[:22], fill="black")
        except UnicodeEncodeError:  # Pillow's bitmap font (no FreeType) writes Latin-1 alone: the rank, then
            draw.text((x + 2, y + THUMB), f"{rank}", fill="black")
    atomic_write(path, lambda f: sheet.save(f, format="PNG"), mode="wb")
