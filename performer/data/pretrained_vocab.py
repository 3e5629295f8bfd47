"""A pretrained model's own tokenizer as a data vocabulary (`config.data.tokenizer`).

    --config.data.name=text --config.data.path=corpus.txt \
    --config.data.tokenizer=gguf:/models/SmolLM2-135M-Instruct.Q4_1.gguf

Fine-tuning an imported model only makes sense on the ids it was trained on, so
the text pipeline encodes with the checkpoint's tokenizer (byte-level BPE rebuilt
from GGUF metadata, or the directory's tokenizer.json) instead of training a
sentencepiece model. Examples are `[BOS] + ids + [EOS]`, BOS only where the
model's tokenizer adds one (BERT's [CLS]; not SmolLM2), EOS always, so the
model learns where a line ends.
"""

from __future__ import annotations

import numpy as np


class PretrainedVocab:
  """The vocab object of the data contract over a `tokenizers.Tokenizer`."""

  num_special = 0  # special ids are scattered, not a prefix; see `special_ids`
  mask_id = None

  def __init__(self, source: str, cache_prefix: str):
    from performer.convert import pretrained  # pylint: disable=g-import-not-at-top

    pre = pretrained.open_pretrained(source)
    self._tok, special = pretrained.load_tokenizer(pre)
    self._tok.no_padding()
    self._tok.no_truncation()
    self.source = source
    self.size = int(self._tok.get_vocab_size(with_added_tokens=True))
    self.bos_id = special.get('bos') if special.get('add_bos') else None
    self.eos_id = special.get('eos')
    pad = special.get('padding')
    self.pad_id = int(pad if pad is not None else (self.eos_id or 0))
    # Word-count caches live next to the data, named after the checkpoint.
    self.path = f'{cache_prefix}.{pre.fmt}-{pre.path.rstrip("/").rsplit("/", 1)[-1]}'

  def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
    ids = self._tok.encode(text, add_special_tokens=False).ids
    bos = [self.bos_id] if add_bos and self.bos_id is not None else []
    eos = [self.eos_id] if add_eos and self.eos_id is not None else []
    return bos + ids + eos

  def encode_example(self, text: str | bytes) -> np.ndarray:
    if isinstance(text, bytes):
      text = text.decode('utf-8')
    return np.asarray(self.encode(text, add_bos=True, add_eos=True), np.int32)

  def decode(self, ids) -> str:
    ids = np.asarray(ids if hasattr(ids, 'shape') else list(ids), np.int64).ravel().tolist()
    bad = [i for i in ids if not 0 <= i < self.size]
    if bad:
      raise ValueError(f'token id {bad[0]} is outside the vocabulary [0, {self.size})')
    return self._tok.decode(ids, skip_special_tokens=True)

  def __repr__(self):
    return f'PretrainedVocab(size={self.size}, source={self.source!r})'
