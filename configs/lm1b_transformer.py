r"""LM1B causal LM with exact softmax attention, after Flax's examples/lm1b defaults.

6 layers, 8 heads, width 512, MLP 2048, dropout 0.1, 30k sentencepiece vocabulary, packed
sequences of 256 tokens, global batch 256, warmup 1000 then cosine, 500k steps (the
example's rsqrt schedule is replaced by cosine).

  python train.py --config=configs/lm1b_transformer.py --workdir=/tmp/lm1b_tf

Needs TFDS lm1b prepared once (python -m performer.data.prepare lm1b --data_dir DIR, then
--config.data.data_dir=DIR); without it, train.py stops at once with one line naming that
command (exit 2).
Runtime: accelerator scale (days: 500k steps of batch 256); not run here.
Expected: no measured number yet.
"""

from configs import base


def get_config():
  config = base.get_config()
  config.model.task = 'causal_lm'
  config.model.vocab_size = 0  # = the sentencepiece vocabulary below
  config.model.num_layers = 6
  config.model.num_heads = 8
  config.model.emb_dim = 512
  config.model.mlp_dim = 2048
  config.model.dropout_rate = 0.1
  config.model.max_len = 512
  config.model.positions = 'sinusoidal'
  config.model.attention.kind = 'softmax'
  config.data.name = 'lm1b'
  config.data.vocab_size = 30_000  # sentencepiece pieces, trained on the train split
  config.data.seq_len = 256
  config.data.pack = True
  config.train.batch_size = 256
  config.train.num_steps = 500_000
  config.train.learning_rate = 1.6e-3
  config.train.warmup_steps = 1000
  config.train.weight_decay = 0.1
  config.train.redraw_every = 0
  config.train.log_every = 200
  config.train.eval_every = 2000
  config.train.eval_batches = 50
  config.train.checkpoint_every = 5000
  return config
