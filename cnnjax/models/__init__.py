"""Model families; importing this package registers every architecture (one import a family)."""
from cnnjax.models import alexnet  # noqa: F401  (registers alexnet, alexnet_v1, zfnet)
from cnnjax.models import resnet  # noqa: F401  (resnet, resnext, wide_resnet, se_resnet)
from cnnjax.models import vgg  # noqa: F401  (vgg11..19, _bn)
from cnnjax.models.registry import create_model, list_models, model_spec, register

__all__ = ["create_model", "list_models", "model_spec", "register"]
