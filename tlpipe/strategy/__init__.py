"""Choosing a transfer strategy: cheap signals of how well the frozen backbone fits the data."""
from tlpipe.strategy.logme import logme
from tlpipe.strategy.signals import BatchNormStats, FeatureSet, Signals, collect_features, collect_splits, compute_signals

__all__ = ["BatchNormStats", "FeatureSet", "Signals", "collect_features", "collect_splits", "compute_signals", "logme"]
