"""benchmarks/serve_engine.py's limits and server sections (issue 21): the model-FLOPs count against
the parameter shapes, and one smoke run of the new sections on the tiny preset at tiny sizes."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from models import presets, transformer

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.append(os.path.join(REPO, 'benchmarks'))  # the benchmarks' own modules

import _engine_limits as limits  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position


def shape_count(cfg) -> int:
  """Sizes of the weights a token multiplies, read off the model's own parameter shapes."""
  _, state = nnx.split(nnx.eval_shape(lambda: transformer.Transformer(cfg, nnx.Rngs(0))))
  total = 0
  for path, x in jax.tree_util.tree_flatten_with_path(state)[0]:
    name = jax.tree_util.keystr(path)
    if 'scale' in name or 'bias' in name or ('embed_VD' in name and not cfg.tie_embeddings):
      continue  # norms, biases, and an embedding table that is only looked up
    total += x.size
  return total


@pytest.mark.parametrize('name', ['tiny', 'small', 'qwen2_0_5b', 'qwen3_0_6b'])
def test_matmul_params_match_the_parameter_shapes(name):
  cfg = presets.preset(name)
  assert limits.matmul_params(cfg) == shape_count(cfg)


def test_generate_flops_counts_every_position_but_the_last_sampled():
  cfg = presets.preset('tiny')
  P, per_context = limits.matmul_params(cfg), 4 * cfg.num_layers * cfg.num_heads * cfg.head_dim
  # prompt 3, 2 new tokens: positions 0..3 (4 tokens), attending to 1, 2, 3 and 4 positions;
  # prompt 1, 2 new tokens: positions 0..1, attending to 1 and 2.
  expected = 2 * P * 4 + per_context * 10 + 2 * P * 2 + per_context * 3
  assert limits.generate_flops(cfg, [3, 1], 2) == pytest.approx(expected, rel=1e-12)
  assert limits.forward_flops(cfg, np.full(16, 256)) == pytest.approx(
      2 * P * 16 + per_context * 16 * 256, rel=1e-12)


def test_step_split_is_ms_per_step_and_reads_missing_keys_as_zero():
  before = {'steps': 10, 'host_s': 1.0, 'wait_s': 0.5}
  after = {'steps': 30, 'host_s': 3.0, 'wait_s': 1.5}  # no plan_s ... output_s: an older engine
  split = limits.step_split(before, after)
  assert split == {'steps': 20, 'plan': 0.0, 'build': 0.0, 'wait': 50.0, 'update': 0.0,
                   'output': 0.0, 'host': 100.0}


def test_new_sections_run_on_the_tiny_preset(tmp_path):
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}  # the script sets 1 device
  cmd = [sys.executable, os.path.join(REPO, 'benchmarks', 'serve_engine.py'),
         '--sections', 'throughput,limits,server', '--preset', 'tiny', '--limits_preset', 'tiny',
         '--runs', '1', '--num_prompts', '4', '--batch', '4', '--prompt_len', '4,12',
         '--max_tokens', '4', '--token_budget', '32', '--limits_seqs', '4',
         '--limits_context', '32', '--limits_steps', '2', '--server_requests', '4',
         '--server_prompt_len', '8,16', '--server_max_tokens', '4', '--probe_mib', '16',
         '--out_dir', str(tmp_path)]
  result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  for text in ('probes (start / end): matmul peak', 'of peak', 'engine per step over the timed',
               "Decode step at the machine's limit", 'host overhead',
               'stoker serve at saturation vs Engine.generate', 'the whole server process'):
    assert text in result.stdout, (text, result.stdout)
  with open(tmp_path / 'serve_engine.json') as f:
    report = json.load(f)
  assert set(report['probes']) == {'start', 'end'}
  assert report['probes']['start']['bandwidth']['bytes'] == 16 << 20
  assert all(0 < r['peak_share'] for r in report['throughput']['peers'].values())
  assert report['throughput']['engine_step_split_ms']['steps'] > 0
  lim = report['limits']
  assert lim['limit_s'] == max(lim['compute_s'], lim['memory_s']) > 0
  assert lim['engine_step']['over_limit'] > 0 and len(lim['host_overhead']) == 1
  server = report['server']
  assert server['server_tokens_per_sec'] > 0 and server['server_cpu_ms_per_token'] > 0
  assert server['engine_config']['max_seqs'] == 4
