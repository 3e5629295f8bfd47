r"""Long proteins: the largest exact-softmax Transformer that fits protein_long's budget.

configs/protein_long.py with exact softmax attention, shrunk until one training step at
8,192 packed residues fits the same memory budget (protein_long.MEMORY_BUDGET_GIB = 2.5 GiB,
XLA's peak for the compiled step). Attention memory grows with layers x heads (each head
of each layer holds ~0.9 GiB: 8,192^2 scores, probabilities and their gradients), so the
shrinking cuts those and keeps the Performer's width 128 (never wider, so that width
cannot buy back what the budget took). Measured peaks: 2 layers x 1 head (head_dim 128)
1.940 GiB, used here; 1 layer x 2 heads 2.07 (the same 2 head-layers, shallower); 3 x 1
head 2.81 and 1 x 4 heads 4.07 do not fit, nor does the Performer's 3 x 4 heads (10.31).
404,253 parameters against the Performer's 602,525.

  python train.py --config=configs/protein_long_transformer.py --workdir=/tmp/protein_long_tf

Runtime: ~12 min (10 of training: ~40-50 steps of 12-16 s on 2 shared CPU cores; eval ~1 min).
Expected: validation perplexity 16.85 after 6 min (46 steps; 2 shared cores), Performer 16.56.
"""

from configs import protein_long

MEMORY_BUDGET_GIB = protein_long.MEMORY_BUDGET_GIB


def get_config():
  config = protein_long.get_config()
  config.model.attention.kind = 'softmax'
  config.model.num_layers = 2
  config.model.num_heads = 1
  config.train.redraw_every = 0  # no random features to redraw
  # ~9x slower per step than the Performer: warmup over about the same wall time.
  config.train.warmup_steps = 3
  config.train.log_every = 5
  return config
