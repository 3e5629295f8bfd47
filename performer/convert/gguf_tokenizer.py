"""Rebuild a `tokenizers.Tokenizer` from GGUF tokenizer metadata.

A GGUF file carries its tokenizer as arrays (`tokenizer.ggml.tokens`,
`.merges`, `.token_type`) plus a name for the pre-tokenizer regex
(`tokenizer.ggml.pre`) that llama.cpp hard-codes. We rebuild the same
byte-level BPE with the HF `tokenizers` library so text -> ids matches the
original model's tokenizer without shipping a tokenizer.json. Only
byte-level BPE ('gpt2' model) is rebuilt; the pre-tokenizers below are the
HF equivalents of llama.cpp's regex sets. Anything else fails loudly and
asks for an explicit tokenizer.json instead of tokenising differently.
Problems with the file (a tokenizer we cannot rebuild, inconsistent metadata,
a missing or garbage tokenizer.json) are ``errors.WeightsFileError``s.
"""

from __future__ import annotations

import os

from performer.convert import files
from performer.errors import WeightsFileError

# llama.cpp token types (gguf.TokenType): 3 = CONTROL, 4 = USER_DEFINED.
CONTROL, USER_DEFINED = 3, 4

# Llama-3 style split (llama.cpp 'llama-bpe'), as in Meta's tokenizer.json.
_LLAMA3_SPLIT = (
  r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|"
  r'\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+'
)


def _pre_tokenizer(pre: str):
  """HF pre-tokenizer for llama.cpp's `tokenizer.ggml.pre` name."""
  from tokenizers import Regex, pre_tokenizers  # pylint: disable=g-import-not-at-top

  byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  if pre in ('default', 'gpt-2', 'gpt2'):
    return byte_level
  if pre in ('smollm', 'starcoder', 'refact', 'codeshell'):
    # llama.cpp: "\p{N}" (single digits) then the GPT-2 regex.
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
  if pre == 'llama-bpe':
    return pre_tokenizers.Sequence(
      [
        pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior='isolated'),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
      ]
    )
  raise WeightsFileError(
    f'GGUF pre-tokenizer {pre!r} is not rebuilt here; pass tokenizer_file= '
    "with the model's tokenizer.json"
  )


def from_gguf(reader):
  """`tokenizers.Tokenizer` equivalent to the GGUF's own BPE tokenizer."""
  from tokenizers import AddedToken, Tokenizer, decoders, models, processors  # pylint: disable=g-import-not-at-top

  def field(key, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()

  kind = field('tokenizer.ggml.model')
  if kind != 'gpt2':
    raise WeightsFileError(
      f'GGUF tokenizer model {kind!r} is not rebuilt here (only byte-level '
      "BPE, 'gpt2'); pass tokenizer_file= with the model's tokenizer.json"
    )
  tokens = field('tokenizer.ggml.tokens')
  merges = field('tokenizer.ggml.merges')
  if not tokens or merges is None:
    raise WeightsFileError('GGUF file lacks tokenizer.ggml.tokens or .merges')
  types = field('tokenizer.ggml.token_type', [1] * len(tokens))
  vocab = {tok: i for i, tok in enumerate(tokens)}
  if len(vocab) != len(tokens):
    raise WeightsFileError('GGUF vocabulary has duplicate tokens')
  pairs = []
  for m in merges:
    parts = m.split(' ')
    if len(parts) != 2:
      raise WeightsFileError(f'malformed GGUF merge {m!r}')
    pairs.append(tuple(parts))
  try:
    tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs))
  except Exception as e:  # tokenizers raises a bare Exception
    raise WeightsFileError(f'GGUF tokenizer is inconsistent: {e}') from e
  tok.pre_tokenizer = _pre_tokenizer(field('tokenizer.ggml.pre', 'default'))
  tok.decoder = decoders.ByteLevel()
  special = [
    AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == CONTROL
  ]
  user = [
    AddedToken(t, special=False, normalized=False)
    for t, ty in zip(tokens, types)
    if ty == USER_DEFINED
  ]
  tok.add_special_tokens(special)
  if user:
    tok.add_tokens(user)
  bos = field('tokenizer.ggml.bos_token_id')
  if field('tokenizer.ggml.add_bos_token', False) and bos is not None:
    tok.post_processor = processors.TemplateProcessing(
      single=f'{tokens[bos]} $A',
      pair=f'{tokens[bos]} $A $B',
      special_tokens=[(tokens[bos], int(bos))],
    )
  return tok


def load_tokenizer_file(path: str | os.PathLike):
  """A tokenizers JSON file, with a WeightsFileError naming the file if it is missing
  or not one (files.load_tokenizer_json)."""
  return files.load_tokenizer_json(path)
