"""A search's settings: SearchConfig, checked before anything is built or written."""
from __future__ import annotations

import dataclasses
from typing import Any

from cnnjax import flags
from cnnjax.data import sources
from cnnjax.models.nasspec import Space, SpecError
from cnnjax.models.registry import model_spec

MODES = ("train_children", "shared_weights")


@dataclasses.dataclass
class SearchConfig:
    """Every setting of a search; the defaults finish in about ten minutes on a 2-core CPU."""
    workdir: str = "runs/nas"
    mode: str = "train_children"
    dataset: str = "digits"
    data_dir: str | None = None
    space: dict = dataclasses.field(default_factory=dict)  # Space fields over the mode's default
    seed: int = 0
    controller_steps: int | None = None  # default: 12 (train_children), 60 (shared_weights)
    children_per_step: int = 4          # m
    child_steps: int = 200              # train_children: SGD steps per child, from scratch
    child_batch_size: int = 32
    child_learning_rate: float = 0.2    # SGD with Nesterov momentum, per 256 images (as train)
    shared_steps: int = 40              # shared_weights: supergraph steps per controller step
    shared_warmup: int = 400            # shared_weights: supergraph steps through uniformly
                                        # random children before the controller's first step
    val_fraction: float = 0.2           # of the training split, held out for the rewards
    reward_power: float = 1.0           # 3: the cubed accuracy of Zoph & Le 2017
    entropy_weight: float = 1e-3
    baseline_decay: float = 0.8
    controller_learning_rate: float = 0.05
    controller_hidden: int = 32
    hand_designed: str = "resnet18,mobilenet_v2"  # registered models drawn beside the children

    def identity(self) -> dict[str, Any]:
        """What a resumed search must share with its checkpoints: all but where and how long,
        and the shared_* settings in train_children mode (they change nothing there)."""
        skip = {"workdir", "controller_steps", "hand_designed", "data_dir"}
        if self.mode != "shared_weights":
            skip |= {"shared_steps", "shared_warmup"}
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in skip}

    def total_steps(self) -> int:
        """Controller steps: --controller_steps, else the mode's default (a shared-weights
        step costs a fraction of a second, a train_children step m trainings)."""
        if self.controller_steps is not None:
            return self.controller_steps
        return 60 if self.mode == "shared_weights" else 12

    def make_space(self) -> Space:
        base = Space().to_json()
        if self.mode == "shared_weights":  # one supergraph shape: every map at the input size
            base["strides"] = [1]
        try:
            return Space.from_json({**base, **self.space})
        except SpecError as e:
            raise ValueError(f"--space={flags.show(self.space)}: {e}") from None

    def hand_designed_names(self) -> list[str]:
        return [n for n in self.hand_designed.split(",") if n]

    def validate(self) -> None:
        """ValueError naming the first bad setting; reads only (nothing is built or written)."""
        flags.check(vars(self), _RULES)
        if sources.parse_synthetic(self.dataset) is None:
            sources.get_spec(self.dataset)
        space = self.make_space()
        if self.mode == "shared_weights" and space.strides != (1,):
            raise ValueError(f"--space={flags.show(self.space)}: --mode=shared_weights needs "
                             "strides [1] (the supergraph holds one map size per layer)")
        for name in self.hand_designed_names():
            model_spec(name)  # unknown names: the registry's message, closest names listed
        if self.data_dir is not None:
            flags.check_directory("data_dir", self.data_dir,
                                  sources.default_data_dir(self.data_dir))
        flags.check_directory("workdir", self.workdir)


_RULES: dict[str, flags.Rule] = {
    "workdir": flags.PATH, "mode": flags.one_of(*MODES), "dataset": flags.TEXT,
    "space": flags.JSON_OBJECT, "seed": flags.UINT32,
    "controller_steps": flags.optional(flags.POSITIVE_INT),
    "children_per_step": flags.POSITIVE_INT,
    "child_steps": flags.POSITIVE_INT, "child_batch_size": flags.POSITIVE_INT,
    "child_learning_rate": flags.POSITIVE, "shared_steps": flags.POSITIVE_INT,
    "shared_warmup": flags.NON_NEGATIVE_INT,
    "val_fraction": flags.Rule("a number in (0, 1)",
                               lambda v: flags.is_finite(v) and 0 < v < 1),
    "reward_power": flags.POSITIVE, "entropy_weight": flags.NON_NEGATIVE,
    "baseline_decay": flags.FRACTION, "controller_learning_rate": flags.POSITIVE,
    "controller_hidden": flags.POSITIVE_INT, "hand_designed": flags.TEXT,
}
