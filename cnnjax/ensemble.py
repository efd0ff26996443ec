"""Ensembles of trained runs: every member and their average, evaluated on one split.

    from cnnjax import ensemble
    result = ensemble.evaluate(["runs/resnet18-digits", "runs/vgg11_bn-digits"])
    print(ensemble.table(result))

The ILSVRC winners of 2014 to 2016 were ensembles: ResNet's 2015 entry had 4.49% top-5 error
with its best single model on the validation set and 3.57% with an ensemble of six on the test
set (He et al. 2016, Tables 4 and 5). Members may differ in architecture, input size and compute
dtype; they must be trained on the same dataset. Each member reads the split in order at its own
image size, every example exactly once (the last batch padded and masked, as in
cnnjax.train.evaluate), with its forward pass jitted in its own dtype; logits come back as
float32 and are combined in float32. Probabilities are averaged by default (a member that is
sure of a wrong answer counts for at most 1/M of the probability mass); averaging logits is the
option (a geometric mean of the members' distributions, renormalised).
"""
from __future__ import annotations

import os
import pathlib
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cnnjax import checkpoint as ckpt
from cnnjax import data, flags, parallel, runtime, train

COMBINE = ("probs", "logits")
SPLITS = ("test", "train")


# --- the maths: pure functions of arrays ------------------------------------------------------

def log_softmax(x: Any) -> np.ndarray:
    """float32 log-probabilities over the last axis, stable for any finite logits."""
    x = np.asarray(x, np.float32)
    shifted = x - x.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def combine_logits(member_logits: Sequence[Any] | np.ndarray, how: str = "probs") -> np.ndarray:
    """Log-probabilities (N, K) float32 of the ensemble of M members' logits (M x (N, K)).

    probs:  log of the mean of the members' softmax probabilities.
    logits: log_softmax of the mean of the members' logits.
    """
    if how not in COMBINE:
        raise ValueError(f"unknown combine {how!r}; expected {' or '.join(COMBINE)}")
    stack = np.stack([np.asarray(x, np.float32) for x in member_logits])
    if stack.ndim != 3 or stack.shape[0] == 0:
        raise ValueError(f"expected M >= 1 members' (N, K) logits; got shape {stack.shape}")
    if how == "logits":
        return log_softmax(stack.mean(0))
    logp = log_softmax(stack)  # (M, N, K); the mean of probabilities as a log-mean-exp
    top = logp.max(0)
    return top + np.log(np.exp(logp - top).mean(0))


def metrics(scores: Any, labels: Any) -> dict[str, Any]:
    """top-1, top-5 (fractions), loss (mean cross-entropy) and count of (N, K) logits or
    log-probabilities against (N,) integer labels. Ties rank the lower class first, as
    jnp.argmax and lax.top_k do in cnnjax.train's eval step."""
    scores = np.asarray(scores, np.float32)
    labels = np.asarray(labels)
    if scores.ndim != 2 or labels.shape != scores.shape[:1]:
        raise ValueError(f"expected (N, K) scores and (N,) labels; got {scores.shape} and "
                         f"{labels.shape}")
    n, k = scores.shape
    if n and (labels.min() < 0 or labels.max() >= k):
        raise ValueError(f"labels must lie in [0, {k}); got {labels.min()}..{labels.max()}")
    rows = np.arange(n)
    top = np.argsort(-scores, axis=-1, kind="stable")[:, :min(5, k)]
    loss = -log_softmax(scores)[rows, labels]
    d = max(n, 1)
    return {"top1": int(np.sum(top[:, 0] == labels)) / d,
            "top5": int(np.sum(np.any(top == labels[:, None], -1))) / d,
            "loss": float(np.sum(loss, dtype=np.float64)) / d, "count": n}


def check_aligned(labels: Sequence[tuple[str, Any]]) -> None:
    """Every member, given as (workdir, the labels in the order it read them), saw the same
    examples in the same order as far as labels can tell; else ValueError naming the first
    disagreement."""
    (first, ref), *rest = labels
    for workdir, lab in rest:
        if len(lab) != len(ref):
            raise ValueError(f"ensemble members read different splits: {first} has "
                             f"{len(ref)} examples, {workdir} has {len(lab)}")
        bad = np.flatnonzero(np.asarray(lab) != np.asarray(ref))
        if bad.size:
            i = int(bad[0])
            raise ValueError(
                f"ensemble members read the examples in a different order: example {i} has "
                f"label {ref[i]} for {first} but {lab[i]} for {workdir} ({bad.size} of "
                f"{len(ref)} differ); do their data dirs hold the same version of the dataset?")


# --- members: runs on disk -------------------------------------------------------------------

def read_member(workdir: str | os.PathLike) -> dict[str, Any]:
    """What a run's latest checkpoint says about it (its JSON record only, no weights):
    workdir, step, arch, dataset, num_classes, image_size, dtype, data_dir, batch_size."""
    path = pathlib.Path(workdir)
    where = path / "checkpoints"
    expected = "expected the --workdir of a training run (python -m experiments.train)"
    if not path.is_dir():
        what = "is a file" if path.exists() else "does not exist"
        raise ValueError(f"ensemble member {os.fspath(workdir)!r} {what}; {expected}")
    ckpt.require_saved(path, f"ensemble member {os.fspath(workdir)!r}")
    checkpoints = ckpt.Checkpointer(path)  # the directory exists: nothing is created
    try:
        step = checkpoints.latest_step()
        record = checkpoints.record(step)
    finally:
        checkpoints.close()
    config = record.get("config") or {}
    if "model" not in record or "dataset" not in config or not config.get("image_size"):
        raise ValueError(f"the checkpoint in {where.resolve()} has no record of its run's "
                         "config and model; it was not written by cnnjax.train")
    return {"workdir": os.fspath(workdir), "step": int(step), "arch": config["arch"],
            "dataset": config["dataset"], "num_classes": int(record["model"]["num_classes"]),
            "image_size": int(config["image_size"]), "dtype": config.get("dtype", "float32"),
            "data_dir": config.get("data_dir"), "batch_size": config.get("batch_size")}


def check_same_dataset(members: Sequence[dict[str, Any]]) -> None:
    """ValueError naming every member's workdir and dataset unless all share one dataset."""
    kinds = {(m["dataset"], m["num_classes"]) for m in members}
    if len(kinds) > 1:
        each = "; ".join(f"{m['workdir']}: {m['dataset']} ({m['num_classes']} classes)"
                         for m in members)
        raise ValueError(f"cannot ensemble runs trained on different datasets ({each}); every "
                         "member must be trained on the same dataset and classes")


def eval_batch_size(member: dict[str, Any], num_devices: int) -> int:
    """The run's own training batch size, rounded up to a multiple of the devices here (eval
    batches are padded and masked, so rounding up changes no number)."""
    own = member.get("batch_size") or 128
    return -(-own // num_devices) * num_devices


def predict(workdir: str | os.PathLike | dict[str, Any], *, split: str = "test",
            data_dir: str | None = None, batch_size: int | None = None,
            mesh: jax.sharding.Mesh | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(logits float32 (N, K), labels int32 (N,)) of a run's latest checkpoint (or of the one
    `read_member` described) on `split`, every example once and in order, at the run's own
    image size and dtype; `data_dir` None reads the data dir the run trained from, `batch_size`
    None batches as the run did (see `evaluate`). Jitted, batched over this process's devices
    (each process evaluates the whole split)."""
    member = workdir if isinstance(workdir, dict) else read_member(workdir)
    model, variables, _ = train.load_checkpoint(member["workdir"], member["step"])
    mesh = parallel.make_mesh(jax.local_devices()) if mesh is None else mesh
    if batch_size is None:
        batch_size = eval_batch_size(member, mesh.size)
    parallel.check_batch_size(batch_size, mesh.size)
    loader = data.Loader(member["dataset"], split, train=False, global_batch_size=batch_size,
                         data_dir=member["data_dir"] if data_dir is None else data_dir,
                         image_size=member["image_size"])
    repl, rows = parallel.replicated(mesh), parallel.batch_sharding(mesh)

    def forward(variables, image):
        out = model.apply(variables, image, train=False)
        return (out[0] if isinstance(out, tuple) else out).astype(jnp.float32)

    forward = runtime.jit(forward, in_shardings=(repl, rows), out_shardings=rows)
    variables = jax.device_put(variables, repl)
    outs, labels, keep = [], [], []
    for _, batch in loader.iterate(0, loader.steps_per_epoch):
        outs.append(forward(variables, jax.device_put(batch["image"], rows)))  # async dispatch
        labels.append(batch["label"])
        keep.append(batch["mask"] > 0)
    keep = np.concatenate(keep)
    logits = np.concatenate([np.asarray(o) for o in outs])[keep]
    labels = np.concatenate(labels)[keep]
    if len(labels) != loader.num_examples:  # the loader's contract; cheap to hold it to it
        raise RuntimeError(f"read {len(labels)} of {loader.num_examples} examples")
    return logits, labels


# --- the ensemble ----------------------------------------------------------------------------

def evaluate(workdirs: Sequence[str | os.PathLike], *, combine: str = "probs",
             data_dir: str | None = None, batch_size: int | None = None,
             split: str = "test", return_logits: bool = False,
             log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Evaluates each run in `workdirs` (its latest checkpoint) and their ensemble on `split`.

    Returns {"dataset", "split", "combine", "num_classes", "count", "members": [one dict per
    run: workdir, step, arch, image_size, dtype, data_dir, batch_size (its training's),
    eval_batch_size, top1, top5, loss, count, eval_s], "ensemble": {top1, top5, loss, count,
    members}}; with `return_logits`, also "labels" (N,) and each member's "logits" (N, K)
    float32. top1/top5 are fractions of `count`; loss is the mean cross-entropy of the
    (combined) distribution.

    `batch_size` None evaluates each member in batches of its own training batch size, so a
    member's row reproduces its run's own last evaluation (summary.json) on the same number of
    devices. With bfloat16 compute, another batch size is another compiled program whose
    roundings can differ, enough to flip the odd near-tie: on digits, one bfloat16 run read
    41.39% top-1 in batches of 32 (as trained) and 41.94% in batches of 64, 128 or 360.

    Everything that can be checked from the runs' records is checked before any weights load:
    ValueError for a bad setting, a workdir with no checkpoint, or runs of different datasets.
    """
    if isinstance(workdirs, (str, os.PathLike)):
        workdirs = [workdirs]
    workdirs = list(workdirs)
    if not workdirs:
        raise ValueError("an ensemble needs at least one workdir")
    flags.one_of(*COMBINE).check("combine", combine)
    flags.one_of(*SPLITS).check("split", split)
    flags.optional(flags.POSITIVE_INT).check("batch_size", batch_size)
    if data_dir is not None:
        flags.check_directory("data_dir", data_dir)
    members = [read_member(w) for w in workdirs]
    check_same_dataset(members)
    mesh = parallel.make_mesh(jax.local_devices())
    if batch_size is not None:
        parallel.check_batch_size(batch_size, mesh.size)

    logits, labels = [], []
    for i, m in enumerate(members):
        t0 = time.perf_counter()
        m["eval_batch_size"] = batch_size or eval_batch_size(m, mesh.size)
        out, lab = predict(m, split=split, data_dir=data_dir, batch_size=m["eval_batch_size"],
                           mesh=mesh)
        m["eval_s"] = time.perf_counter() - t0
        m.update(metrics(out, lab))
        logits.append(out)
        labels.append((m["workdir"], lab))
        if log:
            log(f"member {i + 1}/{len(members)}: {m['arch']} {m['image_size']}px {m['dtype']}: "
                f"top-1 {m['top1']:.2%} over {m['count']} examples ({m['eval_s']:.1f} s)")
    check_aligned(labels)
    reference = labels[0][1]
    result = {"dataset": members[0]["dataset"], "split": split, "combine": combine,
              "num_classes": members[0]["num_classes"], "count": len(reference),
              "members": members,
              "ensemble": {**metrics(combine_logits(logits, combine), reference),
                           "members": len(members)}}
    if return_logits:
        result["labels"] = reference
        for m, out in zip(members, logits):
            m["logits"] = out
    return result


def table(result: dict[str, Any]) -> str:
    """The members and the ensemble as a plain-text table (what experiments.ensemble prints)."""
    how = {"probs": "mean of probabilities", "logits": "mean of logits"}[result["combine"]]
    head = (f"ensemble of {len(result['members'])} run(s) on {result['dataset']} "
            f"{result['split']} split ({result['count']} examples), {how}")
    rows = [("", "arch", "input", "dtype", "step", "top-1", "top-5", "loss", "workdir")]
    for i, m in enumerate(result["members"]):
        rows.append((str(i + 1), m["arch"], f"{m['image_size']}x{m['image_size']}", m["dtype"],
                     str(m["step"]), f"{m['top1']:.2%}", f"{m['top5']:.2%}", f"{m['loss']:.4f}",
                     m["workdir"]))
    e = result["ensemble"]
    rows.append(("", "ensemble", "", "", "", f"{e['top1']:.2%}", f"{e['top5']:.2%}",
                 f"{e['loss']:.4f}", f"({result['combine']})"))
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    right = {0, 4, 5, 6, 7}  # numbers right-aligned

    def line(r):
        return "  ".join(v.rjust(w) if c in right else v.ljust(w)
                         for c, (v, w) in enumerate(zip(r, widths))).rstrip()

    rule = "-" * len(line(rows[0]))
    return "\n".join([head, line(rows[0]), rule, *map(line, rows[1:-1]), rule, line(rows[-1])])
