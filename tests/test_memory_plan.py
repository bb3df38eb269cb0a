"""train.memory='auto': the fastest layer plan whose compiled peak fits."""
import types

import pytest

from ddq_jax.config import load_config
from ddq_jax.model.remat import REMAT_PARTS
from ddq_jax.train import memory_plan


class _Compiled:
  def __init__(self, peak_bytes):
    self.peak = peak_bytes

  def memory_analysis(self):
    return types.SimpleNamespace(temp_size_in_bytes=self.peak,
                                 argument_size_in_bytes=10,
                                 output_size_in_bytes=10,
                                 alias_size_in_bytes=20)


def _compile_with_peaks(peaks):
  """compile_plan stand-in: each plan's peak, recording what it saw."""
  seen = []

  def compile_plan(config):
    seen.append((bool(config.train.scan_layers),
                 {str(config.train.remat[p]) for p in REMAT_PARTS}))
    return len(seen) - 1, _Compiled(peaks[len(seen) - 1])
  return compile_plan, seen


def test_first_plan_that_fits_is_chosen():
  config = load_config('tiny')
  compile_plan, seen = _compile_with_peaks([300, 200, 100, 50])
  chosen, result, report = memory_plan.choose_plan(config, compile_plan,
                                                   budget=150)
  assert seen == [(False, {'none'}), (True, {'none'}), (True, {'minimal'})]
  assert result == 2
  assert [r['fits'] for r in report] == [False, False, True]
  assert chosen.train.scan_layers and chosen.train.remat.encoder == 'minimal'
  assert config.train.remat.encoder == 'full'  # the input is not changed


def test_fastest_plan_when_it_fits_one_compile():
  compile_plan, seen = _compile_with_peaks([10, 0, 0, 0])
  chosen, _, report = memory_plan.choose_plan(load_config('tiny'),
                                              compile_plan, budget=10 ** 9)
  assert len(seen) == 1 and not chosen.train.scan_layers
  assert report == [dict(plan='unrolled', peak_gb=0.0, fits=True)]


def test_nothing_fits_uses_the_smallest_plan(caplog):
  compile_plan, _ = _compile_with_peaks([400, 300, 200, 100])
  chosen, _, report = memory_plan.choose_plan(load_config('tiny'),
                                              compile_plan, budget=50)
  assert len(report) == len(memory_plan.PLANS) and not report[-1]['fits']
  assert chosen.train.remat.backbone == 'full'
  assert 'no plan fits' in caplog.text


def test_budget_and_mode():
  config = load_config('tiny', {'train.memory_budget_gb': 1.5})
  assert memory_plan.budget_bytes(config) == int(1.5 * 2 ** 30)
  config.train.memory_budget_gb = 0.0
  assert memory_plan.budget_bytes(config) > 0  # the host's share on CPU
  assert memory_plan.memory_mode(config) == 'auto'  # tiny.py's choice
  assert memory_plan.memory_mode(load_config('ddq_r50_4scale')) == 'config'
  config.train.memory = 'fastest'
  with pytest.raises(ValueError, match="'train.memory' is 'fastest'"):
    memory_plan.memory_mode(config)
