r"""Sample from a trained Performer Zoo model.

  python sample.py --workdir=/tmp/protein_uni --prompt=MKT --num_samples=4 \
      --temperature=0.8 --top_p=0.95 --output=samples.fasta
  python sample.py --checkpoint=/tmp/img/checkpoints/5000 --prompt=8 \
      --image=cond.png --num_samples=4 --output=samples.png

The prompt depends on the model's task and data:

* protein causal LM: a residue string (BOS is prepended, generation stops at
  EOS); output is FASTA (stdout, or --output).
* other causal LMs: text, encoded with the data's vocabulary; output is text.
* image_ar: the number of image rows to condition on (0 = unconditional),
  taken from --image (a PNG of the model's image shape) or else from the
  validation split; output is one PNG with the samples side by side.

Decoding runs as one jitted loop (performer/sampling.py): FAVOR models carry
a fixed-size (S, z) state per layer, softmax models a KV cache. Bad
arguments or prompts: one line on stderr, exit status 2.
"""

import logging
import os
import sys

from absl import app, flags

from performer import errors
from performer.training import logs

_WORKDIR = flags.DEFINE_string('workdir', None, 'Training workdir (newest good checkpoint).')
_CHECKPOINT = flags.DEFINE_string(
  'checkpoint', None, 'A checkpoint step dir (workdir/checkpoints/<step>).'
)
_CONFIG = flags.DEFINE_string(
  'config', None, 'Config file, only if the workdir has no config.json (else it must match it).'
)
_PROMPT = flags.DEFINE_string('prompt', '', 'Text / residues, or image rows to condition on.')
_IMAGE = flags.DEFINE_string('image', None, 'PNG whose first --prompt rows condition images.')
_NUM_SAMPLES = flags.DEFINE_integer('num_samples', 1, 'Samples (one batch).')
_MAX_NEW = flags.DEFINE_integer('max_new_tokens', 0, 'Tokens to sample; 0 = up to max_len.')
_TEMPERATURE = flags.DEFINE_float('temperature', 1.0, 'Softmax temperature; 0 = greedy.')
_TOP_K = flags.DEFINE_integer('top_k', 0, 'Keep the k most likely tokens; 0 = off.')
_TOP_P = flags.DEFINE_float('top_p', 1.0, 'Nucleus sampling mass; 1 = off.')
_SEED = flags.DEFINE_integer('seed', 0, 'PRNG seed: the same seed gives the same samples.')
_OUTPUT = flags.DEFINE_string('output', None, 'Output file (PNG for images); default stdout.')


class UsageError(errors.UserInputError):
  """A bad argument or prompt: reported as one line, exit status 2."""


def fail(message):
  print(f'error: {" ".join(str(message).split())}', file=sys.stderr)
  sys.exit(2)


def is_protein(config):
  return config.data.name in ('protein_sample', 'fasta')


def encode_text_prompt(vocab, text, max_len):
  """BOS + encoded prompt; errors name the bad character or the length."""
  try:
    ids = list(vocab.encode(text))
  except ValueError as e:
    raise UsageError(f'--prompt: {e}') from e
  bos = getattr(vocab, 'bos_id', None)
  ids = ([bos] if bos is not None else []) + ids
  if not ids:
    raise UsageError('--prompt: empty prompt and the vocabulary has no BOS token')
  if len(ids) > max_len:
    raise UsageError(
      f'--prompt: {len(ids)} tokens (with BOS) is longer than the model max_len {max_len}'
    )
  return ids


def image_prompt(config, rows_text, num_samples, image_path):
  """(tokens [num_samples, rows*W*C] uint8-valued, rows) for image conditioning."""
  import numpy as np  # pylint: disable=g-import-not-at-top

  height, width, channels = (int(s) for s in config.model.image_shape)
  try:
    rows = int(rows_text or 0)
  except ValueError:
    raise UsageError(
      f'--prompt: for image models give the number of rows to condition '
      f'on (0..{height}), got {rows_text!r}'
    ) from None
  if not 0 <= rows < height:
    raise UsageError(
      f'--prompt: {rows} rows is outside [0, {height - 1}] for images of height {height}'
    )
  if rows == 0:
    return np.zeros((num_samples, 0), np.int32), 0
  if image_path:
    from PIL import Image  # pylint: disable=g-import-not-at-top

    errors.require_file(image_path, '--image', UsageError)
    try:
      with Image.open(image_path) as image:
        pixels = np.asarray(image)
    except OSError as e:  # PIL's UnidentifiedImageError is an OSError
      raise UsageError(
        f'--image: {image_path} is not a readable image ({e}); expected a PNG'
      ) from e
    if pixels.ndim == 2:
      pixels = pixels[..., None]
    if pixels.shape != (height, width, channels):
      raise UsageError(
        f'--image: {image_path} has shape {pixels.shape}, the model needs '
        f'{(height, width, channels)}'
      )
    flat = np.broadcast_to(pixels.reshape(1, -1), (num_samples, pixels.size))
  else:
    from performer import data  # pylint: disable=g-import-not-at-top

    try:
      batch = next(
        data.build_dataset(config.data, split='validation', batch_size=num_samples, seed=0)
      )
    except Exception as e:  # pylint: disable=broad-except
      raise UsageError(
        f'could not read conditioning images from the validation split '
        f'({type(e).__name__}: {e}); pass --image=PATH.png'
      ) from e
    flat = np.asarray(batch['tokens'])
  return np.asarray(flat[:, : rows * width * channels], np.int32), rows


def write_images(path, tokens, image_shape):
  """Samples side by side (2 px gaps) in one PNG."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top

  height, width, channels = image_shape
  images = np.asarray(tokens, np.uint8).reshape(-1, height, width, channels)
  gap = 2
  grid = np.zeros((height, len(images) * (width + gap) - gap, channels), np.uint8)
  for i, image in enumerate(images):
    grid[:, i * (width + gap) : i * (width + gap) + width] = image
  mode = {1: 'L', 3: 'RGB', 4: 'RGBA'}.get(channels)
  if mode is None:
    raise UsageError(f'cannot write {channels}-channel images as PNG')
  try:
    Image.fromarray(grid[..., 0] if channels == 1 else grid, mode=mode).save(path)
  except (OSError, ValueError) as e:  # ValueError: PIL knows no format for the file name
    raise UsageError(f'--output: cannot write {path!r} ({e})') from e


def format_fasta(sequences, header):
  lines = []
  for i, seq in enumerate(sequences):
    lines.append(f'>sample_{i} {header} length={len(seq)}')
    lines.extend(seq[j : j + 60] for j in range(0, len(seq), 60))
  return '\n'.join(lines) + '\n'


def run(workdir_or_checkpoint, config_path=None):
  """Everything after flag parsing; returns the text written (or the PNG path)."""
  import jax  # pylint: disable=g-import-not-at-top

  from performer import (
    data,  # pylint: disable=g-import-not-at-top
    sampling,  # pylint: disable=g-import-not-at-top
    tasks,  # pylint: disable=g-import-not-at-top
  )
  from performer.training import checkpoints, restore  # pylint: disable=g-import-not-at-top

  setting = '--workdir' if _WORKDIR.value else '--checkpoint'
  workdir, _ = checkpoints.locate(workdir_or_checkpoint, setting)
  if config_path:
    from performer.training import (
      build,  # pylint: disable=g-import-not-at-top
      config_utils,  # pylint: disable=g-import-not-at-top
      rundir,  # pylint: disable=g-import-not-at-top
    )

    config, _ = build.resolve_config(config_utils.validate(config_utils.load_config(config_path)))
    hint = "leave out --config: sample.py reads the run's config.json"
    rundir.check_config(config, workdir, hint, rundir.EVAL_KEYS)  # a run's config.json must agree
  else:
    config = restore.run_config(workdir)
  n = _NUM_SAMPLES.value
  if n < 1:
    raise UsageError(f'--num_samples must be >= 1, got {n}')
  sampling.check_sampling_options(_TEMPERATURE.value, _TOP_K.value, _TOP_P.value)
  # Check the prompt against the config before paying for the restore.
  samples, max_len = tasks.TASKS[config.model.task].samples, int(config.model.max_len)
  if samples == 'image':
    if not _OUTPUT.value:
      raise UsageError('image models need --output=PATH.png')
    prompt, rows = image_prompt(config, _PROMPT.value, n, _IMAGE.value)
    eos_id, pad_id = None, 0
  elif samples == 'text':
    vocab = data.vocab_for(config.data)
    ids = encode_text_prompt(vocab, _PROMPT.value, max_len)
    prompt, _ = sampling.pad_prompts([ids] * n, vocab.pad_id)
    eos_id, pad_id = getattr(vocab, 'eos_id', None), vocab.pad_id
  else:
    decodable = ' or '.join(name for name, task in tasks.TASKS.items() if task.samples)
    raise UsageError(
      f'task {config.model.task!r} is bidirectional: sampling needs a {decodable} checkpoint'
    )
  restored = restore.restore(workdir_or_checkpoint, config, setting=setting)
  model, step = restored.model(), restored.step
  max_new = _MAX_NEW.value or model.max_len - prompt.shape[1]
  if max_new < 1:
    raise UsageError(
      f'the prompt ({prompt.shape[1]} tokens) fills the model max_len '
      f'{model.max_len}; nothing left to generate'
    )
  tokens, lengths = sampling.generate(
    model,
    prompt,
    max_new_tokens=max_new,
    key=jax.random.key(_SEED.value),
    temperature=_TEMPERATURE.value,
    top_k=_TOP_K.value,
    top_p=_TOP_P.value,
    eos_id=eos_id,
    pad_id=pad_id,
  )
  tokens, lengths = jax.device_get((tokens, lengths))
  if samples == 'image':
    write_images(_OUTPUT.value, tokens, tuple(int(s) for s in config.model.image_shape))
    print(
      f'wrote {n} image(s) from step {step} (conditioned on {rows} rows) to {_OUTPUT.value}',
      file=sys.stderr,
    )
    return _OUTPUT.value
  texts = [vocab.decode(row[:length]) for row, length in zip(tokens, lengths)]
  header = (
    f'step={step} attention={config.model.attention.kind} '
    f'temperature={_TEMPERATURE.value} top_k={_TOP_K.value} top_p={_TOP_P.value} '
    f'seed={_SEED.value}'
  )
  out = format_fasta(texts, header) if is_protein(config) else '\n\n'.join(texts) + '\n'
  if _OUTPUT.value:
    try:
      with open(_OUTPUT.value, 'w', encoding='utf-8') as f:
        f.write(out)
    except OSError as e:
      raise UsageError(
        f'--output: cannot write {_OUTPUT.value!r} ({errors.os_error_text(e)})'
      ) from e
    print(f'wrote {n} sample(s) from step {step} to {_OUTPUT.value}', file=sys.stderr)
  else:
    sys.stdout.write(out)
  return out


def main(argv):
  logs.setup(logging.ERROR)  # jax's TPU probe and orbax's read-only notes are noise here
  if len(argv) > 1:
    fail(f'unexpected arguments: {" ".join(argv[1:])}')
  if bool(_WORKDIR.value) == bool(_CHECKPOINT.value):
    fail('pass exactly one of --workdir=DIR or --checkpoint=DIR/checkpoints/STEP')
  path = _WORKDIR.value or _CHECKPOINT.value
  if _MAX_NEW.value < 0:
    fail(f'--max_new_tokens: must be >= 0 (0 = up to the model max_len), got {_MAX_NEW.value}')
  if not os.path.isdir(path):
    fail(f'no such directory {path!r}')
  try:
    run(path, _CONFIG.value)
  except ValueError as e:  # errors.UserInputError (UsageError, data, checkpoints), bad prompts
    fail(e)


if __name__ == '__main__':
  app.run(main)
