"""Chaos: fits SIGKILLed at random moments and at stage boundaries, each re-run to the end; then
how many MLflow runs were left RUNNING, how many output folders fail a consistency check, and
whether every final bundle predicts exactly as an unbroken run's.

1. reference: one unbroken ``tlpipe fit`` (a partial fine-tune, no tuning, so it has every stage:
   data check, codes, the linear classifier saved first, plan, epochs with checkpoints, record).
2. ``--kills`` fits of the same command, each in a fresh output folder on one shared SQLite store:
   SIGKILL when a stage's file appears (plan.json, the first summary.json, the first checkpoint, the
   staged summary of the record stage, the swapped bundle), then at uniform random moments of the
   reference's wall time; then the same command again, to the end.
3. Checks per folder: every JSON parses, every safetensors file loads, the bundle loads and predicts,
   ``summary.json`` names the run in the folder's owner record and the bundle it sits beside; and
   across the store: no run left RUNNING. The final bundles' val probabilities against the reference's.

``--race ROUNDS`` instead starts four fits at the same moment on a new SQLite store, ROUNDS times,
and prints how many succeeded.

Run from the repo root:  python bench/chaos.py [--kills 10] [--data DIR] [--seed 0]
                         python bench/chaos.py --race 5
"""
from __future__ import annotations

import argparse
import json
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
TRIGGERS = ["plan.json", "summary.json", "checkpoints/checkpoint.pt", "model/bundle.json", ".summary.json.staged", ".model.old"]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--data", type=Path, default=None, help="dataset folder (default: a generated 3-class one)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--race", type=int, default=0, metavar="ROUNDS",
                        help="instead: ROUNDS times, 4 fits started together on a new SQLite store")
    return parser.parse_args()


def make_data(root: Path) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for c, colour in enumerate([(220, 40, 40), (40, 170, 60), (40, 70, 220)]):
        for k in range(16):
            pixels = np.clip(np.array(colour) + rng.integers(-40, 41, (48, 48, 3)), 0, 255).astype(np.uint8)
            (root / f"class {c}").mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(root / f"class {c}" / f"{k}.jpg")
    return root


def command(data: Path, out: Path, store: str) -> list[str]:
    return [sys.executable, "-m", "tlpipe", "fit", str(data), "-o", str(out), "--strategy", "partial", "--epochs", "3",
            "--trials", "0", "--image-size", "96", "--workers", "0", "--device", "cpu", "--tracking-uri", store]


def killed_then_finished(cmd: list[str], out: Path, trigger: str | float) -> str:
    """Run ``cmd``, SIGKILL it when ``trigger`` (a file under ``out``, or seconds) comes, run it again to
    the end. Returns when the kill landed (or that the fit ended first)."""
    start = time.monotonic()
    fit = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while fit.poll() is None:
        due = (time.monotonic() - start >= trigger) if isinstance(trigger, float) else (out / trigger).exists()
        if due:
            fit.send_signal(signal.SIGKILL)
            fit.wait()
            break
        time.sleep(0 if isinstance(trigger, str) else 0.005)  # the record stage's files live for milliseconds
    landed = f"killed at {time.monotonic() - start:.1f} s" if fit.returncode == -signal.SIGKILL else "ended before the kill"
    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if rerun.returncode:
        raise SystemExit(f"the re-run failed ({landed}): {rerun.stderr[-2000:]}")
    return landed


def problems(out: Path) -> list[str]:
    """What is inconsistent in a finished output folder (empty: nothing)."""
    from safetensors.torch import load_file

    from tlpipe.bundle import load_bundle
    from tlpipe.run.folder import RunFolder, bundle_identity

    found = []
    for path in out.rglob("*.json"):
        try:
            json.loads(path.read_text())
        except ValueError:
            found.append(f"{path.relative_to(out)} does not parse")
    for path in out.rglob("*.safetensors"):
        try:
            load_file(str(path))
        except Exception as exc:  # noqa: BLE001 - any failure is the finding
            found.append(f"{path.relative_to(out)} does not load ({exc})")
    summary, owner = json.loads((out / "summary.json").read_text()), json.loads((out / RunFolder.OWNER).read_text())
    if summary.get("status") != "complete":
        found.append(f"summary status {summary.get('status')}")
    if summary.get("run_id") != owner.get("run_id"):
        found.append("summary.json names another run than the folder's")
    if summary.get("bundle_sha256") != bundle_identity(out / "model"):
        found.append("summary.json names another bundle")
    try:
        load_bundle(out / "model", "cpu")
    except Exception as exc:  # noqa: BLE001
        found.append(f"the bundle does not load ({exc})")
    return found


def val_probabilities(out: Path) -> np.ndarray:
    from tlpipe.bundle import load_bundle

    summary = json.loads((out / "summary.json").read_text())
    bundle = load_bundle(out / "model", "cpu")
    images = sorted(Path(summary["data"]).rglob("*.jpg"))
    return bundle.predict_proba(images, workers=0)


def race(data: Path, tmp: Path, rounds: int) -> None:
    """``rounds`` times, four fits started at the same moment on a store that does not exist yet."""
    for round_ in range(rounds):
        store = f"sqlite:///{tmp / f'race{round_}' / 'mlflow.db'}"
        fits = [subprocess.Popen(command(data, tmp / f"race{round_}" / f"fit{i}", store), stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE, text=True) for i in range(4)]
        codes = [fit.wait(timeout=1800) for fit in fits]
        failed = [fit.stderr.read()[-300:] for fit, code in zip(fits, codes) if code]
        print(f"round {round_ + 1}: {codes.count(0)} of 4 fits succeeded" + (f"; {failed[0]}" if failed else ""))


def main() -> None:
    args = parse_args()
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = args.data or make_data(tmp / "data")
        if args.race:
            return race(data, tmp, args.race)
        store = f"sqlite:///{tmp / 'mlflow.db'}"
        start = time.monotonic()
        subprocess.run(command(data, tmp / "reference", store), check=True, capture_output=True, timeout=1800)
        wall = time.monotonic() - start
        reference = val_probabilities(tmp / "reference")
        print(f"reference fit: {wall:.1f} s")
        triggers = TRIGGERS[: args.kills] + [rng.uniform(0.5, wall) for _ in range(max(0, args.kills - len(TRIGGERS)))]
        inconsistent, differ = 0, 0
        for i, trigger in enumerate(triggers):
            out = tmp / f"kill{i}"
            landed = killed_then_finished(command(data, out, store), out, trigger)
            found = problems(out)
            gap = float(np.abs(val_probabilities(out) - reference).max())
            inconsistent += bool(found)
            differ += gap > 1e-5
            what = trigger if isinstance(trigger, str) else f"{trigger:.1f} s"
            print(f"kill {i + 1:2d} at {what:<28} {landed:<22} consistent: {not found}  max |p - reference| {gap:.1e}"
                  + (f"  {'; '.join(found)}" if found else ""))
        from mlflow.tracking import MlflowClient

        client = MlflowClient(store)
        experiments = [e.experiment_id for e in client.search_experiments()]
        running = client.search_runs(experiments, "attributes.status = 'RUNNING'")
        print(f"\n{len(triggers)} kills: {len(running)} runs left RUNNING, {inconsistent} inconsistent output folders, "
              f"{differ} final bundles predicting otherwise than the unbroken run")


if __name__ == "__main__":
    main()
