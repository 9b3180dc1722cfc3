"""A fit's output folder, owned by one object: every file name in it, the lock and owner record that
make it one fit's alone, the staging that keeps it whole across a kill, and how readers open it.

``fit`` writes it (``tlpipe.run.outputs`` records into it); ``report``, ``export`` and ``serve`` read it.
Nothing else spells a file name of the folder, so a new file is added here and everyone sees it.
"""
from __future__ import annotations

import csv
import os
import shutil
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, NamedTuple

from filelock import FileLock, Timeout

from tlpipe.config import fit_identity
from tlpipe.errors import TlpipeError
from tlpipe.paths import BUNDLE_MANIFEST, output_folder, sweep_temporaries
from tlpipe.utils import read_json, write_json

if TYPE_CHECKING:  # tlpipe.data imports this module for its file names
    from tlpipe.data import DatasetSpec
    from tlpipe.data.source import DataSource


class SavedFit(NamedTuple):
    """The fit folder that saved a bundle, and its summary (``RunFolder.saved``)."""

    folder: RunFolder
    summary: dict


class RunFolder:
    """``<output>`` of one fit: its files by name, and the operations that keep it consistent."""

    SUMMARY = "summary.json"  # written last: a summary on disk means the rest is there
    STAGED_SUMMARY = ".summary.json.staged"  # the next summary, written before its bundle is swapped in
    STAGED_REPORTS = ".reports.staging"  # the next record's reports, moved in with it
    BUNDLE = "model"
    OWNER = ".tlpipe-fit.json"  # whose folder this is: the fit's data and config key, its process, its MLflow run
    LOCK = ".tlpipe.lock"  # held while a fit writes here; the OS releases it when the process dies
    CONFIG, PLAN, PROFILE, REPORT = "config.yaml", "plan.json", "profile.json", "report.html"
    QUARANTINE, VAL_PREDICTIONS = "quarantine.csv", "val_predictions.csv"
    VAL_PROBABILITY = "probability: "  # multi-label val_predictions.csv: a class's column is this + its name
    CLASSIFICATION_REPORT, STRATEGY = "classification_report.json", "strategy.json"
    CONFUSION_MATRIX, RELIABILITY, LEARNING_CURVES = "confusion_matrix.png", "reliability.png", "learning_curves.png"
    PR_CURVES = "pr_curves.png"  # multi-label
    DATA_CURVE = "data_curve.png"  # the val score against the train images: measured, and forecast
    LABEL_ISSUES = "label_issues.csv"  # train images whose label the codes contradict
    CHECKPOINTS, TRIALS, TUNING, STUDY_DB = "checkpoints", "trials", "tuning", "optuna.db"
    TRIALS_CSV, TUNING_SUMMARY, OPTUNA_HISTORY = "trials.csv", "tuning.json", "optuna_history.png"  # in TUNING
    CACHE, EXPORT = "cache", "export"  # kept by --overwrite (keyed by content) / the default export's folder

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    @property
    def bundle(self) -> Path:
        return self.path / self.BUNDLE

    def fit_files(self) -> tuple[str, ...]:
        """What a fit writes here, and only that: what ``--overwrite`` removes."""
        return (self.BUNDLE, self.SUMMARY, self.STAGED_SUMMARY, self.OWNER, self.PLAN, self.CONFIG, self.CHECKPOINTS,
                self.TRIALS, self.TUNING, self.STUDY_DB, self.CLASSIFICATION_REPORT, self.CONFUSION_MATRIX,
                self.RELIABILITY, self.PR_CURVES, self.LABEL_ISSUES, self.LEARNING_CURVES, self.DATA_CURVE, self.STRATEGY, self.QUARANTINE, self.VAL_PREDICTIONS,
                self.REPORT, self.PROFILE, f".{self.BUNDLE}.old", self.STAGED_REPORTS)

    # -- reading ---------------------------------------------------------------------------------

    @classmethod
    def saved(cls, bundle: str | Path) -> SavedFit | None:
        """The fit folder that saved the bundle folder ``bundle`` (its ``model/``) and its summary;
        None for a bundle moved out of it (no tlpipe summary beside it): a reader of the fit's data or
        val split then works from the bundle alone."""
        fit = cls(Path(bundle).resolve().parent)
        try:
            return SavedFit(fit, fit.read_summary())
        except TlpipeError:
            return None

    def val_predictions(self) -> list[dict[str, str]]:
        """The rows of ``val_predictions.csv`` by column (path, true, predicted, then probability or,
        multi-label, one ``VAL_PROBABILITY`` column a class); none when the fit wrote none. One line
        when a row's cells do not match the header."""
        path = self.path / self.VAL_PREDICTIONS
        if not path.exists():
            return []
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        if any(None in row or None in row.values() for row in rows):
            raise TlpipeError(f"{path} is damaged (a row's cells do not match its header): rerun the fit that wrote it")
        return rows

    def recorded_dataset(self, summary: dict) -> DatasetSpec | None:
        """The fit's data, checked and split as the fit split it (its config's val fraction and seed);
        None when the dataset is no longer there (moved, renamed, or a DataFrame): readers then work
        from the folder alone."""
        from tlpipe.config import load_config
        from tlpipe.data import prepare_dataset
        from tlpipe.data.source import recorded_source

        source = recorded_source(summary)
        if source is None:
            return None
        config = load_config(str(self / self.CONFIG)) if (self / self.CONFIG).exists() else load_config("default")
        return prepare_dataset(source, config.val_fraction, config.seed)


    def read_summary(self) -> dict:
        """The fit's ``summary.json``; one line when there is none, it is damaged or another tool's."""
        path = self.path / self.SUMMARY
        if not path.is_file():
            raise TlpipeError(f"{self.path} has no {self.SUMMARY}: give the output folder of a tlpipe fit")
        try:
            summary = read_json(path)
        except (OSError, ValueError) as exc:
            raise TlpipeError(f"cannot read {path} ({exc}): rerun the fit that wrote it") from None
        if not isinstance(summary, dict) or "tlpipe_version" not in summary:
            raise TlpipeError(f"{path} was not written by a tlpipe fit (it lacks tlpipe's fields): give the output "
                              "folder of a tlpipe fit")
        return summary

    def previous_status(self) -> str | None:
        """The status an earlier run of this fit left in ``summary.json`` (None: no summary)."""
        path = self.path / self.SUMMARY
        try:
            return read_json(path).get("status", "complete") if path.exists() else None
        except ValueError:  # a summary is written atomically; a foreign file is not ours to trust
            return None

    def owner(self) -> dict:
        try:
            owner = read_json(self.path / self.OWNER)
        except (OSError, ValueError):
            return {}
        return owner if isinstance(owner, dict) else {}

    def recorded_run(self, tracking_uri: str) -> str | None:
        """The MLflow run an earlier run of this fit logged to, in the same store (None: none)."""
        owner = self.owner()
        return owner.get("run_id") if owner.get("tracking_uri") == tracking_uri else None

    def keep_run(self, run_id: str, tracking_uri: str) -> None:
        """Remember the fit's MLflow run, so a re-run after a kill continues it rather than opening another."""
        write_json(self.path / self.OWNER, {**self.owner(), "run_id": run_id, "tracking_uri": tracking_uri})

    # -- one writer ------------------------------------------------------------------------------

    @contextmanager
    def claim(self, data: DataSource, key: str, overwrite: bool = False) -> Iterator[None]:
        """One writer: a lock held for the whole fit, and the folder's owner record. A fit of other
        data or another config (``key``: ``fit_key``) refuses a folder another fit finished or left,
        unless ``overwrite`` (its files are then removed, the content-keyed caches kept); the same fit
        again resumes. What a killed fit left half-written is swept or made whole."""
        created = not self.path.exists()
        output_folder(self.path, "--output", dataset=data)
        lock = FileLock(self.path / self.LOCK)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            other = self.owner()
            raise TlpipeError(f"{self.path} is in use by another tlpipe fit (pid {other.get('pid', '?')}, started "
                              f"{other.get('started', '?')}): wait for it to end, or give another --output") from None
        claimed = False  # a refusal below leaves another fit's record (or a user's folder) as it was
        try:
            owner = self.owner()
            if owner.get("key", key) != key or not owner and self._foreign_files():
                if not overwrite:
                    raise TlpipeError(self._refusal(owner))
                self._clear(data)
                owner = {}
            self.sweep()
            write_json(self.path / self.OWNER, {**owner, "key": key, "data": str(data.path.resolve()), "pid": os.getpid(),
                                                "started": datetime.now().isoformat(timespec="seconds")})
            claimed = True
            yield
        except Exception:  # not a cut (a BaseException): that fit resumes
            if claimed and not (self.path / self.BUNDLE).exists():  # a re-run of corrected data or settings needs no --overwrite:
                owner = {k: v for k, v in self.owner().items()  # any fit may claim the folder (still tlpipe's) and
                         if k not in ("key", "run_id", "tracking_uri")}  # open its own run: this one ended FAILED
                write_json(self.path / self.OWNER, owner)
            raise
        finally:
            if created and self._nothing_kept():  # a fit that wrote nothing of use leaves nothing (lock held:
                shutil.rmtree(self.path)  # no other fit can start here meanwhile)
            lock.release()

    def _foreign_files(self) -> list[str]:
        """The files of a fit's names that are here with no owner record: not a tlpipe fit's, a user's."""
        return [name for name in self.fit_files() if (self.path / name).exists()]

    def _refusal(self, owner: dict) -> str:
        if owner:
            return (f"{self.path} holds a fit of {owner.get('data')} with another config or other data: add "
                    "--overwrite to replace it, or give another --output")
        return (f"{self.path} holds {', '.join(self._foreign_files())}, not written by a tlpipe fit: a fit writes "
                "files of these names; give another --output, or add --overwrite to replace them")

    def _nothing_kept(self) -> bool:
        """The folder holds nothing a user needs: the lock, and at most a quarantine list without rows."""
        names = {p.name for p in self.path.iterdir()} - {self.LOCK, self.OWNER}
        quarantine = self.path / self.QUARANTINE
        if names == {self.QUARANTINE} and quarantine.is_file():
            with quarantine.open(encoding="utf-8") as rows:
                return sum(1 for _ in rows) <= 1  # the header alone
        return not names

    def _clear(self, data: DataSource) -> None:
        """The files a fit writes here, and only those (the caches, keyed by content, stay; so does
        anything else, the dataset above all, wherever it sits)."""
        keep = data.folder.resolve()
        for name in self.fit_files():
            path = self.path / name
            if keep.is_relative_to(path.resolve()):
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.exists() or path.is_symlink():
                path.unlink()

    def sweep(self) -> None:
        """Remove what a killed fit or export left half-written: temporary files, a staging bundle."""
        sweep_temporaries(self.path, recursive=True, skip=(self.CACHE,))
        shutil.rmtree(self.path / f".{self.BUNDLE}.staging", ignore_errors=True)

    # -- a record that no kill splits --------------------------------------------------------------

    def stage_bundle(self, write) -> Path:
        """``write(folder)`` into the bundle's staging folder, returned for ``swap_bundle``."""
        staging = self.path / f".{self.BUNDLE}.staging"
        shutil.rmtree(staging, ignore_errors=True)
        write(staging)
        return staging

    def swap_bundle(self, staging: Path) -> None:
        """``staging`` in place of the bundle in two renames (callers hold SIGTERM and Ctrl+C): the
        bundle is always the old one whole or the new one whole (``restore`` undoes a SIGKILL between)."""
        old = self.path / f".{self.BUNDLE}.old"
        if self.bundle.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(self.bundle, old)
        os.replace(staging, self.bundle)
        shutil.rmtree(old, ignore_errors=True)

    def commit_staged(self) -> None:
        """Move the staged reports in, then the staged summary: the summary, last, says the rest is in."""
        reports = self.path / self.STAGED_REPORTS
        if reports.is_dir():
            for path in reports.iterdir():
                os.replace(path, self.path / path.name)
            reports.rmdir()
        os.replace(self.path / self.STAGED_SUMMARY, self.path / self.SUMMARY)

    def restore(self) -> None:
        """Make the folder whole after a SIGKILL in the record stage: put back the bundle killed between
        ``swap_bundle``'s two renames, and finish the summary of a bundle that was swapped in just
        before (the staged summary names it), or drop a staged summary whose bundle never came."""
        old, staged = self.path / f".{self.BUNDLE}.old", self.path / self.STAGED_SUMMARY
        if old.is_dir() and not self.bundle.exists():
            os.replace(old, self.bundle)
        if staged.exists():
            try:
                names = read_json(staged).get("bundle_sha256")
            except ValueError:
                names = None
            if names is not None and names == bundle_identity(self.bundle):
                self.commit_staged()
                return
            staged.unlink()
        shutil.rmtree(self.path / self.STAGED_REPORTS, ignore_errors=True)


def bundle_identity(bundle: Path) -> str | None:
    """What tells one saved bundle from another: its head file's checksum, as bundle.json records it."""
    try:
        return read_json(Path(bundle) / BUNDLE_MANIFEST)["head"]["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def fit_key(data: DataSource, config: Any) -> str:
    """What makes two fits the same fit: the data folder (or table) and the config (a ``FitConfig``),
    less what does not change the model (the time budget: a re-run with more time continues the
    fit; the device, the loader workers)."""
    return fit_identity(config, "fit", data=data.identity())
