"""Import HF BERT checkpoints (safetensors + tokenizer.json) into `BertEncoder`.

    model, tokenizer, config = import_bert('path/to/all-MiniLM-L6-v2')
    enc = tokenizer.encode_batch(['A sentence.', 'Another one.'])
    tokens = np.array([e.ids for e in enc]); mask = np.array([e.attention_mask for e in enc], bool)
    hidden, _ = model(tokens, mask=mask)
    emb = bert.sentence_embedding(hidden, mask)

`attention_kind='favor_softmax'` (or any `attention.KINDS`) loads the same
weights into a Performer: attention parameters are identical across kinds.
The map below is the whole contract with the checkpoint: HF `BertModel`
names (no `bert.` prefix, i.e. what `save_pretrained` of a BertModel or a
sentence-transformers model writes).
"""

from __future__ import annotations

import os

from flax import nnx

from performer import models
from performer.convert import files
from performer.convert.keymap import Entry, apply_keymap

# Checkpoint keys that are known and deliberately not loaded: HF registers
# position_ids as a (persistent, in older versions) buffer; it is arange().
IGNORE = ('embeddings.position_ids',)
POOLER = ('pooler.dense.weight', 'pooler.dense.bias')


def _ignore(tensors, cfg):
  """Known keys not loaded; a pooler the model was built without (pooler=False)."""
  return IGNORE + (() if cfg.pooler else tuple(k for k in POOLER if k in tensors))


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


def config_from_hf(hf: dict) -> dict:
  """Model config fields from an HF `config.json` dict; rejects what this encoder
  cannot do."""
  if hf.get('model_type', 'bert') != 'bert':
    raise ValueError(f'config model_type is {hf.get("model_type")!r}, not "bert"')
  act = hf.get('hidden_act', 'gelu')
  if act != 'gelu':
    raise ValueError(f'hidden_act {act!r} is not supported (only exact "gelu")')
  pos = hf.get('position_embedding_type', 'absolute')
  if pos != 'absolute':
    raise ValueError(f'position_embedding_type {pos!r} is not supported')
  return dict(
    vocab_size=hf['vocab_size'],
    num_layers=hf['num_hidden_layers'],
    num_heads=hf['num_attention_heads'],
    emb_dim=hf['hidden_size'],
    mlp_dim=hf['intermediate_size'],
    max_len=hf.get('max_position_embeddings', 512),
    type_vocab_size=hf.get('type_vocab_size', 2),
    norm_eps=hf.get('layer_norm_eps', 1e-12),
  )


def bert_config(
  fields: dict, attention_kind='softmax', *, dtype='float32', per_head_features=False, **options
) -> models.ModelConfig:
  """The family's ModelConfig from checkpoint `fields` and the attention to run."""
  attention = dict(options, kind=attention_kind, per_head_features=per_head_features)
  return models.model_config(dict(fields, family='bert', dtype=dtype, attention=attention))


def bert_keymap(cfg: models.ModelConfig) -> list[Entry]:
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


def load_tokenizer_file(path: str, max_length: int | None = None):
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
  tokenizer.json) and config the family's `models.ModelConfig`.

  Raises ValueError for a non-safetensors file, an unsupported config, or
  any missing / unused / wrong-shaped tensor (all listed by name).
  """
  tensors = files.read_safetensors(path_or_dir)
  folder = files.checkpoint_dir(path_or_dir)
  fields = config_from_hf(files.read_json(os.path.join(folder, 'config.json'), 'BERT config'))
  fields['pooler'] = 'pooler.dense.weight' in tensors if pooler is None else pooler
  cfg = bert_config(
    dict(fields, dropout_rate=dropout_rate),
    attention_kind,
    dtype=dtype,
    per_head_features=per_head_features,
    **attention_opts,
  )
  model = models.build_model(cfg, rngs=nnx.Rngs(params=seed, dropout=seed + 1))
  apply_keymap(
    model, tensors, bert_keymap(cfg), _ignore(tensors, cfg), what=f'BERT checkpoint {path_or_dir}'
  )
  tok_path = os.path.join(folder, 'tokenizer.json')
  max_length = cfg.max_len
  st = os.path.join(folder, 'sentence_bert_config.json')
  if os.path.exists(st):  # sentence-transformers' own truncation length
    max_length = files.read_json(st, 'sentence-transformers config').get(
      'max_seq_length', max_length
    )
  tokenizer = load_tokenizer_file(tok_path, max_length) if os.path.exists(tok_path) else None
  return model, tokenizer, cfg


# --- The family contract (convert/pretrained.py) ------------------------------------


def _tensor_names(path):
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top

  names = []
  for file in files.safetensors_files(path):
    with safe_open(file, 'np') as f:
      names.extend(f.keys())
  return names


def read_config(fmt: str, path: str) -> dict:
  """Architecture fields of an HF BERT directory, from config.json and tensor names."""
  if fmt != 'hf':
    raise ValueError(f'BERT checkpoints are read from HF directories (hf:DIR), not {fmt}')
  fields = config_from_hf(files.read_json(os.path.join(path, 'config.json'), 'BERT config'))
  fields['pooler'] = 'pooler.dense.weight' in _tensor_names(path)
  return fields


def load(model, fmt: str, path: str) -> None:
  """Writes the checkpoint's weights into `model` (built from read_config's fields)."""
  tensors = files.read_safetensors(path)
  cfg = model.config
  apply_keymap(
    model, tensors, bert_keymap(cfg), _ignore(tensors, cfg), what=f'BERT checkpoint {path}'
  )


def load_tokenizer(fmt: str, path: str):
  """The checkpoint's WordPiece tokenizer and its special ids ([CLS] opens, [SEP] ends)."""
  tok = load_tokenizer_file(os.path.join(path, 'tokenizer.json'))
  special = {
    'bos': tok.token_to_id('[CLS]'),
    'eos': tok.token_to_id('[SEP]'),
    'padding': tok.token_to_id('[PAD]'),
    'add_bos': True,
  }
  return tok, special
