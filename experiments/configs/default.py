"""python -m experiments.train --arch=resnet18        (any --arch; this preset is the default)

The embedded default: scikit-learn's handwritten digits (1,437 train / 360 test, 8x8 grayscale)
prepared as a tfds dataset on first use, offline, upscaled to the arch's smallest useful size.
SGD with Nesterov momentum, 1 warmup epoch then cosine, for 10 epochs: a few minutes on a 2-core
CPU for the small networks, with test accuracy well above 90%.
"""
CONFIG = dict(dataset="digits", batch_size=64, num_epochs=10, optimizer="sgd",
              learning_rate=0.4, weight_decay=5e-4, warmup_epochs=1, label_smoothing=0.0,
              log_every=5)
