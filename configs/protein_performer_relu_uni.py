r"""Protein causal LM with Performer-ReLU (generalized attention, ReLU random features).

The paper's best protein model was Performer-ReLU. Same size and budget as the default job.

  python train.py --config=configs/protein_performer_relu_uni.py --workdir=/tmp/protein_relu_uni

Measured (next-token; 700 steps, 7.9 min wall on 2 CPU cores shared with other jobs,
jax 0.10.2): validation accuracy 0.1203, perplexity 15.98 (unigram baseline 17.67);
test accuracy 0.1153, perplexity 16.05 (unigram 17.06). Runs are deterministic: the same
command prints the same numbers.

Runtime: 7.9 min on 2 CPU cores (700 steps).
Expected: validation accuracy 0.1203, perplexity 15.98.
"""

from configs import protein_performer_softmax_uni


def get_config():
  config = protein_performer_softmax_uni.get_config()
  config.model.attention.kind = 'favor_relu'
  return config
