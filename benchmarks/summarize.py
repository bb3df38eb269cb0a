"""Turns ``python -m ddq_jax benchmark`` JSON lines into markdown.

  python benchmarks/summarize.py run1.json run2.json ... > table.md

One table row per run, then per run the hottest op groups and stages.
"""
import json
import sys


def _load(path):
  with open(path) as f:
    lines = [l for l in f.read().splitlines() if l.startswith('{')]
  return json.loads(lines[-1]) if lines else None


def main(paths):
  runs = [r for r in map(_load, paths) if r and 'mode' in r]
  print('| config | mode | batch | size | devices | compile s | step median s '
        '| step min s | img/s (median) | img/s (best) | compiled peak GB '
        '| device peak GB | load |')
  print('|---|---|---|---|---|---|---|---|---|---|---|---|---|')
  for r in runs:
    print(f"| {r['config']} | {r['mode']} | {r['batch']} | "
          f"{r['size'][0]}x{r['size'][1]} | {r['devices']} x {r['device_kind']} "
          f"| {r['compile_s']} | {r.get('step_median_s', '')} | "
          f"{r.get('step_min_s', '')} | {r.get('images_per_s', '')} | "
          f"{r.get('images_per_s_best', '')} | "
          f"{r.get('peak_memory_gb', '')} | "
          f"{r.get('device_peak_memory_gb', '')} | "
          f"{r.get('load_avg_1m', '')} |")
  for r in runs:
    if not r.get('stages'):
      continue
    print(f"\n**{r['config']} {r['mode']}** (op time "
          f"{r.get('op_time_ms_per_step')} ms in the profiled step)\n")
    print('| stage | ms | share |\n|---|---|---|')
    for k, v in list(r['stages'].items())[:8]:
      print(f"| {k} | {v['ms']} | {100 * v['share']:.1f}% |")
    if r.get('hot_groups'):
      print('\n| hot op group (layers folded) | stage | ms | share |\n'
            '|---|---|---|---|')
      for g in r['hot_groups'][:5]:
        print(f"| `{g['scope']}` | {g['stage']} | {g['ms']} | "
              f"{100 * g['share']:.1f}% |")


if __name__ == '__main__':
  main(sys.argv[1:])
