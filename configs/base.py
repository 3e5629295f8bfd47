r"""Base config: the full schema with defaults. Every other config derives from it.

The schema is the contract between training, models and data: the config is locked, so a
misspelt key in a variant file or on the command line is an error instead of a silently
ignored setting. Add a key here first, then set it in a variant.

Not meant to be trained directly (it is a mid-sized causal protein LM with no tuning); use
`configs/default.py` or one of the named configs, e.g.

  python train.py --config=configs/default.py --workdir=/tmp/protein_uni
"""

import ml_collections

from performer import errors
from performer.models import families


def get_config():
  """Returns the default config; every field of the schema is present."""
  config = ml_collections.ConfigDict()
  config.seed = 0

  config.model = ml_collections.ConfigDict()
  # 'transformer' (ours) | 'llama' | 'bert'. Llama and BERT fix their norm, MLP, biases,
  # positions and task; with train.init_from=gguf:PATH | hf:DIR the architecture fields
  # below that are 0 are read from the checkpoint (performer/models/families.py).
  config.model.family = 'transformer'
  config.model.task = 'causal_lm'  # one of performer.tasks.TASKS: causal_lm, mlm, image_ar, encoder
  # 0 means "the data's vocabulary size" (data.vocab_for(config.data).size), filled in at start.
  config.model.vocab_size = 0
  config.model.num_layers = 2
  config.model.num_heads = 4
  config.model.emb_dim = 128
  config.model.mlp_dim = 512
  config.model.num_kv_heads = 0  # grouped-query attention; 0 = num_heads
  config.model.head_dim = 0  # 0 = emb_dim // num_heads
  config.model.dropout_rate = 0.0
  config.model.max_len = 1024
  config.model.positions = 'learned'  # 'learned' | 'sinusoidal' | 'rotary' | 'axial' | 'none'
  config.model.rope_theta = 10000.0  # rotary base (positions='rotary')
  config.model.norm_eps = 0.0  # 0 = the family's default
  config.model.tie_embeddings = False  # output head = embedding matrix transposed
  config.model.dtype = 'float32'  # compute dtype; parameters always stay float32
  config.model.image_shape = (0, 0, 0)  # (H, W, C), image_ar only
  # LoRA on the attention projections q, k, v, o (performer/models/lora.py): W + (alpha / r) A B
  # with B = 0 at init, so the model starts as the one without LoRA; 0 = off.
  config.model.lora_rank = 0
  config.model.lora_alpha = 16.0  # the update's scale is lora_alpha / lora_rank
  # A causal depthwise convolution of this width on q, k and v, SiLU after it
  # (performer/models/short_conv.py; Based / GLA / Zoology's recall models use 4); 0 = off.
  config.model.short_conv = 0
  # The families' own settings, with their defaults (bert: type_vocab_size, pooler); each
  # family declares them in its config class (performer/models/families.py).
  for key, default in families.family_fields().items():
    config.model[key] = default
  config.model.attention = ml_collections.ConfigDict()
  config.model.attention.kind = 'favor_softmax'  # one of performer.attention.KINDS
  config.model.attention.num_features = 256
  config.model.attention.chunk_size = 128
  config.model.attention.orthogonal = True
  config.model.attention.feature_norms = 'chi'  # 'chi' | 'sqrt'
  config.model.attention.per_head_features = False
  config.model.attention.stats_decay = 0.99  # favor_plus_plus / favor_sharp running moments
  config.model.attention.hedgehog_dim = 0  # hedgehog feature width d' (0 = head_dim)
  # Exact softmax over the last W keys (+-W bidirectional), linear attention beyond, one
  # normaliser (LoLCATs' sliding window; attention/window.py). 0 = linear everywhere.
  config.model.attention.window = 0
  # Evaluation ablation: a hybrid's window branch removed, its linear branch over every key
  # (does the linear part carry anything?); the checkpoint still loads.
  config.model.attention.window_off = False
  # Attention sinks (StreamingLLM): the first s tokens of each sequence attended exactly, with a
  # learned gain of their own, under the same normaliser (attention/sinks.py). 0 = off.
  config.model.attention.sinks = 0
  # LoLA's sparse cache (needs window > 0): up to this many evicted (k, v) pairs, those the linear
  # state recalls worst, kept exact; updated once per chunk_size tokens in the forward pass and
  # prefill, once per token in decoding (attention/sparse_cache.py). 0 = off.
  config.model.attention.sparse_cache = 0
  # The sparse cache's storage: '' keeps the state's dtype, 'bfloat16' twice the pairs in the same
  # memory (reads and the choice of pairs stay float32). An evaluation-time key, as the cache is.
  config.model.attention.sparse_cache_dtype = ''
  # Score each candidate pair of the sparse cache against the linear state plus every other
  # candidate (leave one out), not the state alone (LoLA): near-copies of one pair, a repeated
  # phrase, then recall each other and do not fill the cache. An evaluation-time key.
  config.model.attention.sparse_cache_leave_one_out = False
  # With rotary positions: the feature maps see q, k before RoPE (a position-free linear part)
  # while the window, sinks and sparse cache score the rotated ones (LAWCAT, Lizard).
  config.model.attention.linear_nope = False
  # A hybrid's linear part weighs a key 0.5^(distance / N) (causal only): its mass stays bounded
  # at any length instead of diluting the exact parts (attention/hybrid.py). 0 = no decay.
  config.model.attention.linear_half_life = 0
  # With linear_nope and sinks or a sparse cache: those keys, when over N tokens back, are
  # scored at distance N (ReRoPE's clamp), so rotary distances stay inside the original's
  # context at any length (attention/rope_clamp.py). 0 = off.
  config.model.attention.rope_clamp = 0

  config.data = ml_collections.ConfigDict()
  config.data.name = 'protein_sample'
  config.data.path = ''  # a local file for 'fasta' / text data
  config.data.seq_len = 256
  config.data.crop = 'random'  # 'random' | 'start'
  config.data.pack = False
  config.data.data_dir = ''  # TFDS / cache directory; '' = library default
  # Optional knobs of particular pipelines (performer/data); 0 / '' = the pipeline's default.
  config.data.spm_path = ''  # lm1b / text: an existing sentencepiece model
  config.data.tokenizer = ''  # text: a pretrained model's own, 'gguf:PATH' | 'hf:DIR'
  config.data.vocab_size = 0  # text: size of the sentencepiece vocabulary to train
  config.data.variant = ''  # imagenet64: which TFDS dataset variant
  config.data.image_size = 0  # imagenet64: side length (64)
  config.data.num_workers = 0  # grain worker processes for TFDS-backed pipelines

  config.train = ml_collections.ConfigDict()
  config.train.batch_size = 16  # global batch, split over devices and over grad_accum_steps
  config.train.num_steps = 1000
  # Stop after the step that crosses this many minutes of the loop's wall time (steps,
  # periodic evals, checkpoints; counted anew when a run resumes), then evaluate and save
  # as at num_steps. The LR schedule still spans num_steps. 0 = off.
  config.train.time_limit_minutes = 0.0
  config.train.learning_rate = 1e-3
  config.train.warmup_steps = 100
  config.train.schedule = 'cosine'  # 'cosine' (to 0 at num_steps) | 'constant'
  config.train.weight_decay = 0.01
  config.train.grad_clip = 1.0  # global-norm clip; 0 disables
  config.train.grad_accum_steps = 1
  config.train.redraw_every = 1000  # redraw random features every N steps; 0 = never
  config.train.log_every = 50
  config.train.eval_every = 500
  config.train.eval_batches = 20  # <= 0: the whole split
  config.train.checkpoint_every = 500
  config.train.keep_checkpoints = 3
  # '' | a zoo workdir / checkpoint dir | gguf:PATH | hf:DIR (Llama, BERT): PARAMS to start from
  config.train.init_from = ''
  config.train.mlm_mask_rate = 0.15
  # Distillation (docs/transfer.md): '' = off, else a workdir /
  # checkpoint (or gguf:PATH | hf:DIR) of a softmax TEACHER with this model's architecture
  # (built with attention kind 'softmax', frozen). Loss += distill_weight * distance to the
  # teacher per token; an encoder (bert) trains on the hidden-state distance alone.
  config.train.distill_from = ''
  config.train.distill_weight = 1.0
  config.train.distill_target = 'logits'  # 'logits': T^2 KL(teacher || student) | 'hidden': MSE
  config.train.distill_temperature = 1.0
  # Linearizing (docs/linearization.md; LoLCATs): the first transfer_steps
  # train only the attention modules' own parameters (feature maps, window gains) to match
  # the distill_from teacher's attention output per layer, at transfer_learning_rate; the
  # rest of the run trains `trainable`: 'all' | 'lora' (model.lora_rank > 0) | 'feature_maps'.
  config.train.transfer_steps = 0
  config.train.transfer_learning_rate = 1e-2
  config.train.transfer_loss = 'mse'  # 'mse' | 'xent' (attention weights) | 'mse+xent'
  config.train.trainable = 'all'

  config.mesh = ml_collections.ConfigDict()
  config.mesh.data = -1  # -1: all devices not used by fsdp and seq
  config.mesh.fsdp = 1
  # Context parallelism: each sequence split over `seq` devices along its length; linear
  # attention exchanges one fixed-size state per layer (docs/training.md, "Context parallelism").
  config.mesh.seq = 1
  # Locked here, so a variant file that sets a misspelt key fails at load instead of
  # silently adding a setting nothing reads.
  config.lock()
  return config


def package_file(package, *parts, missing):
  """A file inside an installed (wheel-shipped) package, without importing it; `missing`
  if the package is absent (the run then stops with a one-line error naming it)."""
  return errors.installed_file(package, *parts) or missing


def pretrained_config(family, source):
  """The base for configs that start from a pretrained checkpoint ('gguf:PATH' |
  'hf:DIR'): the model family, architecture sizes 0 (the checkpoint fills them in,
  build.resolve_config), and distill_from and the data tokenizer FOLLOWING init_from,
  so `--config.train.init_from=gguf:/other.gguf` moves all three, while
  `--config.train.distill_from=` turns distillation off and changes nothing else."""
  config = get_config()
  config.model.family = family
  for key in ('vocab_size', 'num_layers', 'num_heads', 'emb_dim', 'mlp_dim', 'max_len'):
    config.model[key] = 0
  config.train.init_from = source
  follow = config.train.get_ref('init_from')
  config.train.distill_from = follow + ''  # derived references: overriding one of these
  config.data.tokenizer = follow + ''  # replaces it instead of moving init_from
  config.data.name = 'english_sample'
  config.data.crop = 'start'
  config.train.redraw_every = 0  # one feature draw for a short fine-tune
  return config
