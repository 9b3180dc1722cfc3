"""The fit's MLflow model in MLflow's model registry (``tlpipe fit --register NAME``): the name and
alias checked before the fit spends its time, then a new version with the alias moved to it."""
from __future__ import annotations

from tlpipe.bundle.serving import logged_models, tracking
from tlpipe.errors import TlpipeError


def check_registry_names(name: str, alias: str | None) -> None:
    """A model name and alias MLflow's registry will take, checked before a fit spends its time."""
    from mlflow.exceptions import MlflowException

    try:  # MLflow's own rules ("latest" and "v<N>" are not aliases, for instance)
        from mlflow.utils.validation import (
            _validate_model_alias_name, _validate_model_alias_name_reserved, _validate_model_name,
        )
    except ImportError:  # moved in another MLflow version: registering says what is wrong
        return
    try:
        _validate_model_name(name)
        if alias:
            _validate_model_alias_name(alias)
            _validate_model_alias_name_reserved(alias)
    except MlflowException as exc:
        raise TlpipeError(f"--register {name}{f' --alias {alias}' if alias else ''}: {exc.message.splitlines()[0]}") from None


def register_model(run_id: str, tracking_uri: str, name: str, alias: str | None = "champion") -> str:
    """Register the fit's MLflow model as a new version of ``name`` and point ``alias`` at it
    (``models:/<name>@<alias>``; aliases replace the deprecated registry stages). Returns the version."""
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    with tracking(tracking_uri):
        try:
            logged = logged_models(client, run_id)
            if not logged:
                raise TlpipeError(f"run {run_id} has no MLflow model to register: refit with this tlpipe")
            version = mlflow.register_model(f"models:/{logged[0].model_id}", name).version
            if alias:
                client.set_registered_model_alias(name, alias, version)
        except MlflowException as exc:
            raise TlpipeError(f"could not register the model as '{name}': {exc.message.splitlines()[0]}") from None
    return str(version)
