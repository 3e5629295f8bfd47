"""Import HF BERT checkpoints (safetensors + tokenizer.json) into `BertEncoder`.

    model, tokenizer, config = import_bert('path/to/all-MiniLM-L6-v2')
    enc = tokenizer.encode_batch(['A sentence.', 'Another one.'])
    tokens = np.array([e.ids for e in enc]); mask = np.array([e.attention_mask for e in enc], bool)
    emb = bert.sentence_embedding(model(tokens, mask=mask), mask)

`attention_kind='favor_softmax'` (or any `attention.KINDS`) loads the same
weights into a Performer: attention parameters are identical across kinds.
The map below is the whole contract with the checkpoint: HF `BertModel`
names (no `bert.` prefix, i.e. what `save_pretrained` of a BertModel or a
sentence-transformers model writes).
"""

from __future__ import annotations

import os

from flax import nnx

from performer.convert import files
from performer.convert.keymap import Entry, apply_keymap
from performer.models import bert as bert_lib

# Checkpoint keys that are known and deliberately not loaded: HF registers
# position_ids as a (persistent, in older versions) buffer; it is arange().
IGNORE = ('embeddings.position_ids',)

# Per-layer map: HF suffix -> (our suffix, transpose). Linear weights are
# torch [out, in] (transpose); attention kernels additionally split or merge
# the head axis, which the shape in `bert_keymap` spells out.
LAYER_MAP = (
  ('attention.self.query.weight', 'attn.query.kernel', True),
  ('attention.self.query.bias', 'attn.query.bias', False),
  ('attention.self.key.weight', 'attn.key.kernel', True),
  ('attention.self.key.bias', 'attn.key.bias', False),
  ('attention.self.value.weight', 'attn.value.kernel', True),
  ('attention.self.value.bias', 'attn.value.bias', False),
  ('attention.output.dense.weight', 'attn.out.kernel', True),
  ('attention.output.dense.bias', 'attn.out.bias', False),
  ('attention.output.LayerNorm.weight', 'attn_norm.scale', False),
  ('attention.output.LayerNorm.bias', 'attn_norm.bias', False),
  ('intermediate.dense.weight', 'mlp.up.kernel', True),
  ('intermediate.dense.bias', 'mlp.up.bias', False),
  ('output.dense.weight', 'mlp.down.kernel', True),
  ('output.dense.bias', 'mlp.down.bias', False),
  ('output.LayerNorm.weight', 'mlp_norm.scale', False),
  ('output.LayerNorm.bias', 'mlp_norm.bias', False),
)


def bert_keymap(cfg: bert_lib.BertConfig) -> list[Entry]:
  """Every HF BertModel tensor of `cfg`, with its expected HF shape."""
  d, f = cfg.emb_dim, cfg.mlp_dim
  shapes = {  # HF shape of each per-layer tensor (torch layout)
    'attention.self.query.weight': (d, d),
    'attention.self.key.weight': (d, d),
    'attention.self.value.weight': (d, d),
    'attention.output.dense.weight': (d, d),
    'intermediate.dense.weight': (f, d),
    'intermediate.dense.bias': (f,),
    'output.dense.weight': (d, f),
  }
  entries = [
    Entry('embeddings.word_embeddings.weight', 'word_embed.embedding', (cfg.vocab_size, d)),
    Entry('embeddings.position_embeddings.weight', 'pos_embed.embedding', (cfg.max_len, d)),
    Entry(
      'embeddings.token_type_embeddings.weight', 'type_embed.embedding', (cfg.type_vocab_size, d)
    ),
    Entry('embeddings.LayerNorm.weight', 'embed_norm.scale', (d,)),
    Entry('embeddings.LayerNorm.bias', 'embed_norm.bias', (d,)),
  ]
  for i in range(cfg.num_layers):
    for src, dst, transpose in LAYER_MAP:
      entries.append(
        Entry(f'encoder.layer.{i}.{src}', f'layers.{i}.{dst}', shapes.get(src, (d,)), transpose)
      )
  if cfg.pooler:
    entries += [
      Entry('pooler.dense.weight', 'pooler.kernel', (d, d), True),
      Entry('pooler.dense.bias', 'pooler.bias', (d,)),
    ]
  return entries


def load_tokenizer(path: str, max_length: int | None = None):
  """`tokenizers.Tokenizer` from tokenizer.json, padding to the longest in a
  batch and truncating at `max_length` (the file's own fixed-128 padding
  would waste compute and differs from sentence-transformers)."""
  from tokenizers import Tokenizer  # pylint: disable=g-import-not-at-top

  if not os.path.exists(path):
    raise FileNotFoundError(f'tokenizer not found: {path}')
  try:
    tok = Tokenizer.from_file(path)
  except Exception as e:  # tokenizers raises a bare Exception
    raise ValueError(f'{path} is not a tokenizers JSON file: {e}') from e
  tok.no_padding()
  pad = tok.token_to_id('[PAD]')
  tok.enable_padding(pad_id=0 if pad is None else pad, pad_token='[PAD]')
  if max_length:
    tok.enable_truncation(max_length=max_length)
  else:
    tok.no_truncation()
  return tok


def import_bert(
  path_or_dir,
  attention_kind: str = 'softmax',
  *,
  pooler: bool | None = None,
  dtype: str = 'float32',
  dropout_rate: float = 0.0,
  per_head_features: bool = False,
  seed: int = 0,
  **attention_opts,
):
  """Load an HF BERT checkpoint into a `BertEncoder` of any attention kind.

  path_or_dir: a directory with config.json, model.safetensors (or shards)
  and tokenizer.json, or the .safetensors file inside such a directory.
  pooler: None follows the checkpoint (HF BertModel may be saved with or
  without its pooling layer); True/False insists. `seed` only draws the
  random features of FAVOR kinds. Returns (model, tokenizer, config) where
  tokenizer is a `tokenizers.Tokenizer` (None if the directory has no
  tokenizer.json) and config the `BertConfig`.

  Raises ValueError for a non-safetensors file, an unsupported config, or
  any missing / unused / wrong-shaped tensor (all listed by name).
  """
  tensors = files.read_safetensors(path_or_dir)
  folder = files.checkpoint_dir(path_or_dir)
  hf = files.read_json(os.path.join(folder, 'config.json'), 'BERT config')
  if hf.get('model_type', 'bert') != 'bert':
    raise ValueError(f'config model_type is {hf.get("model_type")!r}, not "bert"')
  if pooler is None:
    pooler = 'pooler.dense.weight' in tensors
  cfg = bert_lib.BertConfig.from_hf(
    hf,
    pooler=pooler,
    dtype=dtype,
    dropout_rate=dropout_rate,
    attention_kind=attention_kind,
    per_head_features=per_head_features,
    attention_options=tuple(sorted(attention_opts.items())),
  )
  model = bert_lib.BertEncoder(cfg, rngs=nnx.Rngs(params=seed, dropout=seed + 1))
  apply_keymap(model, tensors, bert_keymap(cfg), IGNORE, what=f'BERT checkpoint {path_or_dir}')
  tok_path = os.path.join(folder, 'tokenizer.json')
  max_length = cfg.max_len
  st = os.path.join(folder, 'sentence_bert_config.json')
  if os.path.exists(st):  # sentence-transformers' own truncation length
    max_length = files.read_json(st, 'sentence-transformers config').get(
      'max_seq_length', max_length
    )
  tokenizer = load_tokenizer(tok_path, max_length) if os.path.exists(tok_path) else None
  return model, tokenizer, cfg
