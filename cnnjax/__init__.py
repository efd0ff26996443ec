"""cnnjax: the classic convolutional networks, AlexNet to NAS, as functional Flax modules."""
from cnnjax.models import create_model, list_models
from cnnjax.profile import Layer, Profile, profile

__version__ = "0.1.0"
__all__ = ["Layer", "Profile", "create_model", "list_models", "profile"]
