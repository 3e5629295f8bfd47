r"""Zoo transfer: fine-tune a softmax protein LM as a FAVOR+ Performer (init_from).

The Performer paper's transfer experiment on the protein setting: take the trained exact
softmax Transformer of configs/protein_transformer_uni.py, load its parameters by name into
the identical model with FAVOR+ softmax attention (configs/protein_performer_softmax_uni.py)
and fine-tune for ~15% of the original 700 steps. The random features are the Performer's
own fresh draw; optimizer state and step start anew. The source is given on the command
line (the config cannot know your workdir):

  python train.py --config=configs/protein_transformer_uni.py --workdir=/tmp/protein_tf_uni
  python train.py --config=configs/protein_transfer_performer.py \
      --workdir=/tmp/protein_transfer \
      --config.train.init_from=/tmp/protein_tf_uni

Add `--config.train.distill_from=/tmp/protein_tf_uni` to also distil from the frozen
softmax teacher (KL of the logits, weight config.train.distill_weight). The run writes
workdir/init_from.json listing every transferred parameter (and any present in only one of
the two models). A small-scale measurement of this experiment is in docs/transfer.md
(benchmarks/transfer.py).

Runtime: not timed alone: 100 steps at the default's pace, ~1.5 min after the softmax run.
Expected: about the teacher's accuracy (notebook 4, 150 steps: 0.113 zero-shot -> 0.116).
"""

from configs import protein_performer_softmax_uni


def get_config():
  config = protein_performer_softmax_uni.get_config()
  config.train.num_steps = 100  # ~15% of the 700 steps the softmax source was trained for
  config.train.learning_rate = 1e-3  # fine-tuning: half the from-scratch rate
  config.train.warmup_steps = 10
  config.train.redraw_every = 0  # one feature draw for the whole (short) fine-tune
  config.train.eval_every = 20
  config.train.log_every = 10
  config.train.checkpoint_every = 50
  return config
