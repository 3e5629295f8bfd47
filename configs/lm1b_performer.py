r"""LM1B causal LM with FAVOR+ softmax attention: same model as lm1b_transformer.

  python train.py --config=configs/lm1b_performer.py --workdir=/tmp/lm1b_perf

Because the parameters are identical, this config also serves the paper's transfer
experiment: start from a trained softmax checkpoint and fine-tune,

  python train.py --config=configs/lm1b_performer.py --workdir=/tmp/lm1b_perf \
      --config.train.init_from=/tmp/lm1b_tf

(the paper: the transferred Performer starts near 0.07 accuracy and recovers quickly).
Needs TFDS lm1b prepared (see lm1b_transformer); otherwise it fails at start (exit 2).

Runtime: accelerator scale, as lm1b_transformer; not run here.
Expected: no measured number yet (the paper's transfer: ~0.07 accuracy, then recovery).
"""

from configs import lm1b_transformer


def get_config():
  config = lm1b_transformer.get_config()
  config.model.attention.kind = 'favor_softmax'
  config.model.attention.num_features = 256
  config.model.attention.chunk_size = 128
  config.train.redraw_every = 1000
  return config
