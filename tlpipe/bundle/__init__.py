"""The fitted model a fit hands over, and everything done with it afterwards: the bundle folder
(``folder``: save, load, predict; ``manifest``: its files checked before use), its temperature
(``calibration``), its unknown-image detector (``unknowns``), scores on labelled images
(``evaluation``, ``metrics``), ONNX and TorchScript graphs proven against it (``graph``,
``export``), the MLflow pyfunc model that ``tlpipe serve`` answers from (``serving``; the file
MLflow runs to build it, ``mlflow_model``) and the registry (``registry``).

``Bundle``, ``load_bundle`` and ``save_bundle`` are here too, loaded on first use: importing a light
module of this package (``metrics``, ``serving``) does not load torch."""
__all__ = ["Bundle", "load_bundle", "save_bundle"]


def __getattr__(name: str):
    if name in __all__:
        from tlpipe.bundle import folder

        return getattr(folder, name)
    raise AttributeError(name)
