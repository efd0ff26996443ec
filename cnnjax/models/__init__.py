"""Model families; importing this package registers every architecture."""
from cnnjax.models import alexnet, resnet, vgg  # noqa: F401  (registration side effects)
from cnnjax.models.registry import create_model, list_models, model_spec, register

__all__ = ["create_model", "list_models", "model_spec", "register"]
