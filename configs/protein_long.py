r"""Long proteins: a causal FAVOR+ Performer on packed rows of 8,192 residues.

The Performer paper's long-protein experiment at our scale. The paper concatenates TrEMBL
proteins into sequences of up to 8,192 residues, which overloads a regular Transformer's
memory, so it shrinks the Transformer until it fits and compares. Here: the bundled
2,100-protein sample packed (data.pack) into rows of 8,192 tokens, batch 1 (78 rows per
training epoch; segment_ids keep the ~24 proteins of a row from attending to each other,
and sinusoidal positions restart at each protein, so the model carries no 8,192-row
position table), 3 layers of width 128, 4 heads, 128 features redrawn every 100 steps.
Its exact-softmax rival is configs/protein_long_transformer.py: the largest softmax
Transformer that fits the same MEMORY BUDGET, for the same wall time.

MEMORY BUDGET: peak memory of one training step <= MEMORY_BUDGET_GIB = 2.5 GiB, as XLA's
buffer assignment of the compiled step reports it (arguments + outputs + temporaries -
donated aliases: benchmarks/common.py), batch 1 x 8,192. Measured (jax 0.10.2, CPU):
this Performer 0.688 GiB; the softmax Transformer of its size 10.310 GiB (does not fit);
the shrunk one, 2 layers x 1 head at width 128, 1.940 GiB (3 layers x 1 head: 2.81).

Both train for the same wall time, train.time_limit_minutes = 10 each (the training
loop's wall time, the first step's compilation included; setup before it and the final
eval after it are not counted). Step time,
probed on 2 CPU cores shared with other jobs (load ~7): Performer 1.8-2.4 s, softmax
Transformer 12-16 s, i.e. ~250-340 vs ~40-50 steps in the 10 minutes (more on a free
machine); each step is 8,192 tokens.

  python train.py --config=configs/protein_long.py --workdir=/tmp/protein_long
  python benchmarks/protein_long.py --train --workdir=/tmp/protein_long_bench  # both, ~23 min

Runtime: ~11 min (10 min of training, then the final evaluation).
Expected: validation perplexity 16.56 after 6 min (151 steps; 2 shared cores), softmax 16.85.

For scale: the unigram baseline of these validation rows is 17.68, and the 256-residue
protein configs reach ~16.0.
"""

from configs import protein_performer_softmax_uni

MEMORY_BUDGET_GIB = 2.5


def get_config():
  config = protein_performer_softmax_uni.get_config()
  config.model.max_len = 8192
  config.model.positions = 'sinusoidal'
  config.data.seq_len = 8192
  config.data.pack = True
  config.train.batch_size = 1
  # A race for wall time: a cap the time limit always reaches first, and a constant rate
  # after warmup, so neither model is judged mid-way down a schedule sized for the other.
  config.train.time_limit_minutes = 10.0
  config.train.num_steps = 100_000
  config.train.schedule = 'constant'
  config.train.learning_rate = 2e-3
  config.train.warmup_steps = 20  # ~5% of the steps it completes
  config.train.log_every = 10
  # No periodic eval: it would cost each model a different share of its time (the final
  # eval, after the limit, covers the whole validation split: 5 rows, 35,547 tokens).
  config.train.eval_every = 0
  config.train.eval_batches = 0
  config.train.checkpoint_every = 100
  return config
