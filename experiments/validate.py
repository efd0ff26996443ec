"""Measure weights on a dataset split: top-1, top-5 and loss, beside the published figures.

    python -m experiments.validate --arch=resnet50 --weights=IMAGENET1K_V1 \
        --dataset=imagenet2012 --data_dir=DIR          # reproduces torchvision's 76.13% top-1
    python -m experiments.validate --weights=weights/resnet50 --data_dir=DIR   # converted
    python -m experiments.validate --workdir=runs/resnet18-digits      # a run's checkpoint

Published and converted weights are measured with their own evaluation transform (resize,
centre crop, interpolation, mean/std: cnnjax.predict.preprocess), a run's checkpoint with the
run's own evaluation pipeline. The logic lives in cnnjax.evaluate.
"""
from __future__ import annotations

import argparse
import sys

from cnnjax import flags


def _parser() -> argparse.ArgumentParser:
    from cnnjax.evaluate import SPLITS
    p = flags.ArgumentParser(prog="python -m experiments.validate", description=__doc__,
                             formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default=None,
                   help="alone: torchvision's published DEFAULT weights for it")
    p.add_argument("--weights", default=None,
                   help="with --arch, a published weights name (IMAGENET1K_V1, pretrained:NAME);"
                        " or a directory written by python -m cnnjax.convert")
    p.add_argument("--workdir", default=None, help="a training run: its latest checkpoint")
    p.add_argument("--best", action="store_true",
                   help="with --workdir: the checkpoint of the run's best eval top-1")
    p.add_argument("--dataset", default=None,
                   help="default: the run's dataset, else imagenet2012")
    p.add_argument("--data_dir", default=None, help="where the dataset is prepared (tfds)")
    p.add_argument("--split", default="test", choices=SPLITS,
                   help="test: the dataset's evaluation split (ImageNet's validation)")
    p.add_argument("--batch_size", type=int, default=None,
                   help="default: the run's, else 64")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)  # argparse's errors: one line, exit status 2
    from cnnjax import evaluate
    from cnnjax.pretrained import DownloadError
    if args.best and args.workdir is None:
        return flags.fail("--best needs --workdir=RUN")
    try:
        result = evaluate.validate(args.arch, args.weights, workdir=args.workdir,
                                   best=args.best, dataset=args.dataset, data_dir=args.data_dir,
                                   split=args.split, batch_size=args.batch_size,
                                   verbose=not args.quiet)
    except (ValueError, DownloadError) as e:  # bad input, data or weights out of reach
        return flags.fail(str(e).replace("\n", " "))
    print(evaluate.report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
