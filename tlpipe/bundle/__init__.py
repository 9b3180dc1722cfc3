"""The fitted model a fit hands over, and everything done with it afterwards: the bundle folder
(``folder``: save, validated load, predict), its temperature (``calibration``), scores on labelled
images (``evaluation``, ``metrics``), ONNX and TorchScript graphs proven against it (``export``),
and the MLflow pyfunc model and registry that ``tlpipe serve`` answers from (``serving``).

``Bundle``, ``load_bundle`` and ``save_bundle`` are here too, loaded on first use: importing a light
module of this package (``metrics``, ``serving``) does not load torch."""
__all__ = ["Bundle", "load_bundle", "save_bundle"]


def __getattr__(name: str):
    if name in __all__:
        from tlpipe.bundle import folder

        return getattr(folder, name)
    raise AttributeError(name)
