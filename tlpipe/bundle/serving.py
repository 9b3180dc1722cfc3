"""The bundle as an MLflow model: ``mlflow.pyfunc.load_model`` predicts like it, ``mlflow models serve`` serves it.

Every fit logs one, ``runs:/<run id>/model``. It is a model from code: ``tlpipe/bundle/mlflow_model.py``
names the class, so nothing is pickled; the bundle rides along as an artifact (with its backbone
weights unless a pinned pip package gives them back), tlpipe itself as code, and the pip
requirements pin the versions the fit ran with. The input is a column ``image`` of encoded
image files (bytes; base64 strings too, which is what JSON requests carry); each row gets its
label, its top-k labels and probabilities, and the probability of every class, in the order of
the model's ``classes`` metadata (a multi-label model: its set of ``labels`` over their thresholds,
their ``label_probabilities``, and every class's probability). A request holds at most ``row_cap()`` rows (256 unless
``TLPIPE_SERVE_MAX_ROWS`` says otherwise: ``tlpipe serve --max-rows``).

The server runs the tlpipe code stored with the model, not this environment's: the model's metadata
records that code's version and checksum, and ``check_served_model`` compares them before serving.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import io
import os
import shutil
import re
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

import pandas as pd
from mlflow.pyfunc import PythonModel

from tlpipe.errors import TlpipeError

IMAGE_COLUMN = "image"
MODEL_NAME = "model"  # runs:/<run id>/model
DEFAULT_TOP_K = 3
MAX_ROWS_ENV, DEFAULT_MAX_ROWS = "TLPIPE_SERVE_MAX_ROWS", 256
REJECT_ENV = "TLPIPE_SERVE_REJECT"  # "false": no image is flagged unknown, whatever a request asks (tlpipe serve --no-reject)
_PACKAGE = Path(__file__).parents[1]  # the code a fit's model carries (code_paths) and runs
_CODE = _PACKAGE / "bundle" / "mlflow_model.py"


class BundleModel(PythonModel):
    """``predict(DataFrame with an image column) -> DataFrame``: the bundle's own prediction path."""

    def load_context(self, context) -> None:
        from tlpipe.bundle.folder import load_bundle

        self.bundle = load_bundle(context.artifacts["bundle"])

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        if IMAGE_COLUMN not in getattr(model_input, "columns", ()):
            raise _bad_input(f"the input needs a column '{IMAGE_COLUMN}' of image files (bytes or base64 strings)")
        limit = row_cap()
        if len(model_input) > limit:
            raise _bad_input(f"{len(model_input)} rows in one request, more than the {limit} this server takes: "
                             f"send at most {limit} per request (or serve with a larger tlpipe serve --max-rows)")
        if len(model_input) == 0:
            return pd.DataFrame(columns=["label", "probability", "top_k_labels", "top_k_probabilities", "probabilities",
                                         *(["unknown", "unknown_score"] if self.bundle.unknowns else [])])
        from tlpipe.data.loader import decode_size

        size = decode_size(self.bundle.backbone.data_config)  # JPEGs decode as `tlpipe predict` decodes files
        pictures = [_decode(value, row, size) for row, value in enumerate(model_input[IMAGE_COLUMN])]
        codes = self.bundle.image_codes(pictures)
        return pd.concat([self._answers(codes, params or {}), self._unknowns(codes, params or {})], axis=1)

    def _answers(self, codes, params: dict) -> pd.DataFrame:
        classes = self.bundle.classes
        if self.bundle.head.multilabel:  # each row's set of classes (possibly none), most probable first
            probabilities = self.bundle.head.predict_proba(codes)
            sets = self.bundle.label_sets(probabilities)
            return pd.DataFrame({"labels": [[classes[j] for j in row] for row in sets],
                                 "label_probabilities": [[float(p[j]) for j in row] for p, row in zip(probabilities, sets)],
                                 "probabilities": [[float(v) for v in p] for p in probabilities]})
        top_k = max(1, min(int(params.get("top_k", DEFAULT_TOP_K)), len(classes)))
        probabilities, order = self.bundle.ranked(codes, top_k)
        return pd.DataFrame({
            "label": [classes[row[0]] for row in order],
            "probability": [float(p[row[0]]) for p, row in zip(probabilities, order)],
            "top_k_labels": [[classes[j] for j in row] for row in order],
            "top_k_probabilities": [[float(p[j]) for j in row] for p, row in zip(probabilities, order)],
            "probabilities": [[float(v) for v in p] for p in probabilities],
        })

    def _unknowns(self, codes, params: dict) -> pd.DataFrame:
        """``unknown`` (the image is of no class the model knows) and its score, where the bundle
        can tell; a request's ``params={"reject": false}``, or the server's ``REJECT_ENV=false``, turns
        the flag off, the score stays (MLflow fills a request's params from the signature's defaults:
        the server's choice cannot be a default a request overrides)."""
        asked = (params.get("reject", True), os.environ.get(REJECT_ENV, "true"))
        scored = self.bundle.unknown_scores(codes, all(str(value).lower() not in ("false", "0") for value in asked))
        if scored is None:
            return pd.DataFrame(index=range(len(codes)))
        return pd.DataFrame({"unknown": [bool(v) for v in scored[1]], "unknown_score": [float(v) for v in scored[0]]})


def row_cap() -> int:
    """The most rows one request may hold: without a cap one request can hold the server for minutes."""
    value = os.environ.get(MAX_ROWS_ENV, str(DEFAULT_MAX_ROWS))
    if not value.isdigit() or int(value) < 1:
        raise TlpipeError(f"{MAX_ROWS_ENV}={value!r} is not a number of rows: set a whole number of 1 or more")
    return int(value)


def _bad_input(message: str) -> Exception:
    """An MLflow error the scoring server answers with HTTP 400 and this message."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def _decode(value: Any, row: int, min_size: int):
    """One row's image as ``tlpipe predict`` decodes a file (EXIF rotation, modes, bombs refused)."""
    from PIL import Image, UnidentifiedImageError

    from tlpipe.data import load_rgb

    if isinstance(value, str):
        try:
            value = "".join((value.split(",", 1)[1] if value.startswith("data:") else value).split())  # wrapped lines too
            value = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise _bad_input(f"row {row}: a string that is not base64: send the image file's bytes, base64-encoded") from None
    if not isinstance(value, (bytes, bytearray)) or not value:
        raise _bad_input(f"row {row}: expected an image file's bytes (or base64 string), got {type(value).__name__}")
    try:
        return load_rgb(io.BytesIO(value), min_size)
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError) as exc:
        raise _bad_input(f"row {row}: not a readable image ({type(exc).__name__}: {exc})") from None


def log_model(run, bundle: Path) -> str:
    """Log ``bundle`` to ``run`` (a ``FitRun``) as its MLflow model, replacing one logged before by
    the same run (a resumed fit); returns the checksum of the tlpipe code stored with it, which
    ``tlpipe serve`` checks (the model is ``runs:/<run id>/model``)."""
    import mlflow
    from mlflow.models import Model, infer_signature

    from tlpipe.version import __version__
    from tlpipe.bundle.folder import load_bundle, portable_bundle

    replaced = logged_models(run.client, run.run_id)
    with tempfile.TemporaryDirectory() as folder, tracking(run.tracking_uri):
        artifacts = portable_bundle(Path(bundle), Path(folder) / "bundle")
        code = Path(folder) / "code" / _PACKAGE.name  # no compiled files: the checksum covers all the copy holds
        shutil.copytree(_PACKAGE, code, ignore=shutil.ignore_patterns("__pycache__"))
        checksum = code_sha256(code)
        model = BundleModel()
        model.bundle = load_bundle(artifacts)
        example = pd.DataFrame({IMAGE_COLUMN: [_example_image()]})
        signature = infer_signature(example, model.predict(None, example), params={"top_k": DEFAULT_TOP_K, "reject": True})
        # Made here, in the run's experiment: Model.log would make it in the fluent API's current one.
        logged = run.client.create_logged_model(run.experiment_id, name=MODEL_NAME, source_run_id=run.run_id)
        Model.log(None, name=MODEL_NAME, flavor=mlflow.pyfunc, run_id=run.run_id, model_id=logged.model_id,
                  python_model=str(_CODE),
                  artifacts={"bundle": str(artifacts)}, code_paths=[str(code)],
                  signature=signature, input_example=example, pip_requirements=pip_requirements(),
                  metadata={"classes": model.bundle.classes, "tlpipe_bundle_sha256": model.bundle.manifest["head"]["sha256"],
                            "tlpipe_version": __version__, "tlpipe_code_sha256": checksum})
    for old in replaced:  # only once the new one is logged: a run is never left without a model
        run.client.delete_logged_model(old.model_id)
    return checksum


def logged_models(client, run_id: str) -> list:
    """The MLflow models named ``MODEL_NAME`` that ``run_id`` logged."""
    experiment = client.get_run(run_id).info.experiment_id
    return client.search_logged_models([experiment], filter_string=f"name = '{MODEL_NAME}' AND source_run_id = '{run_id}'")


@dataclass(frozen=True)
class ServedModel:
    """What ``tlpipe serve`` serves: the model's URI, its store, and the checksum of its stored code
    that the fit kept in its own folder (None for a bare model URI: the store's record is all there is)."""

    uri: str
    store: str
    code_sha256: str | None = None


def served_model(target: str, tracking_uri: str | None = None) -> ServedModel:
    """The model ``target`` names: a fit's output folder (its summary names the model, the store and
    the code's checksum), or an MLflow model URI (``runs:/...``, ``models:/NAME@ALIAS``) on ``tracking_uri``."""
    from tlpipe.run.folder import RunFolder
    from tlpipe.run.store import resolve_tracking_uri

    if target.startswith(("runs:/", "models:/")):
        return ServedModel(target, resolve_tracking_uri(tracking_uri))
    try:
        summary = RunFolder(Path(target).expanduser()).read_summary()
        model = summary.get("mlflow_model") or f"runs:/{summary['run_id']}/{MODEL_NAME}"
        store = resolve_tracking_uri(tracking_uri) if tracking_uri else summary["tracking_uri"]
        return ServedModel(model, store, summary.get("mlflow_code_sha256"))
    except (TlpipeError, KeyError):
        raise TlpipeError(f"{target} is neither a fit's output folder (no readable {RunFolder.SUMMARY} of a tlpipe fit) "
                          "nor an MLflow model URI (runs:/<run id>/model, models:/NAME@champion)") from None


def check_served_model(served: ServedModel, reject: bool = True) -> None:
    """Before ``tlpipe serve`` says it serves: the model is one the store holds (an active run's, a
    registered name and alias), and the tlpipe code stored with it, which the server will run, is
    the code the fit recorded (and, without ``reject``, code that reads ``REJECT_ENV``). One line
    otherwise, never MLflow's traceback from the starting server."""
    from mlflow.exceptions import MlflowException

    from tlpipe.run.store import check_store, sqlite_file

    model_uri, store = served.uri, served.store
    check_store(store, write=False)  # a server that does not answer: one line in seconds, not minutes of retries
    if (db := sqlite_file(store)) and not db.is_file():
        raise TlpipeError(f"cannot serve {model_uri}: the MLflow store {store} does not exist; give the fit's store "
                          "with --tracking-uri (or MLFLOW_TRACKING_URI)")
    with tempfile.TemporaryDirectory() as folder, tracking(store):
        try:
            _check_run_active(model_uri, store)
            stored = {part: _download(model_uri, part, Path(folder)) for part in ("MLmodel", "mlflow_model.py", "code")}
        except MlflowException as exc:
            raise TlpipeError(f"cannot serve {model_uri} from the MLflow store {store}: {exc.message.splitlines()[0]}; "
                              "give a model that store holds (runs:/<run id>/model, models:/NAME@ALIAS; a fit's "
                              "summary.json names its own) or the fit's store with --tracking-uri") from None
        _check_stored_code(served, stored)
        if not reject and REJECT_ENV not in _read(stored["code"] / _PACKAGE.name / "bundle" / "serving.py"):
            raise TlpipeError(f"cannot serve {model_uri} with --no-reject: the tlpipe code stored with it predates "
                              "the option; serve it without (a request's params {\"reject\": false} turn the flag "
                              "off) or refit with this tlpipe")


def _check_run_active(model_uri: str, store: str) -> None:
    """A ``runs:/`` model of a deleted run (in the store's trash) is not served: MLflow would."""
    from mlflow.tracking import MlflowClient

    if not model_uri.startswith("runs:/"):
        return
    run_id = model_uri.removeprefix("runs:/").split("/")[0]
    if MlflowClient(store).get_run(run_id).info.lifecycle_stage == "deleted":
        raise TlpipeError(f"cannot serve {model_uri}: its run is deleted in the MLflow store {store}; restore it "
                          f"(mlflow runs restore --run-id {run_id}, or the UI's trash) or serve another fit")


def _download(model_uri: str, part: str, folder: Path) -> Path:
    """One file or folder of the stored model, copied under ``folder``; its local path."""
    from mlflow.artifacts import download_artifacts
    from mlflow.store.artifact.models_artifact_repo import ModelsArtifactRepository

    if model_uri.startswith("models:"):  # models:/m-<id>/MLmodel would read as model m-<id>, version "MLmodel"
        model_uri = ModelsArtifactRepository.get_underlying_uri(model_uri)
    return Path(download_artifacts(artifact_uri=f"{model_uri.rstrip('/')}/{part}", dst_path=str(folder / part)))


def _check_stored_code(served: ServedModel, stored: dict[str, Path]) -> None:
    """The stored tlpipe's version and checksum are those the model's metadata recorded at log time
    (and the fit's own folder, when it was given), and the model's code file is that tlpipe's
    ``mlflow_model.py``."""
    import yaml

    model_uri, store = served.uri, served.store
    recorded = yaml.safe_load(stored["MLmodel"].read_text(encoding="utf-8")).get("metadata") or {}
    package = stored["code"] / _PACKAGE.name
    if "tlpipe_code_sha256" not in recorded:
        raise TlpipeError(f"cannot serve {model_uri}: it records no checksum of the tlpipe code stored with it "
                          "(logged by an older tlpipe), which the server would run; refit with this tlpipe")
    found = re.search(r'^__version__ = "([^"]+)"', _read(package / "version.py"), re.MULTILINE)
    differences = []
    if (found and found[1]) != recorded.get("tlpipe_version"):
        differences.append(f"tlpipe {found[1] if found else '?'}, recorded {recorded.get('tlpipe_version')}")
    if code_sha256(package) != recorded["tlpipe_code_sha256"]:
        differences.append("the checksum of its files differs")
    if served.code_sha256 and served.code_sha256 != recorded["tlpipe_code_sha256"]:
        differences.append("the model's metadata records another checksum than the fit's summary.json")
    code_files = (package / _CODE.relative_to(_PACKAGE), package / _CODE.name)  # tlpipe/bundle/ now, tlpipe/ in models logged before
    if _read(stored["mlflow_model.py"]) != _read(next((p for p in code_files if p.is_file()), code_files[0])):
        differences.append("the model's mlflow_model.py differs")
    if differences:
        raise TlpipeError(f"cannot serve {model_uri}: the tlpipe code stored with it in {store}, which the server would "
                          f"run, is not the code the fit logged ({'; '.join(differences)}); "
                          "someone changed the store: refit, or restore the store from a backup")


def _read(path: Path) -> str:
    """A stored text file's contents; empty when it is missing."""
    return path.read_text(encoding="utf-8", errors="replace") if path.is_file() else ""


def code_sha256(package: Path) -> str:
    """sha256 over every file of a tlpipe package (relative path and contents, in sorted order): the
    code a model from code runs. Logged without ``__pycache__``, so a compiled module or any other
    file added to the stored copy changes it."""
    digest = hashlib.sha256()
    files = (f for f in package.rglob("*") if f.is_file())
    for file in sorted(files, key=lambda f: f.relative_to(package).as_posix()):
        digest.update(f"{file.relative_to(package).as_posix()}\0".encode())
        digest.update(hashlib.sha256(file.read_bytes()).digest())
    return digest.hexdigest()


def serve_command(model_uri: str, host: str = "127.0.0.1", port: int = 5001) -> list[str]:
    """``mlflow models serve`` in this Python environment (no new one built), one worker; the model
    brings its own tlpipe code (``check_served_model``)."""
    return [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local",
            "--host", host, "--port", str(port), "--workers", "1"]


def pip_requirements() -> list[str]:
    """tlpipe's own requirements, pinned to the versions installed now (tlpipe itself travels as code)."""
    pinned = []
    for requirement in metadata.requires("tlpipe") or []:
        if "extra ==" in requirement:
            continue
        name = requirement.split(";")[0].split("[")[0]
        for mark in "<>=!~ ":
            name = name.split(mark)[0]
        try:
            pinned.append(f"{name}=={metadata.version(name).split('+')[0]}")  # no local tag: torch 2.x+cu130 is not on PyPI
        except metadata.PackageNotFoundError:
            pinned.append(requirement)
    return pinned


@contextmanager
def tracking(uri: str) -> Iterator[None]:
    """MLflow's fluent API on ``uri`` for the duration (it reads a process-wide setting), quietly."""
    import mlflow

    previous, bars = mlflow.get_tracking_uri(), os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    mlflow.set_tracking_uri(uri)
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"  # no download bars inside the fit's report
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)
        if bars is None:
            os.environ.pop("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
        else:
            os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = bars


def _example_image() -> bytes:
    """A small PNG for the signature's input example: never one of the user's images."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (120, 140, 160)).save(buffer, format="PNG")
    return buffer.getvalue()
