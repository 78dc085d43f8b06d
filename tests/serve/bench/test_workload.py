"""serve/bench/workload.py and prompts.py: seeded arrivals and lengths, traces, exact prompt token counts."""

import numpy as np
import pytest

from serve.bench import prompts, workload
from serve.bench.workload import WorkloadConfig
from tests.serve.bench.fixtures import tiny_tokenizer


def test_same_seed_same_workload_and_independent_streams():
  cfg = WorkloadConfig.parse('requests=50,arrival=gamma,rate=4,burstiness=0.5,prompt=zipf:1.1:8:64,'
                             'output=uniform:4:32,seed=3')
  assert workload.build(cfg) == workload.build(cfg)
  other_rate = workload.build(workload.with_rate(cfg, 8.0))
  # Only the arrivals change with the rate: the lengths come from their own streams.
  assert [(s.prompt_tokens, s.output_tokens) for s in other_rate] == [
      (s.prompt_tokens, s.output_tokens) for s in workload.build(cfg)]
  other_output = workload.build(WorkloadConfig.parse('', **{**cfg.__dict__, 'output': 'fixed:9'}))
  assert [s.arrival_s for s in other_output] == [s.arrival_s for s in workload.build(cfg)]
  assert workload.build(WorkloadConfig(seed=4)) != workload.build(WorkloadConfig(seed=0))


def test_arrival_processes():
  fixed = workload.build(WorkloadConfig(requests=5, arrival='fixed', rate=4.0))
  assert [s.arrival_s for s in fixed] == [0.0, 0.25, 0.5, 0.75, 1.0]
  assert {s.arrival_s for s in workload.build(WorkloadConfig(requests=4, rate=float('inf')))} == {0.0}
  n, rate = 4000, 5.0
  for arrival, burstiness, cv in (('poisson', 1.0, 1.0), ('gamma', 0.25, 2.0), ('gamma', 4.0, 0.5)):
    t = [s.arrival_s for s in workload.build(WorkloadConfig(requests=n, arrival=arrival, rate=rate,
                                                            burstiness=burstiness))]
    gaps = np.diff(t)
    # Mean gap 1/rate; coefficient of variation 1/sqrt(shape). 4000 samples: a few percent of noise.
    assert gaps.mean() == pytest.approx(1 / rate, rel=0.1)
    assert gaps.std() / gaps.mean() == pytest.approx(cv, rel=0.15)


def test_length_distributions():
  rng = np.random.default_rng(0)
  u = workload.LengthSpec.parse('uniform:3:5', 'prompt').sample(rng, 3000)
  assert set(u.tolist()) == {3, 4, 5}
  z = workload.LengthSpec.parse('zipf:1.0:10:13', 'prompt').sample(rng, 20000)
  # P(n) ~ 1 / (n - 9): weights 1, 1/2, 1/3, 1/4 over 10..13 (sum 25/12).
  freq = np.bincount(z - 10, minlength=4) / z.size
  assert freq == pytest.approx(np.array([1, 1 / 2, 1 / 3, 1 / 4]) * 12 / 25, abs=0.01)
  for bad in ('uniform:5:3', 'zipf:0:1:3', 'fixed:0', 'normal:3', 'fixed:x'):
    with pytest.raises(ValueError, match='prompt='):
      workload.LengthSpec.parse(bad, 'prompt')


def test_trace(tmp_path):
  path = tmp_path / 'trace.csv'
  path.write_text('num_prefill_tokens,num_decode_tokens,arrived_at\n100,10,5.0\n200,20,5.5\n300,30,7.0\n')
  cfg = WorkloadConfig(requests=3, arrival='trace', prompt='trace', output='trace', trace=str(path))
  assert workload.build(cfg) == [(0, 0.0, 100, 10), (1, 0.5, 200, 20), (2, 2.0, 300, 30)]
  wrapped = workload.build(WorkloadConfig(requests=5, prompt='trace', output='fixed:2', trace=str(path)))
  assert [s.prompt_tokens for s in wrapped] == [100, 200, 300, 100, 200]
  with pytest.raises(ValueError, match='3 rows'):
    workload.build(WorkloadConfig(requests=4, arrival='trace', trace=str(path)))
  with pytest.raises(ValueError, match='capacity search'):
    workload.with_rate(cfg, 2.0)
  bad = tmp_path / 'bad.csv'
  bad.write_text('prompt,output\n1,2\n')
  with pytest.raises(ValueError, match='num_prefill_tokens,num_decode_tokens'):
    workload.build(WorkloadConfig(prompt='trace', trace=str(bad)))


def test_parse_errors_name_the_key():
  with pytest.raises(ValueError, match="'colour=red'.*key one of requests"):
    WorkloadConfig.parse('colour=red')
  with pytest.raises(ValueError, match="rate='fast'"):
    WorkloadConfig.parse('rate=fast')
  with pytest.raises(ValueError, match='arrival='):
    WorkloadConfig.parse('arrival=weibull')
  with pytest.raises(ValueError, match='trace=PATH'):
    WorkloadConfig.parse('prompt=trace')


@pytest.fixture(scope='module')
def tokenizer():
  return tiny_tokenizer()


def test_prompts_have_exact_token_counts(tokenizer):
  builder = prompts.PromptBuilder(tokenizer, seed=0)
  assert len(builder.words) >= prompts.MIN_WORDS
  for n in (1, 2, 17, 100, 513):
    text = builder.build(n, index=n)
    assert len(tokenizer.encode(text, add_special_tokens=False).ids) == n
  assert builder.build(50, 1) == builder.build(50, 1)
  assert builder.build(50, 1) != builder.build(50, 2) != builder.build(50, 1, salt=1)
  # Prompts of one run share no prefix (a prefix cache could not shortcut their prefill).
  firsts = {builder.build(64, i)[:40] for i in range(20)}
  assert len(firsts) == 20
