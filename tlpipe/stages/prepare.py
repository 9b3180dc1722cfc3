"""Stage 1 of ``fit``, prepare: the data checked and split (the quarantine report in the output
folder), the backbone built (with ``candidates`` under auto, the one the transfer signals rank
best), the resolved config saved; and the fit's MLflow run opened."""
from __future__ import annotations

import re

from tlpipe.cache import cache_root
from tlpipe.config import FitConfig, config_to_yaml
from tlpipe.data import DatasetSpec, prepare_dataset
from tlpipe.errors import TlpipeError
from tlpipe.models import Backbone, build_backbone
from tlpipe.run.folder import RunFolder
from tlpipe.stages.context import FitContext, Prepared
from tlpipe.strategy.auto import rank_backbones
from tlpipe.run.tracking import FitRun, NoRun
from tlpipe.utils import atomic_write


def prepare(ctx: FitContext, config: FitConfig) -> Prepared:
    """Check and split the data (quarantine report in the output folder) and build the backbone."""
    ranks, out = ctx.ranks, ctx.out
    if ranks.is_main:
        ctx.folder.restore()  # a fit killed while it replaced its bundle
    with ctx.timings.stage("check_data"):
        spec = prepare_dataset(ctx.data, config.val_fraction, config.seed, report_dir=out if ranks.is_main else None)
    config = for_task(config, spec, ranks.enabled)
    with ctx.timings.stage("load_backbone"):
        backbone, ranking = choose_backbone(config, spec)
    config = config.model_copy(update={"backbone": backbone.name,  # one cache for the fit, its trials and the guard
                                       "cache_dir": str(cache_root(config.cache_dir, out).resolve())})
    if ranks.is_main:
        atomic_write(out / RunFolder.CONFIG, lambda f: f.write(config_to_yaml(config)))
    return Prepared(spec, config, backbone, ranking)


MULTILABEL_MIN_CROP = 0.8  # of a multi-label image's area a training crop keeps


def for_task(config: FitConfig, spec: DatasetSpec, distributed: bool = False) -> FitConfig:
    """The config a multi-label set is fitted with: logistic regression alone (one-vs-rest; an SVM
    gives no per-class probabilities to threshold), and training crops that keep at least
    ``MULTILABEL_MIN_CROP`` of the image: a smaller crop can cut a labelled object out and teach
    the network it is absent. Fine-tuning one under torchrun is refused: the epochs' val mAP is
    scored in one process."""
    if not spec.multilabel:
        return config
    if distributed and config.strategy != "linear":
        raise TlpipeError("fine-tuning a multi-label set under torchrun is not supported yet: run tlpipe fit in one "
                          "process, or use --strategy linear")
    low, high = config.augment.crop_scale
    return config.model_copy(update={"linear": config.linear.model_copy(update={"classifiers": ["logreg"]}),
                                     "tuning": config.tuning.model_copy(update={"classifiers": ["logreg"]}),
                                     "augment": config.augment.model_copy(update={"crop_scale": [max(low, MULTILABEL_MIN_CROP),
                                                                                                 max(high, MULTILABEL_MIN_CROP)]})})


def choose_backbone(config: FitConfig, spec: DatasetSpec) -> tuple[Backbone, list[dict]]:
    """The recipe's backbone, or with ``candidates`` under auto the one the transfer signals rank
    best; returns it with the ranking (empty when there was nothing to rank)."""
    if config.strategy != "auto" or len(config.candidates) < 2:
        return build_backbone(config), []
    build = lambda name: build_backbone(config.model_copy(update={"backbone": name}))  # noqa: E731
    ranking = rank_backbones(config.candidates, spec, config, build)
    return build(ranking[0]["backbone"]), ranking


def open_run(ctx: FitContext, experiment: str | None, tracking_uri: str) -> FitRun:
    """The fit's MLflow run (rank 0) in the resolved store ``tracking_uri``, in an experiment named
    after the dataset folder by default; a killed run of this very fit is continued (the folder's
    owner record names it)."""
    if not ctx.ranks.is_main:
        return NoRun()
    experiment = experiment or re.sub(r"[^\w.-]+", "_", ctx.data.name) or "tlpipe"
    return FitRun(experiment, tracking_uri, run_name=ctx.out.name, resume_id=ctx.folder.recorded_run(tracking_uri))
