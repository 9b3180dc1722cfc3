"""Training strategies. Strategy 1 (linear on frozen codes) lives in ``linear``; fine-tuning joins here."""
from tlpipe.training.linear import CLASSIFIERS, PROBABILITY_NOTES, LinearHead, LinearProbe

__all__ = ["CLASSIFIERS", "PROBABILITY_NOTES", "LinearHead", "LinearProbe"]
