"""`stoker serve`'s speculative decoding flags (no JAX here: the command's flags parse before JAX starts)."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
  drafter = p.add_mutually_exclusive_group()
  drafter.add_argument('--draft-checkpoint', '--draft_checkpoint', dest='draft_checkpoint', default=None,
                       help='Speculative decoding with this draft model: a training workdir (e.g. a student '
                            'distilled from the served model) of the same tokenizer.')
  drafter.add_argument('--draft-hf-dir', '--draft_hf_dir', dest='draft_hf_dir', default=None,
                       help='Speculative decoding with a Hugging Face draft model of the same tokenizer.')
  drafter.add_argument('--speculative', choices=('ngram',), default=None,
                       help='Speculative decoding without a second model: ngram (prompt lookup).')
  p.add_argument('--num-speculative-tokens', '--num_speculative_tokens', dest='num_speculative_tokens',
                 type=int, default=None, help='Draft tokens per verification, k (default 4 with a drafter).')
  p.add_argument('--draft-weight-dtype', '--draft_weight_dtype', dest='draft_weight_dtype',
                 choices=('auto', 'int8', 'none'), default='auto',
                 help='The draft model\'s weights: int8, none (as loaded), or auto (int8 on CPU, where it '
                      'drafts in 16%% less time; as loaded elsewhere). Outputs stay exact either way.')
  p.add_argument('--speculative-max-batch', '--speculative_max_batch', dest='speculative_max_batch', type=int,
                 default=None, help='Speculate only while the engine holds at most this many requests '
                 '(default engine.speculative_max_batch, 4); larger batches decode plainly.')


def values(args: argparse.Namespace) -> dict:
  """serve_command's speculative decoding arguments from the parsed flags."""
  return dict(draft_checkpoint=args.draft_checkpoint, draft_hf_dir=args.draft_hf_dir,
              speculative=args.speculative, num_speculative_tokens=args.num_speculative_tokens,
              speculative_max_batch=args.speculative_max_batch,
              draft_weight_dtype=None if args.draft_weight_dtype == 'none' else args.draft_weight_dtype)
