"""What a model learns to predict: inputs and targets per task.

The data pipeline is task-agnostic (tokens, mask, segment ids); a `Task` turns a batch into
(inputs, targets, weights) inside the jitted step, so BERT masking draws fresh masks every
step. `Task` is static and hashable: steps close over it.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


def causal_targets(batch):
  """Position t predicts token t+1 of the same segment; the last position predicts nothing."""
  tokens, mask, seg = batch['tokens'], batch['mask'], batch.get('segment_ids')
  targets = jnp.pad(tokens[:, 1:], ((0, 0), (0, 1)))
  weights = mask[:, 1:] & mask[:, :-1]
  if seg is not None:
    weights = weights & (seg[:, 1:] == seg[:, :-1])
  weights = jnp.pad(weights, ((0, 0), (0, 1)))
  return tokens, targets, weights


def mlm_targets(batch, key, *, rate, mask_id, special_ids, vocab_size, mask_all=False):
  """BERT masking: pick `rate` of the real tokens; 80% -> MASK, 10% -> random, 10% kept.

  Special tokens (PAD/BOS/EOS/MASK) are never picked, and random replacements are never
  special tokens. `mask_all` (eval) replaces every picked token by MASK: the 10% kept
  tokens would otherwise be visible answers, inflating accuracy and making the number
  incomparable with the unigram baseline.
  """
  tokens, mask = batch['tokens'], batch['mask']
  special = jnp.asarray(special_ids, jnp.int32)
  is_special = jnp.any(tokens[..., None] == special, axis=-1)
  k_pick, k_how, k_rand = jax.random.split(key, 3)
  picked = mask & ~is_special & jax.random.bernoulli(k_pick, rate, tokens.shape)
  how = jax.random.uniform(k_how, tokens.shape)
  # Sample among the non-special ids: draw an index into [0, V - n_special) and skip specials.
  normal_ids = jnp.setdiff1d(jnp.arange(vocab_size), special, size=vocab_size - len(special_ids))
  random_tokens = normal_ids[jax.random.randint(k_rand, tokens.shape, 0, normal_ids.shape[0])]
  if mask_all:
    return jnp.where(picked, mask_id, tokens).astype(tokens.dtype), tokens, picked
  inputs = jnp.where(picked & (how < 0.8), mask_id, tokens)
  inputs = jnp.where(picked & (how >= 0.8) & (how < 0.9), random_tokens, inputs)
  return inputs.astype(tokens.dtype), tokens, picked


@dataclasses.dataclass(frozen=True)
class Task:
  """Static facts about the task, the model and the vocabulary a step needs."""

  name: str  # model.task: causal_lm | mlm | image_ar | encoder
  target_offset: int  # logits[t] predict tokens[t + offset]
  vocab_size: int
  mlm_rate: float = 0.15
  mask_id: int = -1
  special_ids: tuple[int, ...] = ()

  @classmethod
  def from_config(cls, model_config, train_config, vocab, target_offset):
    ids = (getattr(vocab, name, None) for name in ('pad_id', 'bos_id', 'eos_id', 'mask_id'))
    size = int(model_config.vocab_size)
    mask_id = getattr(vocab, 'mask_id', None)
    return cls(
      name=model_config.task,
      target_offset=int(target_offset),
      vocab_size=size,
      mlm_rate=float(train_config.mlm_mask_rate),
      mask_id=int(mask_id) if mask_id is not None else -1,
      special_ids=tuple(sorted({int(i) for i in ids if i is not None and 0 <= int(i) < size})),
    )

  def targets(self, batch, key, evaluating=False):
    """(inputs, targets, weights); `key` is only used by MLM.

    logits[t] predict tokens[t+1] (causal LM: shifted here) or tokens[t] (image AR, where
    the model shifts its own input right; MLM; an encoder, whose targets are the teacher's
    hidden states and whose weights are the mask).
    """
    if self.name == 'mlm':
      return mlm_targets(
        batch,
        key,
        rate=self.mlm_rate,
        mask_id=self.mask_id,
        special_ids=self.special_ids,
        vocab_size=self.vocab_size,
        mask_all=evaluating,
      )
    if self.name != 'encoder' and self.target_offset == 1:
      return causal_targets(batch)
    return batch['tokens'], batch['tokens'], batch['mask']
