"""The docs tell the truth about the layout: every module is listed in
docs/ARCHITECTURE.md, and no doc or docstring cites a file that is not in
the repository."""
import os
import re
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ('model', 'ops', 'losses', 'data', 'train', 'io', 'serve',
            'parity', 'tools', 'evaluation')
# A path of this repository: from its root, or from the package's.
_FROM_ROOT = re.compile(
    r'(?<![\w/.-])((?:ddq_jax|docs|tests|benchmarks)/[\w/.-]*\w|'
    r'configs/\w+\.py)')
_FROM_PACKAGE = re.compile(
    r'(?<![\w/.-])((?:%s)/[\w/]*\w\.py)' % '|'.join(PACKAGES))


def _tracked(*suffixes):
  out = subprocess.run(['git', 'ls-files'], cwd=ROOT, capture_output=True,
                       text=True, check=True).stdout.split()
  return [f for f in out if f.endswith(suffixes)
          and not f.startswith('tests/data/')]


def _layout_tree():
  """Paths listed in ARCHITECTURE.md's Layout block (indent = depth)."""
  text = open(os.path.join(ROOT, 'docs', 'ARCHITECTURE.md')).read()
  block = text.split('## Layout', 1)[1].split('```', 2)[1]
  listed, stack = set(), []
  for line in block.splitlines():
    if not line.strip():
      continue
    depth = (len(line) - len(line.lstrip())) // 2
    name = line.split()[0]
    if not (name.endswith('/') or '.' in name):
      continue  # a continued description
    stack = stack[:depth] + [name.rstrip('/')]
    listed.add('/'.join(stack))
  return listed


def test_every_module_is_in_the_architecture_layout():
  listed = _layout_tree()
  modules = [f for f in _tracked('.py') if f.startswith('ddq_jax/')
             and not f.endswith('__init__.py')]
  missing = [m for m in modules if m not in listed]
  assert not missing, f'docs/ARCHITECTURE.md Layout lacks {missing}'
  stale = [p for p in listed if p.endswith('.py')
           and not os.path.exists(os.path.join(ROOT, p))]
  assert not stale, f'docs/ARCHITECTURE.md lists missing files {stale}'


def test_docs_cite_only_files_that_exist():
  bad = []
  for f in _tracked('.py', '.md', '.toml'):
    text = open(os.path.join(ROOT, f)).read()
    if 'DESIGN.md' in text and not f.endswith('test_docs.py'):
      bad.append((f, 'DESIGN.md'))
    for m in _FROM_ROOT.finditer(text):
      path = m.group(1).rstrip('.')
      if not os.path.exists(os.path.join(ROOT, path)):
        bad.append((f, path))
    for m in _FROM_PACKAGE.finditer(text):
      path = m.group(1)
      if not (os.path.exists(os.path.join(ROOT, 'ddq_jax', path)) or
              os.path.exists(os.path.join(ROOT, path))):
        bad.append((f, path))
  assert not bad, f'cited files that do not exist: {bad}'
