"""The package's shape: every module imports, no import cycles, imports at
module top (but for optional dependencies), every command installed."""
import ast
import importlib
import importlib.util
import os
import pkgutil
import subprocess
import sys
import tomllib

import ddq_jax
from ddq_jax.__main__ import COMMANDS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, 'ddq_jax')

# Modules that may be imported inside a function: optional dependencies
# (pyproject's [project.optional-dependencies]: export, prepare, tpu) that a
# plain install lacks.
OPTIONAL = {'onnx', 'onnxruntime', 'onnx_ir', 'jax2onnx', 'tensorflow',
            'libtpu', 'einops'}
# The package root's lazy exports (PEP 562 ``__getattr__``): ``import
# ddq_jax`` and ``python -m ddq_jax --help`` stay free of jax
# (test_api.test_lazy_import).  (file relative to the package, function)
LAZY_EXPORTS = {('__init__.py', '__getattr__')}


def _modules() -> dict[str, str]:
  """{dotted module name: file} of every ddq_jax module."""
  out = {}
  for dirpath, _, files in os.walk(PACKAGE):
    for f in files:
      if not f.endswith('.py'):
        continue
      rel = os.path.relpath(os.path.join(dirpath, f), ROOT)[:-3]
      parts = rel.split(os.sep)
      if parts[-1] == '__init__':
        parts = parts[:-1]
      out['.'.join(parts)] = os.path.join(dirpath, f)
  return out


MODULES = _modules()


def _is_package(name: str) -> bool:
  return MODULES[name].endswith('__init__.py')


def _module_level_imports(tree):
  """Import statements that run when the module is imported (not inside
  a function)."""
  todo = list(tree.body)
  while todo:
    node = todo.pop()
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
      continue
    if isinstance(node, (ast.Import, ast.ImportFrom)):
      yield node
    todo.extend(ast.iter_child_nodes(node))


def _function_imports(tree):
  """(import node, function name) of imports inside functions."""
  def walk(node, fn):
    for child in ast.iter_child_nodes(node):
      if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
        yield from walk(child, child.name)
      elif isinstance(child, (ast.Import, ast.ImportFrom)) and fn:
        yield child, fn
      else:
        yield from walk(child, fn)
  yield from walk(tree, None)


def _targets(module: str, node) -> set[str]:
  """The ddq_jax modules an import statement of ``module`` imports."""
  if isinstance(node, ast.Import):
    return {a.name for a in node.names if a.name in MODULES}
  base = node.module or ''
  if node.level:
    pkg = module if _is_package(module) else module.rsplit('.', 1)[0]
    for _ in range(node.level - 1):
      pkg = pkg.rsplit('.', 1)[0]
    base = f'{pkg}.{base}' if base else pkg
  out = set()
  for a in node.names:
    sub = f'{base}.{a.name}'
    if sub in MODULES:
      out.add(sub)
    elif base in MODULES:
      out.add(base)
  return out


def _packages_of(name: str) -> set[str]:
  """The sub-packages ``import name`` initialises first (the root's
  ``__init__`` imports nothing at its top)."""
  parts = name.split('.')
  return {'.'.join(parts[:i]) for i in range(2, len(parts))}


def import_graph() -> dict[str, set[str]]:
  """{module: the ddq_jax modules its top level imports}, with the
  sub-packages (their ``__init__``) an import initialises on the way,
  except the importer's own (already initialising)."""
  graph = {}
  for name, path in MODULES.items():
    with open(path) as f:
      tree = ast.parse(f.read(), path)
    own = _packages_of(name) | ({name} if _is_package(name) else set())
    deps = set()
    for node in _module_level_imports(tree):
      for target in _targets(name, node):
        deps |= {target} | _packages_of(target)
    graph[name] = deps - own - {name}
  return graph


def find_cycle(graph: dict[str, set[str]]):
  """One import cycle as a list of modules, or None."""
  state = {}  # 1: on the stack, 2: done
  stack = []

  def visit(n):
    state[n] = 1
    stack.append(n)
    for m in sorted(graph.get(n, ())):
      if state.get(m) == 1:
        return stack[stack.index(m):] + [m]
      if m not in state:
        found = visit(m)
        if found:
          return found
    stack.pop()
    state[n] = 2
    return None

  for n in sorted(graph):
    if n not in state:
      found = visit(n)
      if found:
        return found
  return None


def test_every_module_imports():
  names = [m.name for m in
           pkgutil.walk_packages(ddq_jax.__path__, 'ddq_jax.')]
  assert set(names) | {'ddq_jax'} == set(MODULES)
  for name in names:
    importlib.import_module(name)


def test_no_import_cycles():
  graph = import_graph()
  assert graph['ddq_jax.train.loop'], 'the graph found no imports'
  cycle = find_cycle(graph)
  assert cycle is None, 'import cycle: ' + ' -> '.join(cycle)


def test_find_cycle_finds_one():
  assert find_cycle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}}) == [
      'a', 'b', 'c', 'a']
  assert find_cycle({'a': {'b'}, 'b': set()}) is None


def test_imports_at_module_top():
  local = []
  for name, path in sorted(MODULES.items()):
    with open(path) as f:
      tree = ast.parse(f.read(), path)
    rel = os.path.relpath(path, PACKAGE)
    for node, fn in _function_imports(tree):
      if (rel, fn) in LAZY_EXPORTS:
        continue
      if isinstance(node, ast.Import):
        roots = {a.name.split('.')[0] for a in node.names}
      else:
        roots = {(node.module or '').split('.')[0]} if not node.level else {
            'ddq_jax'}
      if not roots <= OPTIONAL:
        local.append(f'{path}:{node.lineno} in {fn}(): {ast.unparse(node)}')
  assert not local, ('imports inside functions (move them to the top; '
                     'only optional dependencies may stay):\n' +
                     '\n'.join(local))


def test_every_command_is_a_script():
  with open(os.path.join(ROOT, 'pyproject.toml'), 'rb') as f:
    scripts = tomllib.load(f)['project']['scripts']
  for command in COMMANDS:
    assert scripts.get(f'ddq-{command}') == f'ddq_jax.__main__:{command}'
    assert callable(getattr(importlib.import_module('ddq_jax.__main__'),
                            command))
    assert importlib.util.find_spec(COMMANDS[command]) is not None
  assert scripts['ddq'] == 'ddq_jax.__main__:main'


def test_command_help_runs():
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep +
             os.environ.get('PYTHONPATH', ''))
  res = subprocess.run([sys.executable, '-m', 'ddq_jax', 'verify', '--help'],
                       cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300, check=False)
  assert res.returncode == 0, res.stderr
  assert 'usage:' in res.stdout
