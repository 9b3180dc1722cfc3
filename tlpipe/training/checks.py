"""What a fine-tune's epochs are checked against: whether the run has started learning
(``LearningCheck``; ``Diverged`` when it has not) and how many epochs its time allows
(``EpochAllowance``). Plain arithmetic on the epoch's metrics and the clock: ``Finetuner`` asks, the
fits that start it set them."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass


class Diverged(Exception):
    """The fine-tune has not started learning; the message says which sign showed it."""


@dataclass(frozen=True)
class LearningCheck:
    """The signs that a fine-tune has not started learning: a non-finite train loss; a train loss
    above chance (ln K, a uniform guess; multi-label: each class guessed at its share, its positives
    weighed as the loss weighs them) at the end of the first epoch (the mean over its second half:
    the first steps ramp the learning rate up from an LP-FT start far below chance); a val score
    within two standard errors of chance after two epochs. The score is the balanced accuracy (chance:
    one in K), which class weights do not move off chance the way they move plain accuracy below the
    largest class's share; multi-label: mAP (chance: the classes' mean share)."""

    n_classes: int
    val_chance: float  # the val score of a guess, on the val images scored each epoch
    val_images: int
    label_shares: tuple[float, ...] = ()  # multi-label: each class's share of the train images
    positive_weights: tuple[float, ...] = ()  # multi-label: the loss's weight of each class's positives
    val_counts: tuple[int, ...] = ()  # single-label: the val images scored each epoch, per class

    def _chance_loss(self) -> tuple[float, str]:
        if not self.label_shares:
            return math.log(self.n_classes), f"ln {self.n_classes} = {math.log(self.n_classes):.3f}"
        losses = []
        for p, w in zip(self.label_shares, self.positive_weights or (1.0,) * len(self.label_shares)):
            p = min(max(p, 1e-6), 1 - 1e-6)
            q = w * p / (w * p + 1 - p)  # the best constant guess under the weighted loss
            losses.append(-w * p * math.log(q) - (1 - p) * math.log(1 - q))
        loss = sum(losses) / len(losses)
        return loss, f"each class guessed at its share: {loss:.3f}"

    def _standard_error(self) -> float:
        present = [n for n in self.val_counts if n]
        if not present:
            return math.sqrt(self.val_chance * (1 - self.val_chance) / max(self.val_images, 1))
        k = len(present)  # each class's recall at chance, 1/k, over its own images
        return math.sqrt(sum((1 / k) * (1 - 1 / k) / n for n in present)) / k

    def verdict(self, epoch: int, metrics: dict) -> str | None:
        loss, (chance_loss, chance) = metrics.get("train_loss_end", metrics["train_loss"]), self._chance_loss()
        if not math.isfinite(loss) or not math.isfinite(metrics["train_loss"]):
            return f"the train loss is {metrics['train_loss']} at epoch {epoch}"
        if epoch == 1 and loss > chance_loss:
            return f"train loss {loss:.3f} at the end of the first epoch, above chance ({chance})"
        multilabel = bool(self.label_shares)
        score, guess = ("mAP", "the classes' mean share") if multilabel else ("balanced accuracy", "one in each class's guesses")
        value = metrics["val_accuracy"] if multilabel else metrics.get("val_balanced_accuracy", metrics["val_accuracy"])
        if epoch == 2 and value <= self.val_chance + 2 * self._standard_error():
            return (f"val {score} {value:.3f} after two epochs, at chance ({guess}, "
                    f"{self.val_chance:.3f}, + 2 standard errors)")
        return None


@dataclass(frozen=True)
class EpochAllowance:
    """How long a run may train: until ``deadline`` (``time.monotonic()``), less what the ``queued``
    runs after it need for their planned ``epochs`` at this run's pace. After its first epoch the
    run takes its planned epochs while the queued ones still fit whole after it, else all the time
    (up to ``stretch`` times its epochs): the planned epochs of the run that started first pay more
    than a queued run cut to a few (those wait for a re-run). Never fewer than ``least``."""

    deadline: float
    epochs: int
    queued: int = 0
    stretch: float = 2.0
    least: int = 1

    def fitted(self, done: int, pace: float) -> int:
        """The run's epochs, ``done`` of them run at ``pace`` seconds each."""
        left, pace = max(self.deadline - time.monotonic(), 0.0), max(pace, 1e-6)
        whole = pace * self.epochs  # a queued run, planned epochs at this pace
        after = int(max(left - max(self.epochs - done, 0) * pace, 0.0) // whole)
        kept = min(self.queued, after)  # queued runs that still fit whole after this one
        most = self.epochs if kept else max(self.epochs, round(self.epochs * self.stretch))
        fit = done + int(max(left - kept * whole, 0.0) // pace)
        return max(min(fit, most), self.least, done)
