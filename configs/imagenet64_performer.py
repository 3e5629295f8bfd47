r"""ImageNet 64x64 autoregressive image model with FAVOR+ (the Performer paper's setting).

Each image is 64*64*3 = 12,288 sub-pixel tokens in raster order with a 256-way softmax;
the model prepends a START token itself, so every sub-pixel is predicted and eval reports
bits per dim. 6 layers, 8 heads, width 512, 256 orthogonal features, axial positions,
bfloat16 compute, sequences of the full 12,288 tokens.

  python train.py --config=configs/imagenet64_performer.py --workdir=/tmp/imagenet64

Needs the TFDS data prepared once (python -m performer.data.prepare imagenet64 --data_dir
DIR, then --config.data.data_dir=DIR); without it, train.py stops at once with one line
naming that command (exit 2).
Runtime: accelerator scale; not run on this project's machines.
Expected: not measured; the paper reports about 3.7 bits/dim.

Context parallelism on a multi-GPU host (docs/training.md, "Context parallelism"), e.g. 8 GPUs:

  python train.py --config=configs/imagenet64_performer.py --workdir=/tmp/imagenet64 \
      --config.mesh.seq=4          # data = 8 / 4 = 2

splits each image's 12,288 positions into 4 spans of 3,072 (12 chunks of 256), one per
GPU; attention then exchanges one (S, z) state per layer and head, whatever the length, and
activation memory per GPU falls about 4x. mesh.seq must leave whole chunks on each
device: 1, 2, 3, 4, 6, 8, 12, 16, 24 or 48 (config check).
"""

from configs import base


def get_config():
  config = base.get_config()
  config.model.task = 'image_ar'
  config.model.vocab_size = 256
  config.model.image_shape = (64, 64, 3)
  config.model.num_layers = 6
  config.model.num_heads = 8
  config.model.emb_dim = 512
  config.model.mlp_dim = 2048
  config.model.dropout_rate = 0.0
  config.model.max_len = 64 * 64 * 3
  config.model.positions = 'axial'
  config.model.dtype = 'bfloat16'
  config.model.attention.kind = 'favor_softmax'
  config.model.attention.num_features = 256
  config.model.attention.chunk_size = 256
  config.data.name = 'imagenet64'
  config.data.seq_len = 64 * 64 * 3
  config.data.crop = 'start'
  config.data.image_size = 64
  config.train.batch_size = 32
  config.train.num_steps = 200_000
  config.train.learning_rate = 5e-4
  config.train.warmup_steps = 2000
  config.train.redraw_every = 1000
  config.train.log_every = 100
  config.train.eval_every = 5000
  config.train.eval_batches = 20
  config.train.checkpoint_every = 2000
  return config
