"""python -m experiments.train --config=imagenet_resnet50 --data_dir=/path/to/tensorflow_datasets

The Flax ImageNet example's ResNet-50 recipe: 100 epochs of batch 1024 at 224x224, SGD with
Nesterov momentum 0.9, lr 0.1 x batch/256 = 0.4, 5 linear warmup epochs then cosine decay, weight
decay 1e-4 (not on BatchNorm or biases), bfloat16 compute with float32 parameters (for TPUs and
recent GPUs; pass --dtype=float32 elsewhere). The Flax example reports about 76.5% top-1 for it;
imagenet2012 must be prepared (tfds build imagenet2012 --file_format=array_record, manual download).
"""
CONFIG = dict(arch="resnet50", dataset="imagenet2012", image_size=224, batch_size=1024,
              num_epochs=100, optimizer="sgd", learning_rate=0.1, weight_decay=1e-4,
              warmup_epochs=5, label_smoothing=0.0, dtype="bfloat16", log_every=100)
