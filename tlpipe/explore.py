"""Looking at data without fitting: ``inspect`` (what ``fit`` would see, choose and plan) and
``extract`` (the CNN codes of every image, for a downstream classifier), in this file format:

``.npz`` (read with ``np.load(path)``, no pickle needed):
  ``features`` float32 (N, D); ``labels`` int64 (N,), index into ``classes`` (a multi-label
  table: (N, C), 1 where the image has the class); ``classes`` str (C,);
  ``paths`` str (N,), relative to the dataset folder, POSIX separators; ``splits`` str (N,):
  train / val / test as found in the folder; ``meta`` str (): JSON with backbone, weights source
  and sha256, layer, data config, tlpipe version, and the files left out with the reason.
``.parquet``: columns ``path``, ``split``, ``label``, ``class``, ``features`` (fixed-size list of
  float32); the same ``meta`` JSON in the schema metadata under ``b"tlpipe"``. A multi-label
  table's ``label`` is the list of its class indices, ``class`` their names joined by ``;``.
Rows are sorted by split, class, then path, so the same data gives the same file.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np

from tlpipe.budget import Budget, parse_duration
from tlpipe.config import FitConfig, load_config
from tlpipe.data import DatasetSpec, prepare_dataset
from tlpipe.data.table import LABEL_DELIMITER, LabelTable
from tlpipe.models import Backbone, build_backbone, dataset_codes, resolve_layer
from tlpipe.stages.planning import new_plan
from tlpipe.stages.prepare import choose_backbone
from tlpipe.strategy.auto import assess
from tlpipe.strategy.policy import choose_tap
from tlpipe.strategy.frozen_pass import collect_splits
from tlpipe.utils import atomic_write
from tlpipe.version import __version__

FORMATS = (".npz", ".parquet")


def inspect(data: str | Path | LabelTable, config: FitConfig | None = None, *, recipe: str = "default") -> dict:
    """What ``tlpipe fit --strategy auto`` would see and do, without training or writing anything:
    the data profile (counts, sizes, greyscale, duplicates, leakage), the transfer signals, the
    decision with its reasons and tap (the same policy steps as the fit's, the guard aside), the
    fit's estimated time (and memory, for a fine-tune) and, for a fine-tune, the plan the fit would
    make within ``config.budget`` (the time inspect has taken counting as the fit's first stages)."""
    from tlpipe.data.profile import profile_dataset
    from tlpipe.strategy.auto import estimate_training_memory

    config = (config or load_config(recipe)).model_copy(update={"strategy": "auto"})
    budget = Budget(parse_duration(config.budget))
    spec = prepare_dataset(data, config.val_fraction, config.seed, report_dir=None)
    profile = profile_dataset(spec)
    backbone, ranking = choose_backbone(config, spec)
    config = config.model_copy(update={"backbone": backbone.name})
    assessment, _ = choose_tap(assess(collect_splits(backbone, spec, config), spec, config), config)
    decision, result = assessment.decision, assessment.to_dict()
    if decision.strategy != "linear":
        result["estimate"] = {**assessment.estimate, **estimate_training_memory(backbone, config)}
        result["plan"] = new_plan(spec, backbone, assessment.apply(config), budget.left(), None).to_dict()
    return {
        "data": str(spec.root), "classes": spec.classes, "splits": spec.counts(), "val_from": spec.val_from,
        "quarantined": [(spec.relative(path), why) for path, why in spec.quarantined],
        "profile": profile.to_dict(), "backbone": backbone.name, "backbone_ranking": ranking,
        "strategy": decision.strategy, "layer": decision.tap, **result,
    }


def extract(data: str | Path | LabelTable, out: str | Path, config: FitConfig | None = None, *, recipe: str = "default",
            overwrite: bool = False) -> Path:
    """Write the CNN codes of every valid image of ``data`` (all splits as found) to ``out``:
    ``.npz`` or ``.parquet``, replacing an existing file only with
    ``overwrite``. Files that fail the check are left out and listed, with the reason, in the
    file's metadata."""
    from tlpipe.paths import output_file

    out = output_file(out, "--out", suffixes=FORMATS, overwrite=overwrite, dataset=data)
    config = config or load_config(recipe)
    spec = prepare_dataset(data, seed=config.seed, hold_out=False, report_dir=None)
    backbone = build_backbone(config)
    parts = {split: dataset_codes(backbone, spec, split, config) for split, samples in spec.splits.items()
             if samples}  # an empty test/ (or one whose images all failed the check) has no codes to write
    return save_codes(out, spec, parts, backbone, config)


def save_codes(out: Path, spec: DatasetSpec, parts: dict[str, tuple[np.ndarray, np.ndarray]], backbone: Backbone, config: FitConfig) -> Path:
    """The codes ``parts`` (features, labels per split) to ``out``, checked first by ``extract``, atomically."""
    splits = [split for split in parts for _ in spec.splits[split]]
    paths = [spec.relative(s.path) for split in parts for s in spec.splits[split]]
    features = np.concatenate([parts[s][0] for s in parts]).astype(np.float32)
    labels = np.concatenate([parts[s][1] for s in parts]).astype(np.int64)
    meta = json.dumps({
        "tlpipe_version": __version__,
        "backbone": backbone.name, "arch": backbone.arch, "weights": backbone.weights.to_dict(),
        "layer": resolve_layer(backbone.model, config.layer), "layer_relu": config.layer_relu,
        "data_config": backbone.data_config,
        "quarantined": [[spec.relative(p), why] for p, why in spec.quarantined],
    }, default=str)
    if out.suffix == ".npz":
        buffer = io.BytesIO()
        np.savez(buffer, features=features, labels=labels, classes=np.array(spec.classes, dtype=str),
                 paths=np.array(paths, dtype=str), splits=np.array(splits, dtype=str), meta=np.array(meta))
        return atomic_write(out, lambda f: f.write(buffer.getvalue()), mode="wb")
    import pyarrow as pa
    import pyarrow.parquet as pq

    indices = [list(np.flatnonzero(row)) for row in labels] if spec.multilabel else labels
    table = pa.table({
        "path": paths, "split": splits, "label": indices,
        "class": [LABEL_DELIMITER.join(spec.classes[i] for i in row) for row in indices] if spec.multilabel else
                 [spec.classes[i] for i in labels],
        "features": pa.FixedSizeListArray.from_arrays(pa.array(features.reshape(-1)), features.shape[1]),
    }).replace_schema_metadata({b"tlpipe": meta.encode()})
    return atomic_write(out, lambda f: pq.write_table(table, f), mode="wb")
