"""The embedded dataset: scikit-learn's handwritten digits as a TFDS dataset, built offline.

1,797 8x8 grayscale images (UCI "Optical Recognition of Handwritten Digits", 0..16 per pixel,
rescaled here to 0..255 uint8), 10 classes. The split is fixed and stratified: 36 test examples
per class (360), the other 1,437 for training, chosen by a hash of the example index so that it
does not depend on NumPy's RNG. Files are array_record, read by index with `as_data_source`.
"""
from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds

from cnnjax.data import transforms

NAME = "cnnjax_digits"
TEST_PER_CLASS = 36


def split_indices(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) indices into load_digits(): sorted, disjoint, 36 test rows per class."""
    order = transforms.permutation(transforms.hash_key(1797, 36), len(labels))
    test = np.concatenate([order[labels[order] == c][:TEST_PER_CLASS] for c in range(10)])
    is_test = np.zeros(len(labels), bool)
    is_test[test] = True
    return np.flatnonzero(~is_test), np.flatnonzero(is_test)


def load_arrays() -> tuple[np.ndarray, np.ndarray]:
    """All 1,797 images as uint8 (N, 8, 8, 1) on 0..255, and int64 labels."""
    from sklearn.datasets import load_digits  # a file shipped inside scikit-learn: no network

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    return images, digits.target.astype(np.int64)


class CnnjaxDigits(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """scikit-learn's digits; unregistered, so it cannot collide with a TFDS catalogue name."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "8x8x1 uint8 tensors, stratified 1,437 / 360 split."}

    def _info(self) -> tfds.core.DatasetInfo:
        # Built directly: dataset_info_from_configs() wants a metadata folder next to the module.
        return tfds.core.DatasetInfo(
            builder=self,
            description="scikit-learn's 8x8 handwritten digits (UCI optdigits test set).",
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Tensor(shape=(8, 8, 1), dtype=np.uint8),
                "label": tfds.features.ClassLabel(num_classes=10),
            }),
            supervised_keys=("image", "label"),
            disable_shuffling=True,  # keep file order = index order, so eval runs in order
            homepage="https://archive.ics.uci.edu/dataset/80",
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        images, labels = load_arrays()
        train, test = split_indices(labels)
        return {"train": self._generate_examples(images, labels, train),
                "test": self._generate_examples(images, labels, test)}

    def _generate_examples(self, images, labels, indices):
        for i in indices:
            yield int(i), {"image": images[i], "label": int(labels[i])}
