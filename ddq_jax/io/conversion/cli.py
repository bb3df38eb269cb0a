"""convert_weights: mmdetection DDQ-DETR / torchvision ResNet .pth -> ddq-jax.

Examples:
  python convert_weights.py ddq-detr-4scale_r50.pth --out weights/ddq_r50
  python convert_weights.py ckpt.pth --config configs/ddq_r50_4scale.py --out w/
  python convert_weights.py resnet50-0676ba61.pth --torchvision --out w/r50
  python convert_weights.py ckpt.pth --out w/ --config.num_queries=300

--out must be a new or empty directory, or a previous conversion (replaced
atomically).  A non-empty directory holding other files, or an existing
file, is refused before any work (exit 2) unless --overwrite, which writes
variables.msgpack / config.json / conversion.json into it and keeps every
other file.  The input checkpoint is never modified or removed.
"""
from __future__ import annotations

import argparse
import sys

from ddq_jax import cli
from ddq_jax.config import apply_overrides
from ddq_jax.io.conversion import weights_io
from ddq_jax.io.conversion.converter import ConversionError, convert_checkpoint
from ddq_jax.io.conversion.mmdet_config import ConfigParseError
from ddq_jax.io.conversion.torch_pickle import CheckpointReadError
from ddq_jax.io import weight_formats
from ddq_jax.io.conversion.torchvision import torchvision_resnet_to_variables


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog='convert_weights.py', description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('checkpoint', help='a PyTorch .pth (torch.save zip format); '
                 'torch is not needed to read it')
  p.add_argument('--out', required=True,
                 help='output directory (variables.msgpack + config.json), '
                 'written atomically: new, empty or a previous conversion')
  cli.add_config_argument(p, help_text="instead of the checkpoint's own "
                          "meta['cfg'] text.")
  p.add_argument('--torchvision', action='store_true',
                 help='the file is a torchvision ResNet state_dict: write '
                 'backbone-only variables for initialising training (a bare '
                 'ResNet state_dict is recognised without this flag)')
  p.add_argument('--overwrite', action='store_true',
                 help='write into a non-empty --out that is not a previous '
                 'conversion (only our three files are replaced)')
  p.add_argument('--no-check', action='store_true',
                 help='skip the comparison with the shapes the model expects')
  return p


def main(argv=None) -> int:
  parser = _parser()
  args, overrides = cli.parse_args(parser, argv)
  given = (cli.load_or_fail(parser, args.config, overrides)
           if args.config else None)
  save = dict(overwrite=args.overwrite, inputs=(args.checkpoint,))
  try:
    # Refuse a bad --out before the (slow) conversion.
    weights_io.check_output_dir(args.out, **save)
    fmt, src = ((weight_formats.BY_NAME['torchvision'],
                 weight_formats.WeightSource(args.checkpoint))
                if args.torchvision else
                weight_formats.identify(args.checkpoint))
    if fmt.name == 'torchvision':
      config = given or cli.load_or_fail(parser, 'ddq_r50_4scale', overrides)
      state_dict = src.state_dict
      variables = torchvision_resnet_to_variables(state_dict)
      weights_io.save_converted(args.out, variables, config,
                                extra={'source': args.checkpoint,
                                       'kind': 'torchvision_backbone'}, **save)
      print(f'wrote backbone variables ({len(state_dict)} tensors read) '
            f'to {args.out}')
      return 0
    if fmt.name != 'mmdet':
      raise ValueError(f'{args.checkpoint}: {fmt.summary}; convert reads an '
                       'mmdetection DDQ-DETR or a torchvision ResNet .pth')
    variables, config, report = convert_checkpoint(
        args.checkpoint, given, check=not args.no_check,
        checkpoint=src.checkpoint)
    if given is None:
      apply_overrides(config, overrides)
    weights_io.save_converted(
        args.out, variables, config,
        extra={'source': args.checkpoint, 'kind': 'mmdet_ddq_detr',
               'converted_tensors': report.converted,
               'ignored': report.ignored}, **save)
  except (CheckpointReadError, ConfigParseError, ConversionError,
          FileNotFoundError, KeyError, ValueError, OSError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  reasons = '; '.join(sorted(set(report.ignored.values()))) or 'none'
  print(f'converted {report.converted} tensors '
        f'({len(report.ignored)} deliberately ignored: {reasons}) '
        f'for config {config.name!r} -> {args.out}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
