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
    above chance (ln K, a uniform guess; multi-label: the binary entropy of each class's share) at
    the end of the first epoch (the mean over its second half: the first steps ramp the learning
    rate up from an LP-FT start far below chance); a val score within two standard errors of
    chance after two epochs (accuracy: the largest val class's share; mAP: the classes' mean share)."""

    n_classes: int
    val_chance: float  # the val score of a guess, on the val images scored each epoch
    val_images: int
    label_shares: tuple[float, ...] = ()  # multi-label: each class's share of the train images

    def _chance_loss(self) -> tuple[float, str]:
        if not self.label_shares:
            return math.log(self.n_classes), f"ln {self.n_classes} = {math.log(self.n_classes):.3f}"
        shares = [min(max(p, 1e-6), 1 - 1e-6) for p in self.label_shares]
        loss = sum(-p * math.log(p) - (1 - p) * math.log(1 - p) for p in shares) / len(shares)
        return loss, f"each class guessed at its share: {loss:.3f}"

    def verdict(self, epoch: int, metrics: dict) -> str | None:
        loss, (chance_loss, chance) = metrics.get("train_loss_end", metrics["train_loss"]), self._chance_loss()
        if not math.isfinite(loss) or not math.isfinite(metrics["train_loss"]):
            return f"the train loss is {metrics['train_loss']} at epoch {epoch}"
        if epoch == 1 and loss > chance_loss:
            return f"train loss {loss:.3f} at the end of the first epoch, above chance ({chance})"
        se = math.sqrt(self.val_chance * (1 - self.val_chance) / max(self.val_images, 1))
        score, guess = ("mAP", "the classes' mean share") if self.label_shares else ("accuracy", "the largest class's share")
        if epoch == 2 and metrics["val_accuracy"] <= self.val_chance + 2 * se:
            return (f"val {score} {metrics['val_accuracy']:.3f} after two epochs, at chance ({guess}, "
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
