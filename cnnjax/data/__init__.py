"""Input pipeline: the embedded digits, named TFDS datasets, synthetic data; one Loader.

    info = dataset_info("digits")                    # prepares digits in the data dir once
    loader = Loader("digits", "train", image_size=32, global_batch_size=128,
                    process_index=jax.process_index(), process_count=jax.process_count())
    for step, batch in loader.iterate(start_step=restored_step): ...

`batch(step)` depends only on (dataset, seed, step), never on the number of devices or
processes: a checkpoint's step is its data position.
"""
from cnnjax.data.loader import Loader, dataset_info, default_image_size
from cnnjax.data.sources import DATASETS, DatasetInfo, DatasetUnavailable, Spec, supported

__all__ = ["DATASETS", "DatasetInfo", "DatasetUnavailable", "Loader", "Spec", "dataset_info",
           "default_image_size", "supported"]
