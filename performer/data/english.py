"""Real English that ships with Python, no download: `data.name='english_sample'` and
`data.name='english_docs'`.

* 'english_sample': the stdlib's `pydoc_data.topics` holds the language reference as
  prose (959 sentences, 17k words pass the filter below), so a text model can be
  fine-tuned and evaluated offline: the default data of the imported-model configs
  (configs/smollm2_favor.py, configs/minilm_favor.py).
* 'english_docs': whole documents, for longer contexts (seq_len 256-1024): every
  pydoc topic section plus the module, class and function docstrings of the
  stdlib's own .py sources (read with `ast`, never imported) of 40 words or more:
  on Python 3.11, 1,792 documents, 1.5 MB, 231k words, ~350k SmolLM2 tokens (half
  of them in the 248 documents of 256+ tokens). It follows the interpreter's version.

Each corpus is written once, one example per line, to a cache file (atomically: a
temp file, then os.replace, so an interrupted build leaves no half file) that the
ordinary text pipeline (text.py) then reads, splits 90/5/5 by a hash of the line and
tokenises; sequences.py windows long documents (data.crop) and packs short ones.
"""

from __future__ import annotations

import ast
import logging
import os
import re
import sysconfig
import tempfile
from typing import Callable, Iterator

from performer.data.text import TextLines

log = logging.getLogger(__name__)

CACHE_DIR = '~/.cache/performer_zoo'
# Folders of the stdlib whose docstrings are not prose about the library (tests, the
# IDLE app, the 2to3 fixers) or not the stdlib at all (installed packages).
SKIP_DIRS = frozenset({'test', 'tests', 'idlelib', 'lib2to3', 'site-packages', 'dist-packages'})
_DOC_NODES = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


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


def one_line(text: str) -> str | None:
  """`text` on one line (runs of whitespace, newlines included, become one space); None
  if it cannot be a line of the UTF-8 cache file (control characters, lone surrogates)."""
  text = ' '.join(text.split())
  if any(ord(c) < 32 or c == '\x7f' for c in text):
    return None
  try:
    text.encode('utf-8')
  except UnicodeEncodeError:
    return None
  return text


def stdlib_sources(root: str | None = None) -> list[str]:
  """The stdlib's .py files outside SKIP_DIRS, sorted, so the corpus order is fixed."""
  root = root or sysconfig.get_paths()['stdlib']
  out = []
  for folder, dirs, files in os.walk(root):
    dirs[:] = [d for d in dirs if d not in SKIP_DIRS and d != '__pycache__']
    out += [os.path.join(folder, f) for f in files if f.endswith('.py')]
  return sorted(out)


def _docstrings(tree: ast.AST) -> Iterator[str]:
  """Docstrings in source order; only statements are visited (expressions hold none)."""
  if isinstance(tree, _DOC_NODES):
    doc = ast.get_docstring(tree, clean=True)
    if doc:
      yield doc
  for child in ast.iter_child_nodes(tree):
    if isinstance(child, (ast.stmt, ast.excepthandler, ast.match_case)):
      yield from _docstrings(child)


def english_documents(min_words: int = 40, root: str | None = None) -> list[str]:
  """Every pydoc topic section, then the stdlib's docstrings of >= min_words words
  (files that fail to parse are skipped), one line each, deduplicated, in a fixed order."""
  from pydoc_data import topics  # pylint: disable=g-import-not-at-top

  docs = [one_line(topics.topics[name]) for name in sorted(topics.topics)]
  for path in stdlib_sources(root):
    try:
      with open(path, 'rb') as f:
        tree = ast.parse(f.read(), path)
    except (SyntaxError, ValueError, OSError, RecursionError, MemoryError):
      continue
    docs += [d for d in map(one_line, _docstrings(tree)) if d and len(d.split()) >= min_words]
  return list(dict.fromkeys(d for d in docs if d))


def cached(name: str, build: Callable[[], list[str]], folder: str | None) -> str:
  """`folder`/`name`: the lines of `build()`, written on first use (atomically)."""
  folder = os.path.expanduser(folder or CACHE_DIR)
  path = os.path.join(folder, name)
  if not os.path.exists(path):
    lines = build()
    text = '\n'.join(lines) + '\n'
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f'.{name}-', dir=folder)
    try:
      with os.fdopen(fd, 'w', encoding='utf-8') as f:
        f.write(text)
      os.replace(tmp, path)
    except BaseException:
      if os.path.exists(tmp):
        os.remove(tmp)
      raise
    log.info(
      'wrote %s: %d bytes, %d lines, %d words',
      path,
      len(text.encode('utf-8')),
      len(lines),
      sum(len(line.split()) for line in lines),
    )
  return path


def sample_path(folder: str | None = None) -> str:
  """The cached file of `english_sentences()`, one per line."""
  return cached('english_sample.txt', english_sentences, folder)


def docs_path(folder: str | None = None) -> str:
  """The cached file of `english_documents()`, one per line."""
  return cached('english_docs.txt', english_documents, folder)


# The two datasets: the ordinary text pipeline over the cache files.
SAMPLE = TextLines(sample_path)
DOCS = TextLines(docs_path)
