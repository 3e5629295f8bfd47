r"""Protein causal LM ("UNI") with FAVOR+ softmax attention: the DEFAULT main job.

A CPU-sized version of the Performer paper's protein setting (Choromanski et al.: TrEMBL,
unidirectional and bidirectional models with exact softmax, FAVOR+ softmax and FAVOR ReLU
attention, sequences of up to 1024 residues, periodically redrawn orthogonal features).
Here: the bundled 2,100-protein sample (90/5/5 split by record id), random 256-residue
windows, 3 layers of width 128, 4 heads, 128 orthogonal features (head_dim 32) redrawn
every 100 steps, 700 steps of batch 16.

  python train.py --config=configs/protein_performer_softmax_uni.py --workdir=/tmp/protein_uni

Measured (next-token; 700 steps, 9.0 min wall on 2 CPU cores shared with other jobs,
jax 0.10.2): validation accuracy 0.1195, perplexity 16.05 (unigram baseline 17.67);
test accuracy 0.1145, perplexity 16.15 (unigram 17.06). Runs are deterministic: the same
command prints the same numbers.

Runtime: 9.0 min on 2 CPU cores (700 steps).
Expected: validation accuracy 0.1195, perplexity 16.05.
"""

from configs import base


def get_config():
  config = base.get_config()
  config.model.task = 'causal_lm'
  config.model.num_layers = 3
  config.model.num_heads = 4
  config.model.emb_dim = 128
  config.model.mlp_dim = 512
  config.model.dropout_rate = 0.1
  config.model.max_len = 256
  config.model.positions = 'learned'
  config.model.attention.kind = 'favor_softmax'
  config.model.attention.num_features = 128
  config.model.attention.chunk_size = 64
  config.model.attention.orthogonal = True

  config.data.name = 'protein_sample'
  config.data.seq_len = 256
  config.data.crop = 'random'
  config.data.pack = False

  config.train.batch_size = 16
  config.train.num_steps = 700
  config.train.learning_rate = 2e-3
  config.train.warmup_steps = 70
  config.train.schedule = 'cosine'
  config.train.weight_decay = 0.01
  config.train.grad_clip = 1.0
  config.train.redraw_every = 100
  config.train.log_every = 50
  config.train.eval_every = 200
  config.train.eval_batches = 4
  config.train.checkpoint_every = 200
  config.train.keep_checkpoints = 2
  return config
