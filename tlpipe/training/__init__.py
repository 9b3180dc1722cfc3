"""Training stage: strategy 1 (a linear head on frozen codes, ``linear``) and strategies 2-3
(partial and full fine-tuning, ``finetune``), each as one function in ``strategies``; ``memory``
sizes the batch, ``distributed`` runs it under torchrun."""
from tlpipe.training.linear import CLASSIFIERS, PROBABILITY_NOTES, LinearHead, LinearProbe, fit_head, linear_estimator

__all__ = ["CLASSIFIERS", "PROBABILITY_NOTES", "LinearHead", "LinearProbe", "fit_head", "linear_estimator"]
