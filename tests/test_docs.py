"""The README and the docs site: CI runs the README's test command, the config table is the
configs' own docstrings, every config is in the catalogue, figures exist and are small, and
the docs stand alone (no external design file). `mkdocs build --strict` itself runs in the
README's test command, which checks links, anchors and pages."""

import glob
import os
import re
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, 'tools'))
import config_table  # noqa: E402  pylint: disable=g-import-not-at-top

DOCS = os.path.join(ROOT, 'docs')


def read(*parts):
  with open(os.path.join(ROOT, *parts), encoding='utf-8') as f:
    return f.read()


def command(lines):
  """Shell lines joined at their trailing backslashes, whitespace collapsed."""
  return ' '.join(' '.join(line.rstrip('\\').split()) for line in lines if line.strip())


def test_ci_runs_the_readme_test_command():
  readme = read('README.md')
  block = readme.split('Tests (exactly what `.ci/run` runs', 1)[1].split('```bash\n', 1)[1]
  readme_command = command(block.split('```', 1)[0].splitlines())
  ci = read('.ci', 'run').splitlines()
  ci_command = command(ci[ci.index('rm -rf .venv') + 1 :])
  assert ci_command == readme_command
  assert 'mkdocs build --strict' in ci_command and ci_command.endswith('pytest -n 2')


@pytest.mark.parametrize('path', config_table.FILES, ids=os.path.basename)
def test_config_table_is_generated_from_the_docstrings(path):
  assert config_table.current_table(path) == config_table.table(), (
    f'{os.path.relpath(path, ROOT)}: the config table is stale; run '
    '`python tools/config_table.py --write`'
  )


def test_every_config_has_one_row_and_is_in_the_catalogue():
  names = config_table.config_names()
  assert {'tiny', 'default', 'smollm2_favor', 'minilm_favor', 'protein_long'} <= set(names)
  assert {'linearize_smollm2', 'linearize_minilm'} <= set(names) and 'base' not in names
  table = config_table.table().splitlines()[2:]
  assert [row.split('`')[1] for row in table] == names
  for name in names:
    command, runtime, expected = config_table.fields(name)
    assert command.startswith(f'python train.py --config=configs/{name}.py --workdir=')
    assert runtime and expected
  catalogue = read('docs', 'training.md').split('What each one is.', 1)[1]
  described = re.findall(r'^\| `(\w+)` \|', catalogue, flags=re.M)
  assert sorted(set(described)) == sorted(names), 'docs/training.md catalogue: one row each'


def test_a_config_without_runtime_is_one_clear_error(tmp_path, monkeypatch):
  (tmp_path / 'configs').mkdir()
  (tmp_path / 'configs' / 'new.py').write_text(
    'r"""A new config.\n\n  python train.py --config=configs/new.py --workdir=/tmp/new\n\n'
    'Expected: something.\n"""\n'
  )
  monkeypatch.setattr(config_table, 'ROOT', str(tmp_path))
  with pytest.raises(ValueError, match=r'configs/new\.py: 0 lines start with "Runtime:"'):
    config_table.table()


def test_readme_is_short_and_links_into_the_docs():
  readme = read('README.md')
  assert len(readme.splitlines()) <= 250
  for page in ('attention', 'training', 'datasets', 'pretrained', 'linearization', 'design'):
    assert f'(docs/{page}.md)' in readme
  assert 'mkdocs serve' in readme and 'tensorboard --logdir WORKDIR/tensorboard' in readme


def test_every_page_is_in_the_nav_and_under_400_lines():
  nav = read('mkdocs.yml')
  pages = sorted(os.path.basename(p) for p in glob.glob(os.path.join(DOCS, '*.md')))
  assert pages == sorted(set(re.findall(r'(\w+\.md)$', nav, flags=re.M)))
  assert 'strict: true' in nav
  for page in pages:
    assert len(read('docs', page).splitlines()) <= 400, page


def test_figures_exist_are_small_pngs_and_are_shown():
  text = ''.join(read('docs', p) for p in os.listdir(DOCS) if p.endswith('.md'))
  shown = set(re.findall(r'\]\(figures/([\w.]+\.png)\)', text))
  on_disk = {os.path.basename(p) for p in glob.glob(os.path.join(DOCS, 'figures', '*'))}
  assert shown and shown == on_disk, shown ^ on_disk
  for name in on_disk:
    path = os.path.join(DOCS, 'figures', name)
    with open(path, 'rb') as f:
      assert f.read(8) == b'\x89PNG\r\n\x1a\n', name
    assert os.path.getsize(path) < 250_000, f'{name}: keep committed figures small'


def test_the_docs_stand_alone():
  """The design notes are docs/design.md: nothing cites a design file outside the repo."""
  external = 'DESIGN' + '.md'
  tracked = ['README.md', 'mkdocs.yml'] + [
    os.path.relpath(p, ROOT)
    for folder in ('docs', 'configs', 'benchmarks', 'performer', 'notebooks', 'tests', 'tools')
    for p in glob.glob(os.path.join(ROOT, folder, '**', '*.*'), recursive=True)
    if p.endswith(('.md', '.py', '.ipynb', '.yml'))
  ]
  citing = [p for p in tracked if external in read(p)]
  assert not citing, f'cite docs/design.md instead of {external}: {citing}'
