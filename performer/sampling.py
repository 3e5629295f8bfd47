"""Autoregressive generation for the causal models (causal LM, image AR).

    tokens, lengths = sampling.generate(model, prompts, prompt_lengths,
                                        max_new_tokens=64, key=jax.random.key(0),
                                        temperature=0.8, top_k=40, top_p=0.95,
                                        eos_id=vocab.eos_id)

How a batch is decoded. Prompts are left-aligned and right-padded to a common
width P (`pad_prompts` builds that from Python lists). One jitted function then

1. prefills the padded prompts with the chunked causal pass, the padding
   masked out, so each row's cache holds exactly its own prompt: FAVOR
   kinds keep (S, z) per head and layer, whatever the prompt length, and
   softmax keeps a KV cache whose padded slots are marked invalid;
2. samples each row's first token from the logits at its own last prompt
   position, and
3. runs a `lax.while_loop` over a fixed-size output buffer: one
   model call per token with the cache (a rank-1 state update per layer for FAVOR),
   each row at its own absolute position (prompt length + tokens so far),
   so rows whose prompts differ in length decode side by side with no
   re-alignment. A row that emits `eos_id` is finished and writes `pad_id`
   from then on; the loop ends when every row is finished or the buffer is
   full.

Everything except the host-side argument checks runs inside that single
`jax.jit` (the model enters as `nnx.split` pieces, so the loop is a pure
function), and the output shape depends only on (batch, P, max_new_tokens).
Randomness comes only from the caller's key: step i uses fold_in(key, i), so
a fixed key gives the same tokens on every run.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def check_sampling_options(temperature=1.0, top_k=0, top_p=1.0):
  """ValueError for options that cannot describe a distribution."""
  if not temperature >= 0:
    raise ValueError(f'temperature must be >= 0 (0 = greedy), got {temperature}')
  if int(top_k) != top_k or top_k < 0:
    raise ValueError(f'top_k must be an integer >= 0 (0 = off), got {top_k}')
  if not 0 < top_p <= 1:
    raise ValueError(f'top_p must be in (0, 1] (1 = off), got {top_p}')


def sample_logits(key, logits, *, temperature=1.0, top_k=0, top_p=1.0):
  """Token ids [B] drawn from logits [B, V].

  temperature 0 is greedy (argmax; the key is unused). Otherwise the logits
  are divided by the temperature, then restricted to the top_k largest
  (top_k > 0) and to the smallest set of most likely tokens whose
  probability reaches top_p (nucleus; the most likely token is always kept),
  and one token is drawn. The options are Python numbers (static under jit).
  """
  check_sampling_options(temperature, top_k, top_p)
  if temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits.astype(jnp.float32) / temperature
  if top_k and top_k < logits.shape[-1]:
    kth = jax.lax.top_k(logits, int(top_k))[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p < 1:
    ordered = jnp.sort(logits, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(ordered, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass of strictly likelier tokens
    keep = before < top_p  # always true for the first
    threshold = jnp.min(jnp.where(keep, ordered, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < threshold, -jnp.inf, logits)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def pad_prompts(prompts, pad_id=0):
  """List of token-id lists -> (int32 [B, P] right-padded, lengths [B])."""
  lengths = np.array([len(p) for p in prompts], np.int32)
  width = int(lengths.max()) if len(prompts) else 0
  tokens = np.full((len(prompts), width), pad_id, np.int32)
  for row, p in enumerate(prompts):
    tokens[row, : len(p)] = p
  return tokens, lengths


def check_prompts(model, prompt_tokens, prompt_lengths, max_new_tokens):
  """Host-side checks with messages that say what to change.

  Returns (tokens int32 [B, P], lengths int32 [B]) as numpy arrays.
  """
  if not getattr(model, 'causal', False):
    raise ValueError(
      f'generation needs a causal model; task {getattr(model, "task", None)!r} is bidirectional'
    )
  tokens = np.asarray(prompt_tokens)
  if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer):
    raise ValueError(
      f'prompt_tokens must be an int array [batch, length], got '
      f'shape {tokens.shape} dtype {tokens.dtype}'
    )
  batch, width = tokens.shape
  lengths = (
    np.full((batch,), width, np.int32)
    if prompt_lengths is None
    else np.asarray(prompt_lengths).astype(np.int32)
  )
  if lengths.shape != (batch,):
    raise ValueError(f'prompt_lengths must have shape ({batch},), got {lengths.shape}')
  if (lengths < 0).any() or (lengths > width).any():
    raise ValueError(f'prompt_lengths must be in [0, {width}], got {lengths.tolist()}')
  if model.start_id is None and (lengths < 1).any():
    raise ValueError(
      f'every causal_lm prompt needs at least one token (e.g. BOS); got lengths {lengths.tolist()}'
    )
  if int(max_new_tokens) != max_new_tokens or max_new_tokens < 1:
    raise ValueError(f'max_new_tokens must be a positive integer, got {max_new_tokens}')
  longest = int(lengths.max()) if batch else 0
  if longest > model.max_len:
    raise ValueError(f'prompt of {longest} tokens is longer than the model max_len {model.max_len}')
  if longest + max_new_tokens > model.max_len:
    raise ValueError(
      f'prompt of {longest} tokens + max_new_tokens {max_new_tokens} exceeds the '
      f'model max_len {model.max_len}; use max_new_tokens <= {model.max_len - longest}'
    )
  real = np.arange(width)[None, :] < lengths[:, None]
  bad = real & ((tokens < 0) | (tokens >= model.vocab_size))
  if bad.any():
    row, col = (int(i) for i in np.argwhere(bad)[0])
    raise ValueError(
      f'prompt token id {int(tokens[row, col])} at (row {row}, position '
      f'{col}) is outside the vocabulary [0, {model.vocab_size})'
    )
  return tokens.astype(np.int32), lengths


def generate(
  model,
  prompt_tokens,
  prompt_lengths=None,
  *,
  max_new_tokens: int,
  key=None,
  temperature: float = 1.0,
  top_k: int = 0,
  top_p: float = 1.0,
  eos_id: int | None = None,
  pad_id: int = 0,
):
  """Samples continuations of a batch of prompts.

  Args:
    model: a causal model of any family (causal_lm or image_ar): our
      Transformer or an imported Llama, any attention kind.
    prompt_tokens: int [B, P], each row's prompt left-aligned (tokens in the
      model's output space: sub-pixels for images, without START).
    prompt_lengths: int [B] real tokens per row (default: all P). Image
      prompts may be empty; causal_lm prompts need at least one token.
    max_new_tokens: tokens to sample per row; prompt + new must fit max_len.
    key: PRNG key (required unless temperature == 0).
    temperature, top_k, top_p: see `sample_logits`.
    eos_id: a row stops after emitting it (it is kept in the output).
    pad_id: written after a row's end.
  Returns:
    (tokens int32 [B, P + max_new_tokens], lengths int32 [B]): row b is its
    prompt, then its samples, then pad_id from lengths[b] on.
  """
  check_sampling_options(temperature, top_k, top_p)
  tokens, lengths = check_prompts(model, prompt_tokens, prompt_lengths, max_new_tokens)
  if key is None:
    if temperature != 0:
      raise ValueError('sampling with temperature > 0 needs a PRNG key: pass key=')
    key = jax.random.key(0)
  graphdef, state = nnx.split(model)
  # eos_id and pad_id are traced (-1 never matches a token), so changing them
  # does not recompile; the sampling options and the length are static.
  return _generate(
    graphdef,
    state,
    jnp.asarray(tokens),
    jnp.asarray(lengths),
    key,
    jnp.asarray(-1 if eos_id is None else eos_id, jnp.int32),
    jnp.asarray(pad_id, jnp.int32),
    max_new_tokens=int(max_new_tokens),
    temperature=float(temperature),
    top_k=int(top_k),
    top_p=float(top_p),
  )


@functools.partial(
  jax.jit, static_argnames=('graphdef', 'max_new_tokens', 'temperature', 'top_k', 'top_p')
)
def _generate(
  graphdef,
  state,
  tokens,
  lengths,
  key,
  eos_id,
  pad_id,
  *,
  max_new_tokens,
  temperature,
  top_k,
  top_p,
):
  model = nnx.merge(graphdef, state)
  batch, width = tokens.shape
  rows = jnp.arange(batch)
  inputs = model.decode_inputs(tokens)  # START-prefixed for images
  input_lengths = lengths + (inputs.shape[1] - width)
  mask = jnp.arange(inputs.shape[1])[None, :] < input_lengths[:, None]
  # Prefill uses inputs.shape[1] slots, the loop max_new_tokens - 1 more.
  cache = model.init_cache(batch, inputs.shape[1] + max_new_tokens)
  logits, cache = model(inputs, mask=mask, cache=cache)
  logits = logits[rows, input_lengths - 1]
  out = jnp.full((batch, width + max_new_tokens), pad_id, jnp.int32)
  in_prompt = jnp.arange(width)[None, :] < lengths[:, None]
  out = out.at[:, :width].set(jnp.where(in_prompt, tokens, pad_id))
  sample = functools.partial(sample_logits, temperature=temperature, top_k=top_k, top_p=top_p)

  def emit(i, logits, out, done, count):
    """Samples token i of every row and writes it after that row's prompt."""
    tok = jnp.where(done, pad_id, sample(jax.random.fold_in(key, i), logits))
    out = out.at[rows, lengths + i].set(tok)
    count = count + (~done).astype(jnp.int32)
    done = done | (tok == eos_id)
    return tok, out, done, count

  done = jnp.zeros((batch,), bool)
  tok, out, done, count = emit(0, logits, out, done, jnp.zeros((batch,), jnp.int32))

  def cond(carry):
    i, _, _, _, done, _ = carry
    return (i < max_new_tokens) & ~jnp.all(done)

  def body(carry):
    i, tok, cache, out, done, count = carry
    logits, cache = model(tok[:, None], cache=cache)
    tok, out, done, count = emit(i, logits[:, 0], out, done, count)
    return i + 1, tok, cache, out, done, count

  carry = (jnp.asarray(1, jnp.int32), tok, cache, out, done, count)
  _, _, _, out, _, count = jax.lax.while_loop(cond, body, carry)
  return out, lengths + count
