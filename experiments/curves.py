"""Training curves of one or more runs, side by side: loss and test top-1 against the step.

    python -m experiments.curves runs/vgg16-digits runs/vgg16-digits-from-vgg11-digits \
        --out=deepening.png
    python -m experiments.curves runs/zoo/resnet18-s0 runs/zoo/resnet18-s1 --labels=s0,s1 \
        --out=seeds.png

Each RUN is the --workdir of `python -m experiments.train` (its metrics.jsonl); the figure is
`cnnjax.plots.training_curves`. The last test top-1 of each run is printed.
"""
from __future__ import annotations

import argparse
import sys

from cnnjax import flags, plots


def main(argv: list[str] | None = None) -> int:
    parser = flags.ArgumentParser(prog="python -m experiments.curves", description=__doc__,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", metavar="RUN", help="workdirs of training runs")
    parser.add_argument("--out", required=True, metavar="PATH",
                        help="the figure to write (.png, .pdf, .svg, ...)")
    parser.add_argument("--labels", default=None,
                        help="comma-separated, one per run; default: the folder names")
    args = parser.parse_args(argv)
    try:
        plots.check_path("out", args.out)
        labels = plots.run_labels(args.runs, None if args.labels is None
                                  else args.labels.split(","))
        histories = [plots.read_history(run) for run in args.runs]
    except ValueError as e:
        return flags.fail(e)
    plots.history_curves(histories, labels, args.out)
    for run, h in zip(args.runs, histories):
        last = f"{h['eval_top1'][-1]:.2f}% at step {h['eval_step'][-1]}" if h["eval_top1"] \
            else "no evaluation"
        print(f"{run}: test top-1 {last}")
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
