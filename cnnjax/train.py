"""The stable import path of the training system, whose code lives in cnnjax.training:

    from cnnjax.train import TrainConfig, train_and_evaluate, load_checkpoint
    summary = train_and_evaluate(TrainConfig(arch="resnet18", dataset="digits"))
    model, variables, record = load_checkpoint("runs/resnet18-digits")

cnnjax.training.config (TrainConfig), .steps (state, optimizer, loss, the finite guard, the
train and eval steps), .batchnorm (recalibration), .rundir (identity, lock, resume, init_from,
load_checkpoint), .actions (log, evaluate, save, blow-ups, bad steps), .loop (train_and_evaluate).
"""
from cnnjax.training.actions import BlowUpMonitor, TooManyBadSteps
from cnnjax.training.batchnorm import make_moments_step, recalibrate_batch_norm
from cnnjax.training.config import TrainConfig, check_image_size, default_workdir, min_image_size
from cnnjax.training.loop import Parts, build, train_and_evaluate
from cnnjax.training.rundir import BEST, load_checkpoint
from cnnjax.training.steps import (
                                    TrainState,
                                    all_finite,
                                    cross_entropy,
                                    decay_mask,
                                    evaluate,
                                    init_state,
                                    keep_if,
                                    learning_rate_schedule,
                                    make_eval_step,
                                    make_init,
                                    make_optimizer,
                                    make_steps,
)

__all__ = ["BEST", "BlowUpMonitor", "Parts", "TooManyBadSteps", "TrainConfig", "TrainState",
           "all_finite", "build", "check_image_size", "cross_entropy", "decay_mask",
           "default_workdir", "evaluate", "init_state", "keep_if", "learning_rate_schedule",
           "load_checkpoint", "make_eval_step", "make_init", "make_moments_step",
           "make_optimizer", "make_steps", "min_image_size", "recalibrate_batch_norm",
           "train_and_evaluate"]
