r"""Tiny config for tests and smoke runs: 2 layers, width 32, length 64, FAVOR+ softmax.

  python train.py --config=configs/tiny.py --workdir=/tmp/tiny

Runtime: 15-30 s on 2 CPU cores (mostly compilation; 30 s while other jobs shared them).
Expected: no useful metric: validation perplexity ~28 after 10 steps (unigram 17.3).
"""

from configs import base


def get_config():
  config = base.get_config()
  config.model.num_layers = 2
  config.model.num_heads = 2
  config.model.emb_dim = 32
  config.model.mlp_dim = 64
  config.model.max_len = 64
  config.model.attention.kind = 'favor_softmax'
  config.model.attention.num_features = 16
  config.model.attention.chunk_size = 16
  config.data.seq_len = 64
  config.train.batch_size = 4
  config.train.num_steps = 10
  config.train.learning_rate = 3e-3
  config.train.warmup_steps = 2
  config.train.redraw_every = 5
  config.train.log_every = 5
  config.train.eval_every = 10
  config.train.eval_batches = 2
  config.train.checkpoint_every = 5
  config.train.keep_checkpoints = 2
  return config
