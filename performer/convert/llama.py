"""Import Llama-family checkpoints (HF safetensors or llama.cpp GGUF).

    model, tokenizer, config = import_llama_gguf('SmolLM2-135M-Instruct.Q4_1.gguf')
    model, tokenizer, config = import_llama_safetensors('path/to/hf_llama_dir')
    model = llama_from_tensors(tensors, config)              # in-memory HF-named dict

`config` is the family's `models.ModelConfig` (family 'llama'). The family
contract for `train.py --config.train.init_from=gguf:PATH|hf:DIR` is
`read_config`, `load` and `load_tokenizer` (see convert/pretrained.py).

Both formats go through one table, `LAYER_ROLES`, that names each weight
in both conventions (HF and GGUF) together with our parameter path and
whether it is transposed, so the two importers cannot drift apart and every
error names the key as it is spelled in the user's file.

GGUF specifics handled here:
* quantised tensors (Q4_1, Q8_0, ...) are dequantised to float32 with the
  `gguf` package; numpy shapes come out as torch's [out, in];
* llama.cpp's converter permutes the rows of q and k so that its RoPE can
  rotate *adjacent* pairs; our RoPE (like HF) rotates halves, so the
  permutation is undone (`unpermute_rope`), per kv head for k;
* hyperparameters come from the `llama.*` metadata and the tokenizer from
  `tokenizer.ggml.*` (a byte-level BPE rebuilt with `tokenizers`);
* no `output.weight` tensor means the head is tied to the embedding.
"""

from __future__ import annotations

import os

import numpy as np
from flax import nnx

from performer import models
from performer.convert import files, gguf_tokenizer
from performer.convert.keymap import Entry, apply_keymap

# Global tensors: role -> (HF key, GGUF key, our path, transpose).
GLOBAL_ROLES = {
  'embed': ('model.embed_tokens.weight', 'token_embd.weight', 'embed.embedding', False),
  'norm': ('model.norm.weight', 'output_norm.weight', 'final_norm.scale', False),
  'head': ('lm_head.weight', 'output.weight', 'head.kernel', True),
}
# Per-layer tensors: (HF suffix after 'model.layers.{i}.', GGUF suffix after
# 'blk.{i}.', our suffix after 'layers.{i}.', transpose).
LAYER_ROLES = (
  ('input_layernorm.weight', 'attn_norm.weight', 'attn_norm.scale', False),
  ('self_attn.q_proj.weight', 'attn_q.weight', 'attn.query.kernel', True),
  ('self_attn.k_proj.weight', 'attn_k.weight', 'attn.key.kernel', True),
  ('self_attn.v_proj.weight', 'attn_v.weight', 'attn.value.kernel', True),
  ('self_attn.o_proj.weight', 'attn_output.weight', 'attn.out.kernel', True),
  ('post_attention_layernorm.weight', 'ffn_norm.weight', 'mlp_norm.scale', False),
  ('mlp.gate_proj.weight', 'ffn_gate.weight', 'mlp.gate.kernel', True),
  ('mlp.up_proj.weight', 'ffn_up.weight', 'mlp.up.kernel', True),
  ('mlp.down_proj.weight', 'ffn_down.weight', 'mlp.down.kernel', True),
)
FORMATS = ('hf', 'gguf')


def _layer_shapes(cfg: models.ModelConfig) -> dict[str, tuple]:
  """Checkpoint (torch [out, in]) shape of each per-layer weight, by our suffix."""
  d, f, hd = cfg.emb_dim, cfg.mlp_dim, cfg.head_dim
  q, kv = cfg.num_heads * hd, cfg.num_kv_heads * hd
  return {
    'attn_norm.scale': (d,),
    'attn.query.kernel': (q, d),
    'attn.key.kernel': (kv, d),
    'attn.value.kernel': (kv, d),
    'attn.out.kernel': (d, q),
    'mlp_norm.scale': (d,),
    'mlp.gate.kernel': (f, d),
    'mlp.up.kernel': (f, d),
    'mlp.down.kernel': (d, f),
  }


def llama_keymap(cfg: models.ModelConfig, fmt: str = 'hf') -> list[Entry]:
  """The full explicit map for `cfg` in naming convention `fmt` ('hf'|'gguf')."""
  if fmt not in FORMATS:
    raise ValueError(f'unknown format {fmt!r}; valid: {FORMATS}')
  col = FORMATS.index(fmt)
  shapes = _layer_shapes(cfg)
  globals_ = {
    'embed': (cfg.vocab_size, cfg.emb_dim),
    'norm': (cfg.emb_dim,),
    'head': (cfg.vocab_size, cfg.emb_dim),
  }
  entries = []
  for role, shape in globals_.items():
    if role == 'head' and cfg.tie_embeddings:
      continue
    row = GLOBAL_ROLES[role]
    entries.append(Entry(row[col], row[2], shape, row[3]))
  for i in range(cfg.num_layers):
    for row in LAYER_ROLES:
      prefix = f'model.layers.{i}.' if fmt == 'hf' else f'blk.{i}.'
      entries.append(Entry(prefix + row[col], f'layers.{i}.{row[2]}', shapes[row[2]], row[3]))
  return entries


def llama_config(
  fields: dict,
  attention_kind='softmax',
  *,
  dtype='float32',
  per_head_features=False,
  **attention_opts,
) -> models.ModelConfig:
  """The family's ModelConfig from checkpoint `fields` and the attention to run."""
  attention = dict(attention_opts, kind=attention_kind, per_head_features=per_head_features)
  return models.model_config(dict(fields, family='llama', dtype=dtype, attention=attention))


def llama_from_tensors(
  tensors,
  cfg: models.ModelConfig,
  *,
  fmt: str = 'hf',
  ignore=(),
  seed: int = 0,
  what: str = 'Llama checkpoint',
):
  """Build a model of `cfg` and load a name -> numpy dict (HF or GGUF names,
  GGUF already dequantised and un-permuted) into it."""
  model = models.build_model(cfg, rngs=nnx.Rngs(params=seed, dropout=seed + 1))
  return apply_keymap(model, tensors, llama_keymap(cfg, fmt), ignore, what=what)


# --- HF safetensors ----------------------------------------------------------


def config_from_hf(hf: dict) -> dict:
  """Model config fields from an HF config.json dict; refuses features we lack."""
  if hf.get('model_type', 'llama') != 'llama':
    raise ValueError(f'config model_type is {hf.get("model_type")!r}, not "llama"')
  for key, ok in (
    ('rope_scaling', None),
    ('attention_bias', False),
    ('mlp_bias', False),
    ('hidden_act', 'silu'),
  ):
    if hf.get(key, ok) != ok:
      raise ValueError(f'{key}={hf[key]!r} is not supported (only {ok!r})')
  kw = dict(
    vocab_size=hf['vocab_size'],
    num_layers=hf['num_hidden_layers'],
    num_heads=hf['num_attention_heads'],
    num_kv_heads=hf.get('num_key_value_heads') or hf['num_attention_heads'],
    emb_dim=hf['hidden_size'],
    mlp_dim=hf['intermediate_size'],
    head_dim=hf.get('head_dim') or 0,
    max_len=hf.get('max_position_embeddings', 2048),
    rope_theta=float(hf.get('rope_theta', 10000.0)),
    norm_eps=float(hf.get('rms_norm_eps', 1e-6)),
    tie_embeddings=bool(hf.get('tie_word_embeddings', False)),
  )
  return kw


def _hf_ignore(tensors, cfg):
  """Known non-weights: RoPE inv_freq buffers (old checkpoints), and a
  stored lm_head that merely repeats the tied embedding."""
  ignore = [f'model.layers.{i}.self_attn.rotary_emb.inv_freq' for i in range(cfg.num_layers)]
  if cfg.tie_embeddings and 'lm_head.weight' in tensors:
    emb = tensors.get('model.embed_tokens.weight')
    if emb is None or not np.array_equal(emb, tensors['lm_head.weight']):
      raise ValueError(
        'tie_word_embeddings is true but lm_head.weight differs from model.embed_tokens.weight'
      )
    ignore.append('lm_head.weight')
  return ignore


def import_llama_safetensors(
  path_or_dir,
  attention_kind: str = 'softmax',
  *,
  dtype: str = 'float32',
  per_head_features=False,
  seed: int = 0,
  **attention_opts,
):
  """HF Llama directory (config.json, model.safetensors or shards, optional
  tokenizer.json) -> (model, tokenizer or None, ModelConfig)."""
  tensors = files.read_safetensors(path_or_dir)
  folder = files.checkpoint_dir(path_or_dir)
  hf = files.read_json(os.path.join(folder, 'config.json'), 'Llama config')
  cfg = llama_config(
    config_from_hf(hf),
    attention_kind,
    dtype=dtype,
    per_head_features=per_head_features,
    **attention_opts,
  )
  model = llama_from_tensors(
    tensors, cfg, ignore=_hf_ignore(tensors, cfg), seed=seed, what=f'Llama checkpoint {path_or_dir}'
  )
  tok_path = os.path.join(folder, 'tokenizer.json')
  tokenizer = gguf_tokenizer.load_tokenizer_file(tok_path) if os.path.exists(tok_path) else None
  return model, tokenizer, cfg


# --- GGUF ------------------------------------------------------------------------


def unpermute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
  """Inverse of llama.cpp convert_hf_to_gguf's `permute` for q/k rows.

  The converter reorders each head's rows from [first half, second half]
  (rotate-half RoPE) to interleaved pairs (adjacent-pair RoPE):
  reshape(n_head, 2, hd/2, in).swapaxes(1, 2). Swapping back restores HF's
  layout, which is what `positions.apply_rope` expects.
  """
  rows = w.shape[0]
  return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _reader(path):
  """A GGUFReader for `path`; WeightsFileError for a missing, wrong or damaged file."""
  return files.open_gguf(path)


def _field(reader, key, default=None):
  field = reader.fields.get(key)
  return default if field is None else field.contents()


def config_from_gguf(reader, tensor_names) -> dict:
  """Model config fields from GGUF metadata (`llama.*` keys)."""
  arch = _field(reader, 'general.architecture')
  if arch != 'llama':
    raise ValueError(f'GGUF architecture is {arch!r}, not "llama"')
  get = lambda k, d=None: _field(reader, f'llama.{k}', d)
  required = ('block_count', 'embedding_length', 'feed_forward_length', 'attention.head_count')
  missing = [f'llama.{k}' for k in required if get(k) is None]
  if missing:
    raise ValueError(f'GGUF metadata lacks {missing}')
  scaling = get('rope.scaling.type', 'none')
  if scaling not in ('none', None):
    raise ValueError(f'llama.rope.scaling.type={scaling!r} is not supported')
  heads = int(get('attention.head_count'))
  emb = int(get('embedding_length'))
  head_dim = get('attention.key_length')
  head_dim = int(head_dim) if head_dim is not None else None
  rot = get('rope.dimension_count')
  if rot is not None and int(rot) != (head_dim or emb // heads):
    raise ValueError(f'partial rotary (llama.rope.dimension_count={rot}) is not supported')
  vocab = get('vocab_size')
  if vocab is None:
    vocab = len(_field(reader, 'tokenizer.ggml.tokens', []))
  kw = dict(
    vocab_size=int(vocab),
    num_layers=int(get('block_count')),
    num_heads=heads,
    num_kv_heads=int(get('attention.head_count_kv', heads)),
    emb_dim=emb,
    mlp_dim=int(get('feed_forward_length')),
    head_dim=head_dim or 0,
    max_len=int(get('context_length', 2048)),
    rope_theta=float(get('rope.freq_base', 10000.0)),
    norm_eps=float(get('attention.layer_norm_rms_epsilon', 1e-5)),
    tie_embeddings='output.weight' not in tensor_names,
  )
  return kw


def read_gguf_tensors(reader, cfg: models.ModelConfig) -> dict[str, np.ndarray]:
  """Every tensor dequantised to float32 [out, in], q/k rows un-permuted.

  Tensors with an unexpected shape are left alone (not un-permuted) so the
  key map reports them by name instead of a reshape error here.
  """
  import gguf  # pylint: disable=g-import-not-at-top

  hd = cfg.head_dim
  out = {}
  for t in reader.tensors:
    arr = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32)
    name = t.name
    if name.endswith('.attn_q.weight') and arr.shape == (cfg.num_heads * hd, cfg.emb_dim):
      arr = unpermute_rope(arr, cfg.num_heads)
    elif name.endswith('.attn_k.weight') and arr.shape == (cfg.num_kv_heads * hd, cfg.emb_dim):
      arr = unpermute_rope(arr, cfg.num_kv_heads)
    out[name] = arr
  return out


def import_llama_gguf(
  path,
  attention_kind: str = 'softmax',
  *,
  dtype: str = 'float32',
  per_head_features=False,
  seed: int = 0,
  tokenizer_file: str | None = None,
  **attention_opts,
):
  """llama.cpp GGUF file -> (model, tokenizer, ModelConfig).

  tokenizer: a `tokenizers.Tokenizer` rebuilt from the GGUF metadata (or
  loaded from `tokenizer_file` when given, e.g. for SentencePiece GGUFs,
  which are not rebuilt here).
  """
  reader = _reader(path)
  names = [t.name for t in reader.tensors]
  cfg = llama_config(
    config_from_gguf(reader, names),
    attention_kind,
    dtype=dtype,
    per_head_features=per_head_features,
    **attention_opts,
  )
  tensors = read_gguf_tensors(reader, cfg)
  model = llama_from_tensors(tensors, cfg, fmt='gguf', seed=seed, what=f'GGUF file {path}')
  tokenizer = (
    gguf_tokenizer.load_tokenizer_file(tokenizer_file)
    if tokenizer_file
    else gguf_tokenizer.from_gguf(reader)
  )
  return model, tokenizer, cfg


# --- The family contract (convert/pretrained.py) ------------------------------------


def read_config(fmt: str, path: str) -> dict:
  """Architecture fields of the checkpoint, from its metadata only."""
  if fmt == 'gguf':
    reader = _reader(path)
    return config_from_gguf(reader, [t.name for t in reader.tensors])
  return config_from_hf(files.read_json(os.path.join(path, 'config.json'), 'Llama config'))


def load(model, fmt: str, path: str) -> None:
  """Writes the checkpoint's weights into `model` (built from read_config's fields)."""
  cfg = model.config
  if fmt == 'gguf':
    tensors = read_gguf_tensors(_reader(path), cfg)
    apply_keymap(model, tensors, llama_keymap(cfg, 'gguf'), what=f'GGUF file {path}')
  else:
    tensors = files.read_safetensors(path)
    apply_keymap(
      model, tensors, llama_keymap(cfg), _hf_ignore(tensors, cfg), what=f'Llama checkpoint {path}'
    )


def load_tokenizer(fmt: str, path: str):
  """The checkpoint's own tokenizer (`tokenizers.Tokenizer`) and its special ids."""
  if fmt == 'gguf':
    reader = _reader(path)
    special = {
      name: _field(reader, f'tokenizer.ggml.{name}_token_id') for name in ('bos', 'eos', 'padding')
    }
    special['add_bos'] = bool(_field(reader, 'tokenizer.ggml.add_bos_token', False))
    return gguf_tokenizer.from_gguf(reader), special
  tok_path = os.path.join(path, 'tokenizer.json')
  hf = files.read_json(os.path.join(path, 'config.json'), 'Llama config')
  tok_config = os.path.join(path, 'tokenizer_config.json')
  add_bos = os.path.exists(tok_config) and files.read_json(tok_config, 'tokenizer config').get(
    'add_bos_token', False
  )
  special = {
    'bos': hf.get('bos_token_id'),
    'eos': hf.get('eos_token_id'),
    'padding': hf.get('pad_token_id'),
    'add_bos': bool(add_bos),
  }
  return gguf_tokenizer.load_tokenizer_file(tok_path), special
