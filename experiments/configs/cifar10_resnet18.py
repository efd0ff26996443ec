"""python -m experiments.train --config=cifar10_resnet18

ResNet-18 on CIFAR-10 at 32x32 (needs the cifar10 tfds dataset prepared or a network to fetch
it): SGD Nesterov 0.9, lr 0.1 x batch/256, 5 warmup epochs, cosine, weight decay 5e-4, label
smoothing 0.1, 100 epochs of batch 256 (19,500 steps). ImageNet's resnet18 keeps its 7x7/2 stem
and max-pool here, so expect less than the ~95% of CIFAR-specific ResNets.
"""
CONFIG = dict(arch="resnet18", dataset="cifar10", image_size=32, batch_size=256, num_epochs=100,
              optimizer="sgd", learning_rate=0.1, weight_decay=5e-4, warmup_epochs=5,
              label_smoothing=0.1, log_every=50)
