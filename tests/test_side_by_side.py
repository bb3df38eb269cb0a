"""benchmarks/side_by_side.py: rounds alternate which side runs first, and
the speed-up is the median of the per-round ratios.  Stand-in programs
print the two benchmarks' JSON lines, so neither model runs here."""
import importlib.util
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _module():
  spec = importlib.util.spec_from_file_location(
      'side_by_side', os.path.join(ROOT, 'benchmarks', 'side_by_side.py'))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def test_rounds_alternate_and_ratios_are_per_round(monkeypatch):
  sbs = _module()
  calls = []
  ours = iter([0.10, 0.20, 0.10])
  ref = iter([0.30, 0.30, 0.25])

  def fake_run(cmd, what):
    calls.append(what.split()[-1])
    median = next(ours if what.endswith('ours') else ref)
    return {'step_median_s': median, 'load_avg_1m': 0.5,
            'peak_host_rss_gb': 1.0}

  monkeypatch.setattr(sbs, '_run', fake_run)
  res = sbs.run_case('tiny_train', ref_python='unused', rounds=3, steps=2,
                     ours_python='python')
  assert calls == ['ours', 'reference', 'reference', 'ours', 'ours',
                   'reference']
  assert res['speedup_per_round'] == [3.0, 1.5, 2.5]
  assert res['speedup_median'] == 2.5
  assert res['speedup_range'] == [1.5, 3.0]
  assert res['speedup_pooled'] == 3.0  # 0.30 / 0.10
  assert '**2.50x**' in sbs.markdown_row(res)


def test_last_json_line_and_a_clear_error(tmp_path):
  sbs = _module()
  text = 'warning: x\n{"step_median_s": 1.5}\n'
  assert sbs._last_json(text, 'ours') == {'step_median_s': 1.5}
  with pytest.raises(RuntimeError, match='ours printed no JSON line'):
    sbs._last_json('Traceback ...\n', 'ours')


def test_a_missing_reference_python_is_named(capsys):
  sbs = _module()
  with pytest.raises(SystemExit):
    sbs.main(['--ref-python', '/nonexistent/python', '--case', 'tiny_train'])
  assert '/nonexistent/python: no such file' in capsys.readouterr().err


def test_a_failing_side_names_its_command(tmp_path):
  sbs = _module()
  script = tmp_path / 'fail.py'
  script.write_text('import sys; sys.stderr.write("boom"); sys.exit(3)')
  with pytest.raises(RuntimeError, match=r'(?s)exit 3.*boom'):
    sbs._run([sys.executable, str(script)], 'tiny_train reference')
  ok = tmp_path / 'ok.py'
  ok.write_text('import json; print(json.dumps({"step_median_s": 2.0}))')
  assert sbs._run([sys.executable, str(ok)], 'x')['step_median_s'] == 2.0
