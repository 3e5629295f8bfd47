r"""Protein causal LM with exact softmax attention: the Transformer baseline for the default.

Identical to protein_performer_softmax_uni except the attention kind, so the two runs
compare attention only (and a checkpoint of either initializes the other: init_from).

  python train.py --config=configs/protein_transformer_uni.py --workdir=/tmp/protein_tf_uni

Measured (next-token; 700 steps, 6.5 min wall on 2 CPU cores shared with other jobs,
jax 0.10.2): validation accuracy 0.1198, perplexity 16.02 (unigram baseline 17.67);
test accuracy 0.1150, perplexity 16.10 (unigram 17.06). Runs are deterministic: the same
command prints the same numbers.

Runtime: 6.5 min on 2 CPU cores (700 steps).
Expected: validation accuracy 0.1198, perplexity 16.02.
"""

from configs import protein_performer_softmax_uni


def get_config():
  config = protein_performer_softmax_uni.get_config()
  config.model.attention.kind = 'softmax'
  config.train.redraw_every = 0  # no random features to redraw
  return config
