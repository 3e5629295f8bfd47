r"""The table of configs in README.md and docs/training.md, generated from the configs' own
docstrings.

    python tools/config_table.py            # print the table
    python tools/config_table.py --write    # rewrite it in both files, between the markers

Every config in configs/ but base.py (the schema) is one row: its command (the first
`python train.py --config=configs/NAME.py ...` line of its docstring, with any `\`
continuation lines), its `Runtime:` line and its `Expected:` line. Each of those two is
exactly one line of the docstring, written where the measurement was made.
tests/test_docs.py fails when either file's table is not what this prints, so the table
cannot drift from the configs.
"""

from __future__ import annotations

import argparse
import ast
import glob
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, 'README.md')
FILES = (README, os.path.join(ROOT, 'docs', 'training.md'))  # where the table lives
START, END = '<!-- configs:start -->', '<!-- configs:end -->'
FIRST = ('tiny', 'default')  # the smoke run and the main job lead; the rest alphabetically


def config_names():
  names = [os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, 'configs', '[a-z]*.py'))]
  names = [n for n in names if n != 'base']
  return [n for n in FIRST if n in names] + sorted(n for n in names if n not in FIRST)


def docstring(name):
  with open(os.path.join(ROOT, 'configs', f'{name}.py'), encoding='utf-8') as f:
    return ast.get_docstring(ast.parse(f.read())) or ''


def fields(name):
  """(command, runtime, expected) of configs/NAME.py; ValueError naming what is missing."""
  lines = [line.strip() for line in docstring(name).splitlines()]
  command = None
  for i, line in enumerate(lines):
    if line.startswith(f'python train.py --config=configs/{name}.py'):
      parts = [line]
      while parts[-1].endswith('\\') and i + 1 < len(lines):
        i += 1
        parts[-1] = parts[-1][:-1].rstrip()
        parts.append(lines[i])
      command = ' '.join(parts)
      break
  if command is None:
    raise ValueError(f'configs/{name}.py: no `python train.py --config=configs/{name}.py` line')
  found = {}
  for key in ('Runtime', 'Expected'):
    hits = [line[len(key) + 1 :].strip() for line in lines if line.startswith(key + ':')]
    if len(hits) != 1:
      raise ValueError(f'configs/{name}.py: {len(hits)} lines start with "{key}:", need one')
    found[key] = hits[0]
  return command, found['Runtime'], found['Expected']


def table():
  """The Markdown table, one row per config."""
  rows = ['| config | command | runtime | expected |', '| --- | --- | --- | --- |']
  for name in config_names():
    command, runtime, expected = (s.replace('|', '\\|') for s in fields(name))
    rows.append(f'| `{name}` | `{command}` | {runtime} | {expected} |')
  return '\n'.join(rows)


def current_table(path):
  """The table between the markers of the file at `path`."""
  with open(path, encoding='utf-8') as f:
    text = f.read()
  if START not in text or END not in text:
    raise ValueError(f'{os.path.relpath(path, ROOT)}: the markers {START} and {END} are missing')
  return text.split(START, 1)[1].split(END, 1)[0].strip()


def write(path):
  current_table(path)  # the markers exist
  with open(path, encoding='utf-8') as f:
    head, rest = f.read().split(START, 1)
  tail = rest.split(END, 1)[1]
  with open(path, 'w', encoding='utf-8') as f:
    f.write(f'{head}{START}\n{table()}\n{END}{tail}')


def main(argv=None):
  p = argparse.ArgumentParser(description='The config table from the configs docstrings.')
  p.add_argument('--write', action='store_true', help='rewrite the table where it lives')
  args = p.parse_args(argv)
  try:
    if args.write:
      for path in FILES:
        write(path)
        print(f'wrote the config table into {os.path.relpath(path, ROOT)}')
    else:
      print(table())
  except ValueError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  return 0


if __name__ == '__main__':
  sys.exit(main())
