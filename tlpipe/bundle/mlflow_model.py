"""The file MLflow runs to build a fit's model (a model from code: nothing unpickled); see ``tlpipe.bundle.serving``."""
import mlflow

from tlpipe.bundle.serving import BundleModel

mlflow.models.set_model(BundleModel())
