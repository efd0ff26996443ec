"""Neural architecture search: the search space as data, an LSTM controller trained with
REINFORCE (Zoph & Le 2017), children trained from scratch or sharing weights (ENAS, Pham et al.
2018). `python -m experiments.nas` runs a search; `cnnjax.nas.build(spec)` builds a child.

    spec = cnnjax.nas.load_spec("runs/nas/best_spec.json")
    model = cnnjax.nas.build(spec, num_classes=10, in_channels=1)   # an ordinary cnnjax Module
    cnnjax.profile(model, 8).macs == cnnjax.nas.cost(spec, 8, 1, 10)[1]
"""
from cnnjax.models.nasnet import NASNet, as_spec, build
from cnnjax.models.nasspec import (
                              Layer,
                              Space,
                              Spec,
                              SpecError,
                              cost,
                              decode,
                              encode,
                              load_spec,
                              parse_spec,
                              uniform_decisions,
)

__all__ = ["Layer", "NASNet", "Space", "Spec", "SpecError", "as_spec", "build", "cost", "decode",
           "encode", "load_spec", "parse_spec", "uniform_decisions"]
