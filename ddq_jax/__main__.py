"""``python -m ddq_jax COMMAND [ARGS]``: every command of the project.

    python -m ddq_jax train     --config tiny_synthetic --workdir runs/smoke
    python -m ddq_jax convert   ddq-detr-4scale_r50.pth --out weights/ddq_r50
    python -m ddq_jax verify    tests/data/tiny --train
    python -m ddq_jax predict   --weights weights/ddq_r50 img.jpg --draw out/
    python -m ddq_jax evaluate  --weights weights/ddq_r50 --coco-dir /data/coco --out runs/eval
    python -m ddq_jax export    --weights weights/ddq_r50 --out export/r50
    python -m ddq_jax benchmark --config tiny --mode train --batch 2 --size 128 128

Each is also an installed script (``ddq-train``, ``ddq-convert``, ...) and
a module (``python -m ddq_jax.train.cli``, ...); ``COMMAND --help``
explains its options.
"""
import importlib
import sys

# command -> module holding its main(argv) (pyproject's [project.scripts]).
COMMANDS = {
    'train': 'ddq_jax.train.cli',
    'convert': 'ddq_jax.io.conversion.cli',
    'verify': 'ddq_jax.parity.verify',
    'predict': 'ddq_jax.serve.predict',
    'evaluate': 'ddq_jax.evaluation.cli',
    'export': 'ddq_jax.serve.export',
    'benchmark': 'ddq_jax.tools.benchmark',
}


def _usage() -> str:
  first = __doc__.split('\n\n')[0]
  return (f'{first}\n\ncommands: {", ".join(COMMANDS)}\n'
          'python -m ddq_jax COMMAND --help: its options')


def run(command: str, argv=None) -> int:
  """Runs one command's main(argv); its exit status (commands whose main
  returns their results, evaluate and benchmark, exit 0 with a result)."""
  result = importlib.import_module(COMMANDS[command]).main(
      list(sys.argv[1:] if argv is None else argv))
  if isinstance(result, int):
    return result
  return 0 if result is not None else 1


def main(argv=None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if not argv or argv[0] in ('-h', '--help'):
    print(_usage())
    return 0 if argv else 2
  command, rest = argv[0], argv[1:]
  if command not in COMMANDS:
    print(f'python -m ddq_jax: unknown command {command!r}; expected one of '
          f'{", ".join(COMMANDS)}', file=sys.stderr)
    return 2
  return run(command, rest)


# The installed scripts (pyproject's [project.scripts]): ddq-<command>.
def train() -> int:
  return run('train')


def convert() -> int:
  return run('convert')


def verify() -> int:
  return run('verify')


def predict() -> int:
  return run('predict')


def evaluate() -> int:
  return run('evaluate')


def export() -> int:
  return run('export')


def benchmark() -> int:
  return run('benchmark')


if __name__ == '__main__':
  sys.exit(main())
