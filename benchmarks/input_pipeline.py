"""--mode=input: the train split's batches from cnnjax.data.Loader against a reference tf.data
pipeline on the same files, in the same process (images/s, medians of alternating rounds);
with --arch, the fraction of a train step's time spent waiting for data; --readme renders the
results as the input-benchmark table of docs/data.md (--readme=docs/data.md)."""
from __future__ import annotations

import dataclasses
import json
import pathlib
import platform
import time
from typing import Any, Callable

import jax
import numpy as np

from benchmarks import report, step
from cnnjax import data, flags, parallel
from cnnjax.data import records, sources
from cnnjax.training.actions import Clock
from experiments import zoo

INPUT_START, INPUT_END = "<!-- input-benchmark:start -->", "<!-- input-benchmark:end -->"
WARMUP_BATCHES = 2  # batches that fill the pipeline before timing starts


def input_benchmark(args) -> int:
    """One JSON line per worker count (1, 2 and all cores, or --workers); the table into
    --readme between INPUT_START and INPUT_END."""
    batch_size, steps = args.batch_size or 64, args.steps or 20
    cores = records.default_workers()
    counts = [args.workers] if args.workers else sorted({1, min(2, cores), cores})

    def loader(workers):
        return data.Loader(args.dataset, "train", data_dir=args.data_dir,
                           image_size=args.image_size, global_batch_size=batch_size,
                           workers=workers)
    try:
        probe = checked_probe(args, loader, batch_size, steps)
        fed = FedStep.build(args, probe) if args.arch else None
    except ValueError as e:
        return flags.fail(e)
    n, results = WARMUP_BATCHES + steps, []
    for workers in counts:
        ours, ref = [], []
        for _ in range(args.rounds):  # alternating, so that drifts hit both alike
            ours.append(images_per_second(loader(workers).iterate(0, n), steps))
            ref.append(images_per_second(reference_batches(probe, workers, n), steps))
        result = {"mode": "input", "dataset": args.dataset, "batch_size": batch_size,
                  "image_size": args.image_size, "workers": workers, "cores": cores,
                  "img_per_s": float(np.median(ours)),
                  "img_per_s_per_worker": float(np.median(ours)) / workers,
                  "reference_img_per_s": float(np.median(ref)),
                  "ratio": float(np.median(ours) / np.median(ref)),
                  "rounds": {"cnnjax": ours, "reference": ref}}
        if fed:
            result.update(arch=args.arch, **fed.time(loader(workers).iterate(0, n), steps,
                                                     batch_size))
        print(json.dumps(result), flush=True)
        results.append(result)
    if args.readme:
        table = render_input(results, report.public_command(args.command))
        write_readme(pathlib.Path(args.readme), table)
    return 0


def checked_probe(args, loader: Callable, batch_size: int, steps: int):
    """A one-worker loader of the dataset, once the dataset, --steps and --readme are known to
    work (ValueError otherwise)."""
    in_memory = (f"--dataset={args.dataset} is held decoded in memory; --mode=input measures "
                 "the decoding of encoded photos (imagenet2012, imagenette, or a fake of them: "
                 "python -m cnnjax.data.fake)")
    if (sources.parse_synthetic(args.dataset) is not None
            or sources.get_spec(args.dataset).offline):  # before preparing anything
        raise ValueError(in_memory)
    probe = loader(1)
    if not probe.decodes_records:
        raise ValueError(in_memory)
    if probe.steps_per_epoch < WARMUP_BATCHES + steps:
        raise ValueError(f"{args.dataset}'s train split has {probe.steps_per_epoch} "
                         f"batches of {batch_size}; --steps={steps} needs "
                         f"{WARMUP_BATCHES + steps}: lower --steps or --batch_size")
    if args.readme:
        readme = pathlib.Path(args.readme)
        if not readme.is_file():
            raise ValueError(f"--readme={args.readme} is not a file")
        if INPUT_START not in readme.read_text() or INPUT_END not in readme.read_text():
            raise ValueError(f"--readme={args.readme} has no {INPUT_START} ... "
                             f"{INPUT_END} markers")
    return probe


@dataclasses.dataclass
class FedStep:
    """--arch: the model's train step fed by the loader, as the train loop feeds it. The step
    donates its state, so the state is carried from one timing to the next."""
    mesh: Any
    state: Any
    step_fn: Callable

    @classmethod
    def build(cls, args, probe) -> FedStep:
        mesh, _, state, train_step, _ = step.build_step(
            args, args.num_classes or probe.info.num_classes, probe.info.channels)
        return cls(mesh, state, step.jit_train(train_step, mesh))

    def time(self, batches, steps: int, batch_size: int) -> dict:
        """Train images/s over the batches after WARMUP_BATCHES, and the fraction of that time
        spent waiting for the next batch."""
        clock = Clock(0)  # the train loop's: counts the time spent waiting for each batch
        batches = clock.timed(parallel.prefetch_to_device(batches, self.mesh))
        previous = None
        for i, (_, batch) in enumerate(batches):
            self.state, metrics = self.step_fn(self.state, batch)
            jax.block_until_ready(previous)  # as the train loop: one step in flight
            previous = metrics["loss"]
            if i == WARMUP_BATCHES - 1:  # compiled, pipeline full: the clock starts
                jax.block_until_ready(previous)
                clock.wait, t0 = 0.0, time.perf_counter()
        jax.block_until_ready(previous)
        elapsed = time.perf_counter() - t0
        return {"train_img_per_s": steps * batch_size / elapsed,
                "data_wait": clock.wait / elapsed}


def images_per_second(batches, steps: int) -> float:
    """Throughput over `steps` batches after WARMUP_BATCHES of `batches`, an iterator of
    (step, batch)."""
    for _ in range(WARMUP_BATCHES):
        next(batches)
    t0 = time.perf_counter()
    images = 0
    for _ in range(steps):
        images += len(next(batches)[1]["label"])
    return images / (time.perf_counter() - t0)


def reference_batches(loader, workers: int, num_batches: int):
    """The same rows as `loader`, preprocessed as the Flax ImageNet example does on tf.data:
    a distorted bounding box (area 8-100%, ratio 3/4-4/3, 10 attempts), decode_and_crop_jpeg,
    bicubic resize, random flip, normalisation. Yields (step, batch) like Loader.iterate."""
    tf = records.tensorflow()
    size, b = loader.image_size, loader.local_batch_size
    mean = tf.constant(loader._spec.mean, tf.float32) * 255.0
    std = tf.constant(loader._spec.std, tf.float32) * 255.0

    def read(index):
        images, labels = loader._source.read(loader.indices(int(index)))
        return np.array(images, object), labels

    def example(encoded, label):
        begin, crop, _ = tf.image.sample_distorted_bounding_box(
            tf.image.extract_jpeg_shape(encoded), tf.zeros((1, 0, 4)), min_object_covered=0.1,
            aspect_ratio_range=(3 / 4, 4 / 3), area_range=(0.08, 1.0), max_attempts=10,
            use_image_if_no_bounding_boxes=True)
        window = tf.stack([begin[0], begin[1], crop[0], crop[1]])
        image = tf.image.decode_and_crop_jpeg(encoded, window, channels=3)
        image = tf.image.resize(image, (size, size), method="bicubic")
        image = tf.image.random_flip_left_right(image)
        return (image - mean) / std, label

    ds = (tf.data.Dataset.range(num_batches)
          .map(lambda s: tuple(tf.numpy_function(read, [s], [tf.string, tf.int32])))
          .unbatch()
          .map(example, num_parallel_calls=workers, deterministic=True)
          .batch(b, drop_remainder=True)
          .prefetch(2))
    options = tf.data.Options()
    options.threading.private_threadpool_size = workers
    options.threading.max_intra_op_parallelism = 1
    options.autotune.enabled = False
    for index, (image, label) in enumerate(ds.with_options(options)):
        yield index, {"image": image.numpy(), "label": label.numpy()}


def write_readme(readme: pathlib.Path, table: str) -> None:
    """Puts `table` between the input-benchmark markers of `readme` (any Markdown file with
    them: docs/data.md); the rest stays."""
    text = readme.read_text()
    head, rest = text.split(INPUT_START, 1)
    readme.write_text(f"{head}{INPUT_START}\n{table}\n{INPUT_END}{rest.split(INPUT_END, 1)[1]}")


def render_input(results: list[dict], command: str) -> str:
    """The input benchmark's results as a Markdown table, with what they were measured on."""
    m = zoo.machine()
    r0 = results[0]
    lines = [f"`{command}` on {m['cpu']} ({r0['cores']} cores), Python {m['python']}, "
             f"TensorFlow {records.tensorflow().__version__}, jax {m['jax']}, {m['date']}; "
             f"{r0['dataset']} train batches of {r0['batch_size']} at {r0['image_size']}x"
             f"{r0['image_size']} ({platform.machine()}).", "",
             "| workers | cnnjax img/s (median) | per worker | reference img/s (median) | ratio |"
             + (" train img/s | data wait |" if "arch" in r0 else ""),
             "|--:|--:|--:|--:|--:|" + ("--:|--:|" if "arch" in r0 else "")]
    for r in results:
        row = (f"| {r['workers']} | {r['img_per_s']:,.0f} | {r['img_per_s_per_worker']:,.0f} | "
               f"{r['reference_img_per_s']:,.0f} | {r['ratio']:.2f} |")
        if "arch" in r:
            row += f" {r['train_img_per_s']:,.1f} ({r['arch']}) | {r['data_wait']:.1%} |"
        lines.append(row)
    return "\n".join(lines)
