"""`stoker serve`'s LoRA flags (no JAX here: the command's flags parse before JAX starts)."""

from __future__ import annotations

import argparse

DEFAULT_SLOTS = 4  # adapter slots when --lora is given without --max-loras


def add_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument('--lora', action='append', default=[], metavar='NAME=PATH', type=_pair,
                 help='Serve a LoRA adapter beside the base as model NAME (repeatable); PATH: a PEFT '
                      "adapter directory or a LoRA training run's workdir.")
  p.add_argument('--max-loras', '--max_loras', dest='max_loras', type=int, default=None,
                 help=f'Adapter slots in device memory (default {DEFAULT_SLOTS} with --lora, else '
                      'engine.max_loras); more adapters swap in from host memory. POST '
                      '/v1/load_lora_adapter needs at least 1.')
  p.add_argument('--max-lora-rank', '--max_lora_rank', dest='max_lora_rank', type=int, default=None,
                 help='The slots\' rank (default engine.max_lora_rank, 16); lower ranks are padded.')


def _pair(text: str) -> tuple[str, str]:
  name, sep, path = text.partition('=')
  if not sep or not name or not path:
    raise argparse.ArgumentTypeError(f'--lora {text!r}: use NAME=PATH (e.g. sql=/runs/sql-lora).')
  return name, path


def values(args: argparse.Namespace) -> dict:
  """serve_command's LoRA arguments from the parsed flags."""
  return dict(loras=args.lora, max_loras=args.max_loras, max_lora_rank=args.max_lora_rank)


def slots(loras, max_loras: int | None, configured: int) -> int:
  """The engine's max_loras: the flag, else the configured value, else DEFAULT_SLOTS with --lora."""
  if max_loras is not None:
    return max_loras
  return configured or (DEFAULT_SLOTS if loras else 0)
