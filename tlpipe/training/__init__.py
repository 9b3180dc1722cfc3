"""Training stage: strategy 1 (a linear head on frozen codes, ``linear``; the head itself in ``head``,
which predicting needs without scikit-learn) and strategies 2-3 (partial and full fine-tuning,
``finetune``: the loop; ``layers``: which layers train, and how; ``checks``: whether it learns and
how many epochs its time allows; ``checkpoint``: resuming exactly; ``frozen``: frozen stages run
once), each as one function in ``fits``; ``multilabel``: strategy 1 for label sets; ``memory`` sizes
the batch, ``speed`` times the steps a plan is made from, ``distributed`` runs it under torchrun. The names below load on first use (PEP 562): a bundle loads without scikit-learn."""
from importlib import import_module

_HOMES = {"CLASSIFIERS": "head", "PROBABILITY_NOTES": "head", "LinearHead": "head",
          "LinearProbe": "linear", "fit_head": "linear", "linear_estimator": "linear"}
__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name in _HOMES:
        return getattr(import_module(f"tlpipe.training.{_HOMES[name]}"), name)
    raise AttributeError(f"module 'tlpipe.training' has no attribute {name!r}")
