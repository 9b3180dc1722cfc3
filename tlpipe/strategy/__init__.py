"""Strategy stage: which transfer strategy suits the data, measured rather than guessed.

``frozen_pass`` (one hooked forward pass: every stage's codes, BatchNorm moments, ImageNet
confidence) -> ``signals`` (the probes, kNN, LogME (``logme``) and domain gap computed from it) ->
``auto.assess`` (signals, study cost) -> ``decision.decide`` (the 2x2 rule on measured size,
distance and cost) -> ``policy.choose_tap`` (the linear tap on validation) -> ``policy.guard``
(after a fine-tune: keep it only if it beats the tuned linear classifier). Each step returns a new
``Decision``; ``fit`` and ``inspect`` call the same functions. ``plan``: how a fine-tune spends
the time the budget leaves (resolution, epochs, trials), made before it starts.
"""
from tlpipe.strategy.decision import Decision, decide
from tlpipe.strategy.frozen_pass import BatchNormStats, FeatureSet, collect_features, collect_splits
from tlpipe.strategy.logme import logme
from tlpipe.strategy.signals import Signals, compute_signals

__all__ = ["BatchNormStats", "Decision", "FeatureSet", "Signals", "collect_features", "collect_splits", "compute_signals",
           "decide", "logme"]
