"""The settings of a training run: TrainConfig, checked once before any work.

Presets (experiments/configs) and command-line flags fill a TrainConfig; `validate` reads the
registry, the dataset table and the file system and names the first bad setting as
`--name=value`, before anything is prepared, built or written.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Any

import flax.linen as nn

from cnnjax import checkpoint as ckpt
from cnnjax import convert, flags
from cnnjax.data import sources
from cnnjax.models import nasnet, nasspec
from cnnjax.models.registry import create_model
from cnnjax.pretrained import named, weights_entry


@dataclasses.dataclass
class TrainConfig:
    """Every setting of a run; presets (experiments/configs) and flags override the defaults.

    The defaults are the default preset's; its per-architecture rows (zero-initialised residual
    branches, Adam for the networks without BatchNorm) come with
    `TrainConfig(**experiments.configs.load("default", arch=...))`, as on the command line."""
    arch: str = "resnet18"
    arch_spec: str | None = None        # a searched network's spec (a search's best_spec.json):
                                        # train that network; arch becomes its name (nas_...)
    dataset: str = "digits"
    data_dir: str | None = None
    image_size: int | None = None       # default: what the dataset and the arch need
    batch_size: int = 64                # global, over all devices and processes
    num_epochs: float = 10.0
    num_steps: int | None = None        # overrides num_epochs
    optimizer: str = "sgd"              # sgd (Nesterov momentum) | adamw
    learning_rate: float = 0.2          # sgd: per 256 images (scaled by batch/256); adamw: as is
    momentum: float = 0.9
    weight_decay: float = 5e-4          # not applied to BatchNorm parameters and biases
    warmup_epochs: float = 2.0
    label_smoothing: float = 0.0
    grad_clip_norm: float | None = None
    max_bad_steps: int = 10             # non-finite steps in a row (each skipped: no update)
                                        # beyond which the run stops with exit status 1
    aux_loss_weight: float = 0.3        # GoogLeNet's auxiliary heads (Szegedy et al. 2015)
    dtype: str = "float32"              # compute dtype; bfloat16 keeps float32 params and loss
    model_overrides: dict = dataclasses.field(default_factory=dict)
    bn_recalibration_batches: int = 4   # train batches whose BatchNorm statistics replace the
                                        # running averages before each eval; 0 keeps the EMA
    seed: int = 0
    log_every: int = 10
    eval_every: int | None = None       # steps; default once per epoch
    checkpoint_every: int | None = None # steps; default once per epoch
    workdir: str | None = None          # default runs/ARCH-DATASET
    init_from: str | None = None        # an earlier run's workdir, converted weights or
                                        # "pretrained[:NAME]" (torchvision's, for --arch): a fresh
                                        # run starts from the layers that fit (cnnjax.transfer)

    def identity(self) -> dict[str, Any]:
        """What a resumed run must share with its checkpoint: state structure and data stream.

        Not init_from: it only says how step 0 was made, and a resumed run continues from its
        own checkpoint (train_and_evaluate refuses to resume a run started from another source
        when --init_from names one)."""
        return {k: getattr(self, k) for k in ("arch", "dataset", "image_size", "batch_size",
                                              "optimizer", "seed", "model_overrides")}

    def validate(self) -> None:
        """Raises ValueError naming the first bad setting as `--name=value` and what it must be.

        It only reads (the registry, the dataset table, the file system): nothing is prepared,
        built on a device or written. Divisibility of the batch by the devices is build's check.
        A config is checked once: validating it again, unchanged, does nothing (the command
        line, train_and_evaluate and build all ask).
        """
        if self.__dict__.get("_validated") == self._settings():
            return
        flags.check(vars(self), _RULES)
        if sources.parse_synthetic(self.dataset) is None:
            sources.get_spec(self.dataset)
        taken = sorted(set(self.model_overrides) & {"name", "num_classes", "in_channels", "dtype"})
        if taken:
            raise ValueError(f"--model_overrides={flags.show(self.model_overrides)} cannot set "
                             f"{', '.join(taken)}: num_classes and in_channels follow --dataset, "
                             "dtype is --dtype")
        if self.arch_spec is not None:
            self.use_arch_spec()
        model = self.create_model()  # unknown arch or option, invalid spec: raises
        if self.image_size is not None:
            check_image_size(self.image_size, model)
        if self.data_dir is not None:
            flags.check_directory("data_dir", self.data_dir,
                                  sources.default_data_dir(self.data_dir))
        if self.init_from is not None:
            check_init_from(self)
        flags.check_directory("workdir", default_workdir(self) if self.workdir is None
                              else self.workdir)
        self.__dict__["_validated"] = self._settings()  # not a field: asdict leaves it out

    def _settings(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True, default=str)

    def use_arch_spec(self) -> None:
        """Reads --arch_spec (ValueError naming its first defect): the run's arch becomes the
        spec's name, so workdirs and checkpoints of different specs never mix, and the image
        size defaults to the size the spec was searched at."""
        try:
            spec = nasspec.load_spec(self.arch_spec)
        except nasspec.SpecError as e:
            raise ValueError(f"--arch_spec: {e}") from None
        if self.model_overrides:
            raise ValueError(f"--model_overrides={flags.show(self.model_overrides)}: an "
                             "--arch_spec network has no options; edit its spec instead")
        self.arch = spec.name
        if self.image_size is None:
            self.image_size = spec.space.input_size

    def create_model(self, **kwargs: Any) -> nn.Module:
        """The run's model: the registered --arch with --model_overrides, or the network of
        --arch_spec (cnnjax.models.nasnet.build); `kwargs` as create_model's."""
        if self.arch_spec is None:
            return create_model(self.arch, **self.model_overrides, **kwargs)
        return nasnet.build(nasspec.load_spec(self.arch_spec), **kwargs)


_RULES: dict[str, flags.Rule] = {  # TrainConfig.validate's per-field checks
    "arch": flags.TEXT, "arch_spec": flags.optional(flags.PATH), "dataset": flags.TEXT,
    "image_size": flags.optional(flags.POSITIVE_INT), "batch_size": flags.POSITIVE_INT,
    "num_epochs": flags.POSITIVE, "num_steps": flags.optional(flags.POSITIVE_INT),
    "optimizer": flags.one_of("sgd", "adamw"), "learning_rate": flags.POSITIVE,
    "momentum": flags.FRACTION, "weight_decay": flags.NON_NEGATIVE,
    "warmup_epochs": flags.NON_NEGATIVE, "label_smoothing": flags.FRACTION,
    "grad_clip_norm": flags.optional(flags.POSITIVE), "max_bad_steps": flags.NON_NEGATIVE_INT,
    "aux_loss_weight": flags.NON_NEGATIVE,
    "dtype": flags.one_of("float32", "bfloat16"), "model_overrides": flags.JSON_OBJECT,
    "seed": flags.UINT32, "log_every": flags.POSITIVE_INT,
    "bn_recalibration_batches": flags.NON_NEGATIVE_INT,
    "eval_every": flags.optional(flags.POSITIVE_INT),
    "checkpoint_every": flags.optional(flags.POSITIVE_INT),
    "init_from": flags.optional(flags.PATH),  # then check_init_from
}


def check_init_from(config: TrainConfig) -> None:
    """--init_from must be weights converted by cnnjax.convert, an earlier run's workdir with a
    checkpoint (not this run's own), or published weights of the run's --arch by name (checked
    against the registry only: nothing is downloaded here)."""
    init_from, shown = config.init_from, f"--init_from={flags.show(config.init_from)}"
    name = named(init_from)
    if name is not None:
        try:
            if config.arch_spec is not None:
                raise ValueError("an --arch_spec network has no published weights")
            weights_entry(config.arch, name)
        except ValueError as e:
            raise ValueError(f"{shown}: {e}") from None
        return
    what = ("the workdir of an earlier run, whose latest checkpoint is read, weights written "
            "by python -m cnnjax.convert, or pretrained[:NAME] (torchvision's weights)")
    flags.check_existing_directory("init_from", init_from, what)
    if convert.is_converted(init_from):
        convert.read_meta(init_from, flag="init_from")
        return
    ckpt.require_saved(init_from, shown)
    workdir = config.workdir
    if workdir is not None and os.path.realpath(init_from) == os.path.realpath(workdir):
        raise ValueError(f"{shown} is this run's own --workdir; leave --init_from out to resume "
                         "that run")


def min_image_size(model: nn.Module) -> int:
    """The smallest H = W `model` trains on (GoogLeNet's auxiliary heads can need more)."""
    aux = model.aux_min_input_size if getattr(model, "aux_logits", False) else 1
    return max(model.min_input_size, aux)


def check_image_size(size: int, model: nn.Module) -> None:
    need = min_image_size(model)
    what = model.arch + (" with aux_logits" if need > model.min_input_size else "")
    if size < need:
        raise ValueError(f"--image_size={size} is too small for {what}: it needs at least "
                         f"{need}x{need} pixels")


def default_workdir(config: TrainConfig) -> str:
    """runs/ARCH-DATASET, and -from-RUN for a run started from another (so it cannot land in,
    and resume, the from-scratch run of the same arch)."""
    name = f"{config.arch}-{config.dataset}"
    if config.init_from is not None:
        name += "-from-" + init_source(config).replace(":", "-").rsplit("/", 1)[-1]
    return str(pathlib.Path("runs") / name)


def init_source(config: TrainConfig) -> str:
    """What --init_from names, spelled the same whichever way it was given: the resolved path,
    or "pretrained:NAME" with torchvision's name (DEFAULT resolved) for published weights."""
    name = named(config.init_from)
    if name is None:
        return str(pathlib.Path(config.init_from).resolve())
    return "pretrained:" + weights_entry(config.arch, name)[0]
