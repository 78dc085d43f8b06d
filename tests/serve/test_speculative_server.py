"""Speculative decoding in the server, through the official `openai` client (acceptance 1, server
side): a draft model (on a 2-way tensor-parallel mesh) and prompt lookup return exactly what the same
server without speculation does, for mixed prompt lengths, concurrent requests on a pool small enough
to preempt, shared prompts (the prefix cache), stop strings and max_tokens; /metrics reports the acceptance rate, accepted tokens per verification and drafter time.
And `stoker serve`'s start-up errors (acceptance 5): a bad k, a drafter of another vocabulary."""

import argparse
import concurrent.futures
import dataclasses
import json

import httpx2 as httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

import cli
from serve import command, loader, spec_flags, speculative
from serve.server import BackgroundServer, ServerConfig, Service
from tests.serve.server_fixtures import ENGINE

pytestmark = pytest.mark.xdist_group('server')

# 13 usable pages of 8 tokens for 4 slots of up to 80 tokens each: concurrent requests preempt.
SMALL = dataclasses.replace(ENGINE, num_pages=14, max_pages_per_seq=10)
PROMPTS = ['def', 'import json\nimport os\n\ndef load(path):\n    with open(path) as f:\n        return',
           'a b c a b c a b c a b', 'The quick brown fox jumps over the lazy dog. The quick brown',
           'x = 1\ny = 2\nz = x + y\nprint(z)\nx = 1\ny =', '{"key": "value", "list": [1, 2, 3], "key":']
REQUESTS = [dict(prompt=p, max_tokens=m, stop=s)
            for p, m, s in zip(PROMPTS * 2, [20, 7, 25, 3, 30, 12] * 2,
                               [None, None, ['e'], None, [' ', '\n'], None] * 2)]


def start(load):
  background = BackgroundServer(Service(ServerConfig(port=0, model_name='run'), load)).start()
  background.wait_ready(180)
  return background


@pytest.fixture(scope='module')
def servers(server_workdir):
  made = {
      'off': start(command.make_load(SMALL, checkpoint=server_workdir)),
      'ngram': start(command.make_load(
          command.speculative_config(SMALL, None, 'ngram', 3, 16), checkpoint=server_workdir)),
      # The served model drafts for itself, its weights as loaded (the plumbing, every greedy draft
      # accepted), both models sharded over a 2-way tensor-parallel mesh.
      'draft': start(command.make_load(command.speculative_config(SMALL, server_workdir, None, 3, 16),
                                       checkpoint=server_workdir, draft_checkpoint=server_workdir,
                                       mesh=loader.serving_mesh(2), draft_weight_dtype=None)),
  }
  yield made
  for background in made.values():
    background.stop()


def complete_all(url):
  client = openai.OpenAI(base_url=url + '/v1', api_key='none', max_retries=0, timeout=120)

  def one(request):
    r = client.completions.create(model='run', temperature=0, extra_body={'ignore_eos': True}, **request)
    return r.choices[0].text, r.choices[0].finish_reason, r.usage.completion_tokens

  with concurrent.futures.ThreadPoolExecutor(4) as pool:
    return list(pool.map(one, REQUESTS))


def metrics(url):
  text = httpx.get(url + '/metrics', timeout=30).text
  return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}


def complete_preempting(server, want=None):
  """complete_all until the server's pool has preempted (whether 4 concurrent requests meet in it
  depends on their arrival: with a drafter accepting every draft they may finish first), at most
  3 rounds; each round's outputs must equal `want` (the first round's when None)."""
  for _ in range(3):
    got = complete_all(server.url)
    want = got if want is None else want
    assert got == want
    if metrics(server.url)['stoker_preemptions_total'] > 0:
      break
  return want


def test_outputs_equal_speculation_off(servers):
  off = complete_preempting(servers['off'])
  assert any(reason == 'stop' for _, reason, _ in off) and any(reason == 'length' for _, reason, _ in off)
  for name in ('ngram', 'draft'):
    complete_preempting(servers[name], off)
    m = metrics(servers[name].url)
    assert m['stoker_spec_decode_verifications_total'] > 0
    assert 0 < m['stoker_spec_decode_acceptance_rate'] <= 1
    assert m['stoker_spec_decode_mean_accepted_tokens'] > 0
    assert m['stoker_spec_decode_drafter_seconds_total'] > 0
  assert metrics(servers['draft'].url)['stoker_spec_decode_acceptance_rate'] == 1.0  # drafting for itself
  # A request may opt out (the `speculative` extension): no verification for it, the same text.
  client = openai.OpenAI(base_url=servers['ngram'].url + '/v1', api_key='none', max_retries=0, timeout=120)
  before = metrics(servers['ngram'].url)['stoker_spec_decode_verifications_total']
  r = client.completions.create(model='run', temperature=0, extra_body={'ignore_eos': True, 'speculative': False},
                                **REQUESTS[2])
  assert (r.choices[0].text, r.choices[0].finish_reason, r.usage.completion_tokens) == off[2]
  assert metrics(servers['ngram'].url)['stoker_spec_decode_verifications_total'] == before
  for name in servers:
    assert metrics(servers[name].url)['stoker_preemptions_total'] > 0, f'{name}: the small pool should preempt'
  assert servers['draft'].service.loaded.engine.mesh.shape['tensor'] == 2
  for background in servers.values():
    allocator = background.service.loaded.engine.scheduler.allocator
    allocator.check()
    assert allocator.num_used == 0


def test_bad_configuration_is_a_start_up_error(server_workdir, tmp_path):
  with pytest.raises(ValueError, match='num_speculative_tokens=0'):
    command.speculative_config(SMALL, None, 'ngram', 0, None)
  with pytest.raises(ValueError, match='token_budget=32'):
    command.speculative_config(SMALL, server_workdir, None, 40, None)
  with pytest.raises(ValueError, match='without a drafter'):
    command.speculative_config(SMALL, None, None, 3, None)
  other = tmp_path / 'other'
  other.mkdir()
  (other / 'config.json').write_text(json.dumps(dict(
      model_type='llama', architectures=['LlamaForCausalLM'], vocab_size=128, hidden_size=64,
      intermediate_size=128, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
      head_dim=16, rms_norm_eps=1e-5)))
  with pytest.raises(ValueError, match='vocabulary of 128 tokens, the served model 320'):
    command.check_drafter(server_workdir, None, str(other), None)


@pytest.mark.parametrize('flags,message', [
    (['--speculative', 'ngram', '--num-speculative-tokens', '0'], 'num_speculative_tokens=0'),
    (['--speculative', 'ngram', '--num-speculative-tokens', '300'], 'more than token_budget'),
    (['--num-speculative-tokens', '3'], 'without a drafter'),
])
def test_stoker_serve_refuses_a_bad_configuration_before_binding(server_workdir, capsys, flags, message):
  code = cli.main(['serve', '--checkpoint', server_workdir, '--port', '0', *flags])
  err = capsys.readouterr().err
  assert code == 2 and message in err and 'Traceback' not in err, err[-2000:]


def test_draft_weight_dtype_flag():
  """--draft-weight-dtype: auto (the default) drafts with int8 weights on CPU, none keeps them as loaded."""
  parser = argparse.ArgumentParser()
  spec_flags.add_arguments(parser)
  assert spec_flags.values(parser.parse_args([]))['draft_weight_dtype'] == 'auto'
  assert spec_flags.values(parser.parse_args(['--draft-weight-dtype', 'none']))['draft_weight_dtype'] is None
  target = command.speculative_config(SMALL, 'drafter', None, 3, None)
  assert speculative.draft_engine_config(target).weight_dtype == 'int8'  # the suite runs on CPU
  assert speculative.draft_engine_config(target, None).weight_dtype == target.weight_dtype
