"""Any weights measured on a dataset split: top-1, top-5 and loss, beside the published figures.

    python -m experiments.validate --arch=resnet50 --weights=IMAGENET1K_V1 \
        --dataset=imagenet2012 --data_dir=...            # torchvision's 76.13% top-1
    python -m experiments.validate --weights=weights/r50 --data_dir=...    # converted weights
    python -m experiments.validate --workdir=runs/resnet18-digits          # a run's checkpoint

    result = validate(arch="resnet50", weights="IMAGENET1K_V1", data_dir="...")
    print(report(result))

Published and converted weights are measured with their own evaluation transform,
`meta["preprocess"]` applied by `cnnjax.predict.preprocess` (torchvision's Resize, CenterCrop,
ToTensor and Normalize on a PIL image: the transform torchvision measured its figures with).
A training run's checkpoint is measured with the run's own evaluation pipeline (cnnjax.data's
eval transform at the run's image size, the run's eval step), so its figures are the ones the
run reported for that step. Every example of the split is counted once.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import io
import json
import pathlib
from typing import Any, Iterator

import numpy as np
from flax import struct
from PIL import Image

from cnnjax import checkpoint as ckpt
from cnnjax import data, flags, parallel, predict, runtime
from cnnjax.data import sources
from cnnjax.pretrained import by_file
from cnnjax.training import rundir, steps

SPLITS = ("test", "train")  # test: the dataset's evaluation split (ImageNet's validation)


@dataclasses.dataclass
class Subject:
    """What is measured: the model, its variables, and how to make its inputs."""
    model: Any
    variables: dict
    arch: str
    name: str                       # "resnet50 IMAGENET1K_V1", a directory, "RUN step 8"
    num_classes: int
    preprocess: dict | None         # the weights' transform; None: the run's own pipeline
    published: dict | None = None   # {"top1", "top5", "by"}: figures recorded elsewhere
    run: dict | None = None         # a checkpoint's config (dataset, data_dir, image_size, ...)


# --- what is measured ------------------------------------------------------------------------

def check(arch: str | None, weights: str | None, workdir: str | None,
          batch_size: int | None, data_dir: str | None) -> None:
    """ValueError, naming the flag, unless the request can be served (nothing is read)."""
    if workdir is not None and (arch is not None or weights is not None):
        raise ValueError(f"--workdir={flags.show(workdir)} brings its own model: give it alone, "
                         "or --arch/--weights without it")
    if workdir is None and arch is None and weights is None:
        raise ValueError("give --arch=ARCH (torchvision's published weights), --weights=DIR "
                         "(converted weights) or --workdir=RUN (a training run's checkpoint)")
    flags.optional(flags.POSITIVE_INT).check("batch_size", batch_size)
    if data_dir is not None:
        flags.check_directory("data_dir", data_dir)
    if workdir is not None:
        flags.check_existing_directory("workdir", workdir, "the --workdir of a training run")
        ckpt.require_saved(workdir, f"--workdir={flags.show(workdir)}")


def load(arch: str | None = None, weights: str | None = None, workdir: str | None = None,
         best: bool = False) -> Subject:
    """The weights of --arch/--weights (published: downloaded and converted on first use) or of
    run --workdir (its latest checkpoint, or with `best` the one of its best eval top-1)."""
    if workdir is not None:
        return _run_subject(workdir, best)
    name = predict.published(arch, weights)
    model, variables, meta = predict.load_weights(arch, weights)
    metrics = meta.get("metrics") or _registry_metrics(meta)
    return Subject(model, variables, meta["arch"],
                   f"{meta['arch']} {name}" if name else str(weights), meta["num_classes"],
                   dict(meta["preprocess"]),
                   {**metrics, "by": "torchvision, ImageNet-1k"} if metrics else None)


def _run_subject(workdir: str, best: bool) -> Subject:
    model, variables, record = rundir.load_checkpoint(workdir, best=best)
    config, step = record["config"], int(record["data_position"]["step"])
    recorded = record.get("eval")  # the best checkpoint's own eval
    summary = pathlib.Path(workdir) / "summary.json"
    if recorded is None and summary.is_file():
        finished = json.loads(summary.read_text())
        recorded = finished if finished.get("steps") == step else None
    published = None
    if recorded and "eval_top1" in recorded:
        published = {"top1": 100 * recorded["eval_top1"], "top5": 100 * recorded["eval_top5"],
                     "loss": recorded["eval_loss"], "by": f"the run's own eval at step {step}"}
    return Subject(model, variables, config["arch"], f"{workdir} step {step}",
                   int(record["model"]["num_classes"]), None, published, config)


def _registry_metrics(meta: dict) -> dict | None:
    """The published figures of a converted file that the registry lists (by its file name)."""
    file = pathlib.Path(str(meta.get("source", {}).get("file", ""))).name
    entry = by_file(meta["arch"], file)[1]
    return {"top1": entry["top1"], "top5": entry["top5"]} if entry else None


# --- the data --------------------------------------------------------------------------------

class PreprocessedSplit:
    """A split as padded eval batches of `predict.preprocess(image, **settings)`: what
    `steps.evaluate` reads from a Loader (`steps_per_epoch`, `iterate`), images decoded and
    transformed on a thread pool (PIL releases the GIL), the next batch made while one runs."""

    def __init__(self, dataset: str, split: str, data_dir: str | None, settings: dict,
                 batch_size: int):
        if sources.parse_synthetic(dataset) is not None:
            raise ValueError(f"--dataset={flags.show(dataset)} has no images to transform; "
                             "measure published or converted weights on a real dataset")
        spec = sources.get_spec(dataset)
        self.split = "train" if split == "train" else spec.test_split
        self.source = sources.open_split(dataset, sources.default_data_dir(data_dir), self.split)
        self.settings, self.batch_size = settings, batch_size
        self.num_examples = len(self.source)
        self.steps_per_epoch = -(-self.num_examples // batch_size)

    def _example(self, image: Any) -> np.ndarray:
        if isinstance(image, bytes):
            image = predict.to_rgb(Image.open(io.BytesIO(image)))
        return predict.preprocess(image, **self.settings)

    def batch(self, step: int) -> dict[str, np.ndarray]:
        rows = np.arange(step * self.batch_size, (step + 1) * self.batch_size)
        valid = rows < self.num_examples
        if isinstance(self.source, sources.ArraySource):
            images, labels = list(self.source.images[rows[valid]]), \
                self.source.labels[rows[valid]]
        else:
            images, labels = self.source.read(rows[valid])
        crop = self.settings["crop"]
        image = np.zeros((self.batch_size, crop, crop, 3), np.float32)
        image[:len(images)] = list(sources.thread_pool().map(self._example, images))
        label = np.zeros(self.batch_size, np.int32)
        label[valid] = labels
        return {"image": image, "label": label, "mask": valid.astype(np.float32)}

    def iterate(self, start: int = 0, num: int | None = None
                ) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        stop = self.steps_per_epoch if num is None else min(start + num, self.steps_per_epoch)
        with concurrent.futures.ThreadPoolExecutor(1) as ahead:
            pending = ahead.submit(self.batch, start) if start < stop else None
            for step in range(start, stop):
                current = pending.result()
                pending = ahead.submit(self.batch, step + 1) if step + 1 < stop else None
                yield step, current


class _Progress:
    """A split whose iteration draws a tqdm bar (stderr) over its batches."""

    def __init__(self, split, enabled: bool):
        self.split, self.enabled = split, enabled
        self.steps_per_epoch = split.steps_per_epoch

    def iterate(self, start: int = 0, num: int | None = None):
        import tqdm
        return tqdm.tqdm(self.split.iterate(start, num), total=self.steps_per_epoch,
                         disable=not self.enabled, unit="batch", leave=False)


# --- measuring -------------------------------------------------------------------------------

def validate(arch: str | None = None, weights: str | None = None, *, workdir: str | None = None,
             best: bool = False, dataset: str | None = None, data_dir: str | None = None,
             split: str = "test", batch_size: int | None = None,
             verbose: bool = False) -> dict[str, Any]:
    """Measures the weights (see `load`) on `split` of `dataset` (default: the run's dataset,
    else imagenet2012); returns the measured and recorded figures (`report` prints them).
    ValueError (or pretrained.DownloadError) naming what is wrong, before any download when
    the request or the dataset is at fault."""
    check(arch, weights, workdir, batch_size, data_dir)
    flags.one_of(*SPLITS).check("split", split)
    if workdir is None:  # the weights' promises first: no download for a request that fails
        promised = predict.weights_meta(arch, weights)
        subject = None
    else:
        subject = load(workdir=workdir, best=best)
        promised = {"num_classes": subject.num_classes}
        dataset = dataset or subject.run["dataset"]
        data_dir = data_dir or subject.run["data_dir"]
    dataset = dataset or "imagenet2012"
    info = data.dataset_info(dataset, data_dir)  # a dataset not prepared: its one message
    if info.num_classes != promised["num_classes"]:
        raise ValueError(f"the weights have {promised['num_classes']} classes and "
                         f"--dataset={dataset} has {info.num_classes}: measure them on a dataset "
                         "of their classes, or fine-tune them first (python -m experiments.train "
                         "--init_from=...)")
    subject = subject or load(arch, weights)
    batch_size = batch_size or (subject.run["batch_size"] if subject.run else 64)
    mesh = parallel.make_mesh()
    parallel.check_batch_size(batch_size, mesh.size)
    if subject.preprocess is None:
        split_data = data.Loader(dataset, split, data_dir=data_dir, train=False,
                                 image_size=subject.run["image_size"],
                                 global_batch_size=batch_size)
        transform = f"the run's eval transform at {subject.run['image_size']}px"
    else:
        split_data = PreprocessedSplit(dataset, split, data_dir, subject.preprocess, batch_size)
        p = subject.preprocess
        transform = f"resize {p['resize']} ({p['interpolation']}), centre crop {p['crop']}"
    measured = measure(subject, _Progress(split_data, verbose), mesh)
    return {"name": subject.name, "arch": subject.arch, "dataset": dataset,
            "split": getattr(split_data, "split", split), "transform": transform,
            "measured": measured, "published": subject.published}


class _Variables(struct.PyTreeNode):
    """What the eval step reads of a train state."""
    params: Any
    batch_stats: Any


def measure(subject: Subject, split_data, mesh) -> dict[str, float]:
    """top1/top5 (percent), loss and count of `subject` over every batch of `split_data`, with
    the training system's own eval step (cnnjax.training.steps), jitted as a run jits it."""
    import jax
    repl = parallel.replicated(mesh)
    state = jax.device_put(_Variables(subject.variables["params"],
                                      subject.variables.get("batch_stats", {})), repl)
    eval_step = runtime.jit(steps.make_eval_step(subject.model),
                            in_shardings=(repl, parallel.batch_sharding(mesh)),
                            out_shardings=repl)
    m = steps.evaluate(state, eval_step, split_data, mesh)
    return {"top1": 100 * m["eval_top1"], "top5": 100 * m["eval_top5"], "loss": m["eval_loss"],
            "count": m["eval_count"]}


def report(result: dict[str, Any]) -> str:
    """The lines the command prints: what was measured, then measured beside recorded."""
    m, p = result["measured"], result["published"]
    lines = [f"{result['name']} on {result['dataset']}/{result['split']}: {m['count']} images, "
             f"{result['transform']}",
             f"{'':10} {'top-1':>8} {'top-5':>8} {'loss':>8}",
             f"{'measured':10} {m['top1']:7.3f}% {m['top5']:7.3f}% {m['loss']:8.4f}"]
    if p:
        loss = f"{p['loss']:8.4f}" if "loss" in p else f"{'-':>8}"
        lines.append(f"{'published' if 'loss' not in p else 'recorded':10} {p['top1']:7.3f}% "
                     f"{p['top5']:7.3f}% {loss}  ({p['by']})")
    return "\n".join(lines)
