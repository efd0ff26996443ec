"""cnnjax: the classic convolutional networks, AlexNet to NAS, as functional Flax modules."""
from cnnjax import parallel as _parallel

_parallel.reserve_cpu_threads()  # before JAX's CPU backend starts: see its docstring
from cnnjax.models import create_model, list_models
from cnnjax.profile import Layer, Profile, profile

__version__ = "0.1.0"
__all__ = ["Layer", "Profile", "create_model", "list_models", "profile"]
