"""The shared command-line grammar: --config PATH|NAME, --config.KEY=VALUE,
one-line errors naming the bad key (and the nearest valid one)."""
import pytest

from ddq_jax import cli
from ddq_jax.config import ConfigError, apply_overrides, load_config
from ddq_jax.evaluation import cli as evaluate
from ddq_jax.io.conversion import cli as convert
from ddq_jax.parity import verify
from ddq_jax.serve import predict
from ddq_jax.tools import benchmark
from ddq_jax.train import cli as train


def test_overrides_are_typed_by_the_field():
  rest, ov = cli.split_overrides(
      ['--workdir', 'w', '--config.optim.lr=1e-4', '--config.name', 'x',
       '--config.data.canvas_sizes=((64, 64),)', '--config.num_queries=30'])
  assert rest == ['--workdir', 'w']
  c = load_config('tiny', ov)
  assert c.optim.lr == 1e-4 and c.name == 'x'
  assert c.data.canvas_sizes == ((64, 64),) and c.num_queries == 30
  apply_overrides(c, {'data.coco_dir': '/data/coco', 'optim.lr': '2'})
  assert c.data.coco_dir == '/data/coco' and c.optim.lr == 2.0


@pytest.mark.parametrize('overrides, message', [
    ({'optim.lrr': '1'}, "no field 'optim.lrr'; did you mean 'optim.lr'"),
    ({'num_querys': '3'}, "did you mean 'num_queries'"),
    ({'optimm.lr': '1'}, "did you mean 'optim.lr'"),
    ({'num_queries': 'many'}, "'num_queries' is a int"),
    ({'optim': '1'}, "no field 'optim'"),
])
def test_bad_override_names_the_key(overrides, message):
  with pytest.raises(ConfigError, match=message.replace('(', r'\(')):
    load_config('tiny', overrides)


def test_missing_config_file():
  with pytest.raises(ConfigError, match="'tinyy' not found.*did you mean 'tiny'"):
    load_config('tinyy')


@pytest.mark.parametrize('argv, message', [
    (['--config', 'tiny', '--config.optim.lrr=1'], "did you mean 'optim.lr'"),
    (['--config', 'nope.py'], "config 'nope.py' not found"),
    (['--config', 'tiny', '--config.num_queries=x'], "'num_queries' is a int"),
])
def test_entry_points_end_in_one_line(argv, message, capsys, tmp_path):
  """Every entry point: exit status 2, one line on stderr, no traceback."""
  mains = [lambda a: benchmark.main(a),
           lambda a: convert.main(['x.pth', '--out', str(tmp_path)] + a),
           lambda a: train.main(
      a + ['--workdir', str(tmp_path)]),
           lambda a: evaluate.main(a + ['--random-init', '--out',
                                        str(tmp_path)]),
           lambda a: predict.main(['x.jpg', '--weights', 'w'] + a),
           lambda a: verify.main([str(tmp_path)] + a)]
  for main in mains:
    with pytest.raises(SystemExit) as e:
      main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
