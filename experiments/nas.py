"""Neural architecture search: an LSTM controller learns, by REINFORCE, to design small CNNs.

    python -m experiments.nas --workdir=runs/nas                          # ~10 min, 2-core CPU
    python -m experiments.nas --workdir=runs/enas --mode=shared_weights   # ENAS weight sharing
    python -m experiments.train --arch_spec=runs/nas/best_spec.json       # retrain the best

The children of a controller step are spread over every device of every process: on a pod (or
with --coordinator_address=HOST:PORT --num_processes=N --process_id=I off one) each process
trains its share and all get every reward, so m children train at once.

Each controller step samples --children_per_step children from the search space (--space:
JSON of cnnjax.nas.Space fields, e.g. '{"num_layers": 4}'), scores each by its accuracy on a
validation split held out of the training split, and takes a policy-gradient step. Rerunning
the same command resumes; WORKDIR gets children.jsonl, best_spec.json, search_curves.png,
search_children.png and the controller's checkpoints (cnnjax.nas.search).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import typing

from cnnjax import flags


def _parser() -> argparse.ArgumentParser:
    from cnnjax.nas.search import SearchConfig
    p = flags.ArgumentParser(prog="python -m experiments.nas", description=__doc__,
                             formatter_class=argparse.RawDescriptionHelpFormatter)
    hints = typing.get_type_hints(SearchConfig)
    for f in dataclasses.fields(SearchConfig):
        if f.name == "space":
            p.add_argument("--space", type=flags.json_object, default=None,
                           help='JSON of search-space fields, e.g. \'{"num_layers": 4}\'')
            continue
        kind = hints[f.name]
        base = next((t for t in typing.get_args(kind) if t is not type(None)), kind)
        default = ("12 (train_children), 60 (shared_weights)" if f.name == "controller_steps"
                   else repr(f.default))
        p.add_argument(f"--{f.name}", type=base, default=None, required=f.name == "workdir",
                       help=f"default: {default}")
    p.add_argument("--coordinator_address", default=None)
    p.add_argument("--num_processes", type=int, default=None)
    p.add_argument("--process_id", type=int, default=None)
    p.add_argument("--quiet", action="store_true", help="no progress output")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)  # argparse's errors: one line, exit status 2
    from cnnjax import parallel
    from cnnjax.nas.search import SearchConfig, check_processes, run
    own = ("quiet", "coordinator_address", "num_processes", "process_id")
    given = {k: v for k, v in vars(args).items() if k not in own and v is not None}
    try:
        config = SearchConfig(**given)
        config.validate()  # every flag, before any JAX work, data preparation or write
        if parallel.check_processes(args.coordinator_address, args.num_processes,
                                    args.process_id):
            check_processes(config.mode, args.num_processes)  # before the processes meet
        parallel.initialize(args.coordinator_address, args.num_processes, args.process_id)
        summary = run(config, verbose=not args.quiet)
    except ValueError as e:  # bad input: one clear line, no traceback
        return flags.fail(e)
    best = summary["best"]
    import jax
    if best is not None and jax.process_index() == 0:
        print(f"best {best['name']}: reward {best['reward']:.4f}, {best['params']:,} params, "
              f"{best['macs']:,} MACs; first/last mean reward {summary['first_mean_reward']:.4f}"
              f" / {summary['last_mean_reward']:.4f}; {summary['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
