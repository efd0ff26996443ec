"""Train a cnnjax model: the same command on a laptop, a multi-GPU server and every TPU pod host.

    python -m experiments.train --arch=densenet121            # embedded digits, offline
    python -m experiments.train --config=cifar10_resnet18 --batch_size=512
    python -m experiments.train --arch=resnet50 --dataset=imagenet2012 --data_dir=... \
        --batch_size=1024
    python -m experiments.train --arch=vgg16 --init_from=runs/vgg11-digits   # VGG's deepening
    python -m experiments.train --arch=resnet50 --init_from=pretrained   # torchvision's weights
    python -m experiments.train --arch_spec=runs/nas/best_spec.json   # a searched network

Multi-process off a pod: add --coordinator_address=HOST:PORT --num_processes=N --process_id=I.
Rerunning with the same --workdir resumes from its latest checkpoint. On SIGTERM (preemption)
every process saves the same step and exits 0; a step whose loss or gradients are not finite is
skipped, and more than --max_bad_steps of them in a row stop the run with exit status 1; a lost
process stops the others with exit status 1; a second run on a --workdir in use is refused.
Checkpoints are written in the background; WORKDIR/best keeps the one of the best eval top-1.
"""
from __future__ import annotations

if __name__ == "__main__":  # first of all: glibc reads its tunables only when a process starts
    from experiments import hostmem
    hostmem.reexec_with_huge_pages()

import argparse
import dataclasses
import os
import sys
import typing

from cnnjax import flags
from experiments import configs


def _parser() -> argparse.ArgumentParser:
    from cnnjax.train import TrainConfig
    p = flags.ArgumentParser(prog="python -m experiments.train", description=__doc__,
                             formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="default", help=f"preset: {', '.join(configs.names())}")
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        kind = hints[f.name]
        if f.name == "model_overrides":
            p.add_argument("--model_overrides", type=flags.json_object, default=None,
                           help="JSON of create_model options, e.g. "
                                '\'{"zero_init_residual": true}\'')
            continue
        base = next((t for t in typing.get_args(kind) if t is not type(None)), kind)
        p.add_argument(f"--{f.name}", type=base, default=None, help=f"default: {f.default!r}")
    p.add_argument("--coordinator_address", default=None)
    p.add_argument("--num_processes", type=int, default=None)
    p.add_argument("--process_id", type=int, default=None)
    p.add_argument("--quiet", action="store_true", help="no progress output")
    return p


def make_config(args: argparse.Namespace):
    """Defaults < the preset (with its per-arch rows for the arch) < the flags given on the
    command line; a --model_overrides flag is merged into the preset's, key by key."""
    from cnnjax.train import TrainConfig
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    given = {k: v for k, v in vars(args).items() if k in names and v is not None}
    if "arch" in given and "arch_spec" in given:
        raise ValueError(f"--arch={given['arch']} and --arch_spec={given['arch_spec']}: give "
                         "one (an --arch_spec network is named after its spec)")
    return TrainConfig(**configs.merge(configs.load(args.config, given.get("arch")), given))


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)  # argparse's errors: one line, exit status 2
    from cnnjax import parallel
    from cnnjax.checkpoint import CheckpointError
    from cnnjax.pretrained import DownloadError
    from cnnjax.train import TooManyBadSteps, train_and_evaluate
    try:
        config = make_config(args)
        config.validate()  # every flag, before any JAX call, data preparation or write
        parallel.initialize(args.coordinator_address, args.num_processes, args.process_id)
        train_and_evaluate(config, verbose=not args.quiet)  # SIGTERM: saves, then returns
    except (ValueError, DownloadError) as e:  # bad input, a workdir in use, weights out of
        return flags.fail(e)                    # reach: one clear line, no traceback
    except (TooManyBadSteps, CheckpointError) as e:
        return flags.fail(e, status=1)
    except parallel.LostPeer as e:
        flags.fail(e, status=1)
        sys.stdout.flush()
        # Not sys.exit: JAX's exit handler would wait for the lost process at a shutdown
        # barrier until its heartbeat timeout, then abort.
        os._exit(1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
