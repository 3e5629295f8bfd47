"""Real English sentences that ship with Python: `data.name='english_sample'`.

The stdlib's `pydoc_data.topics` holds the language reference as prose (959
sentences, 17k words pass the filter below), so a text model can be fine-tuned and evaluated
offline, with no download: the default data of the imported-model configs
(configs/smollm2_favor.py, configs/minilm_favor.py). The sentences are written
once, one per line, to a cache file that the ordinary text pipeline (text.py)
then reads, splits 90/5/5 by hash and tokenises.
"""

from __future__ import annotations

import os
import re
import tempfile


def english_sentences(min_words: int = 8, max_words: int = 40) -> list[str]:
  """Sentences of prose (no grammar rules, code samples or headings), in a fixed order."""
  from pydoc_data import topics  # pylint: disable=g-import-not-at-top

  out = []
  for name in sorted(topics.topics):
    for para in topics.topics[name].split('\n\n'):
      if '::=' in para or para.startswith(' ') or '*' in para:
        continue
      for sent in re.split(r'(?<=[.!?])\s+', ' '.join(para.split())):
        if min_words <= len(sent.split()) <= max_words and sent[0].isupper() and sent.endswith('.'):
          out.append(sent)
  return out


def sample_path() -> str:
  """The cached file of `english_sentences()`, one per line (written atomically)."""
  folder = os.path.expanduser('~/.cache/performer_zoo')
  path = os.path.join(folder, 'english_sample.txt')
  if not os.path.exists(path):
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix='.english-', dir=folder)
    with os.fdopen(fd, 'w', encoding='utf-8') as f:
      f.write('\n'.join(english_sentences()) + '\n')
    os.replace(tmp, path)
  return path
