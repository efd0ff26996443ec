"""The training system, read in this order:

- config.py: TrainConfig, every setting of a run, checked once (`validate`) before any work;
- steps.py: the pure functions: state, optimizer, loss, the finite guard, train and eval steps;
- batchnorm.py: BatchNorm statistics recalibrated from training batches before each eval;
- rundir.py: the run directory: identity, lock, resume, --init_from, the checkpoint series,
  load_checkpoint;
- actions.py: what runs between steps: log, evaluate (and keep the best), save; the blow-up and
  bad-step monitors; the clock and the progress line;
- loop.py: train_and_evaluate: build the parts, open the run directory, then steps and actions.

`cnnjax.train` re-exports the names users import (TrainConfig, train_and_evaluate,
load_checkpoint, ...); it is the stable path.
"""
