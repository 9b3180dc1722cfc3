"""Looking at data without fitting: ``inspect`` (what ``fit`` would see, choose and plan) and
``extract`` (the CNN codes of every image, for a downstream classifier; ``tlpipe.codes``)."""
from __future__ import annotations

from pathlib import Path

from tlpipe.budget import Budget, parse_duration
from tlpipe.config import FitConfig, load_config
from tlpipe.data import prepare_dataset
from tlpipe.models import build_backbone, dataset_codes
from tlpipe.stages.planning import new_plan
from tlpipe.stages.prepare import choose_backbone
from tlpipe.strategy.auto import assess
from tlpipe.strategy.policy import choose_tap
from tlpipe.strategy.signals import collect_splits


def inspect(data: str | Path, config: FitConfig | None = None, *, recipe: str = "default") -> dict:
    """What ``tlpipe fit --strategy auto`` would see and do, without training or writing anything:
    the data profile (counts, sizes, greyscale, duplicates, leakage), the transfer signals, the
    decision with its reasons and tap (the same policy steps as the fit's, the guard aside), the
    fit's estimated time (and memory, for a fine-tune) and, for a fine-tune, the plan the fit would
    make within ``config.budget`` (the time inspect has taken counting as the fit's first stages)."""
    from tlpipe.data.profile import profile_dataset
    from tlpipe.strategy.auto import estimate_training_memory

    config = (config or load_config(recipe)).model_copy(update={"strategy": "auto"})
    budget = Budget(parse_duration(config.budget))
    spec = prepare_dataset(Path(data).expanduser(), config.val_fraction, config.seed, report_dir=None)
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


def extract(data: str | Path, out: str | Path, config: FitConfig | None = None, *, recipe: str = "default",
            overwrite: bool = False) -> Path:
    """Write the CNN codes of every valid image of ``data`` (all splits as found) to ``out``:
    ``.npz`` (see ``tlpipe.codes``) or ``.parquet``, replacing an existing file only with
    ``overwrite``. Files that fail the check are left out and listed, with the reason, in the
    file's metadata."""
    from tlpipe.codes import FORMATS, save_codes
    from tlpipe.paths import output_file

    out = output_file(out, "--out", suffixes=FORMATS, overwrite=overwrite, dataset=data)
    config = config or load_config(recipe)
    spec = prepare_dataset(data, seed=config.seed, hold_out=False, report_dir=None)
    backbone = build_backbone(config)
    parts = {split: dataset_codes(backbone, spec, split, config) for split in spec.splits}
    return save_codes(out, spec, parts, backbone, config)
