"""`stoker rl` (rl/loop.py) on a 2-layer model: the command runs and logs what it should (and survives a
raising reward); after every step the engine's distribution for a prefix-cached prompt equals the
trainer's (numpy log_softmax of the model run densely on the trainer's params); and a run interrupted
by a just-in-time failure resumes and ends bitwise equal to an uninterrupted run."""

import json
import os

import jax
import numpy as np
import pytest
from flax import nnx

import cli
from rl import loop
from rl.config import load_rl_config
from rl.step import graphdef_of
from serve.sampling import SamplingParams
from tests.rl.tiny import GIN, TINY
from train import checkpoint, faults, finetune

TOL = 1e-4  # float32 (DESIGN.md): the engine's paged step against the dense model


def raising(row, completion):
  """A reward with a bug: it raises on every completion."""
  raise KeyError('no_such_field')


def test_stoker_rl_runs_logs_and_survives_a_raising_reward(tmp_path, capsys):
  workdir = str(tmp_path / 'run')
  params = TINY + ['rl.steps = 2', 'rl.eval_every = 2', "rl.normalisation = 'token'", 'rl.scale_std = False',
                   "rl.reward_fns = ('exact_answer', 'answer_format', 'tests.rl.test_loop:raising')",
                   'rl.reward_weights = (1.0, 0.1, 1.0)']
  code = cli.main(['rl', '--gin_file', GIN, '--workdir', workdir] +
                  [a for p in params for a in ('--gin_param', p)])
  assert code == 0, capsys.readouterr().err
  assert 'Ran 2 GRPO steps' in capsys.readouterr().out
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    records = [json.loads(line) for line in f]
  assert [r['step'] for r in records] == [0, 1, 2]
  assert 'eval_exact_answer' in records[0] and 'eval_exact_answer' in records[2]
  for r in records[1:]:
    for key in ('reward_exact_answer_mean', 'reward_answer_format_std', 'kl', 'clip_fraction',
                'response_length', 'sample_s', 'score_s', 'train_s', 'sample_tokens_per_s'):
      assert np.isfinite(r[key]), key
    assert r['reward_tests.rl.test_loop:raising_mean'] == 0.0  # raised: scored 0, run went on
    assert 1 <= r['response_length'] <= 4
    assert r['sampler_gap'] < TOL  # the first mini-batch: trainer and engine hold the same weights
  assert checkpoint.restore_arrays(workdir)[0] == 2
  assert os.path.exists(os.path.join(workdir, 'task', 'prompts-held-out.jsonl'))


def _serves_the_trainers_weights(cfg, workdir):
  """Runs `cfg`, checking after every step that the engine's distribution for a prefix-cached
  prompt is the trainer's (with LoRA: the base with the trained adapters attached)."""
  graphdef = graphdef_of(cfg.model)
  dense = jax.jit(lambda p, ids: nnx.merge(graphdef, p)(ids[None])[0, -1])
  seen = []

  def check(run, step):
    engine = run.engine
    prompt = run.tokenizer.encode('12+34=46 57+68=12', add_special_tokens=False).ids  # 4 full pages
    params = finetune.attach(cfg, run.state.params, run.frozen.get('base'))  # as the trainer runs it
    logits = np.asarray(dense(params, np.asarray(prompt)), np.float64)
    want = logits - np.logaddexp.reduce(logits)
    computed = []
    for _ in range(2):  # cold (the update flushed the cache), then from the prefix cache
      before = engine.stats['tokens']
      engine.add_request(f'probe-{step}-{len(computed)}', prompt, SamplingParams(
          max_tokens=1, temperature=0.0, logprobs=cfg.model.vocab_size))
      outs = []
      while engine.has_work:
        outs += engine.step()
      computed.append(engine.stats['tokens'] - before)
      (entry,) = [o.logprobs[0] for o in outs if o.logprobs]
      got = np.full(cfg.model.vocab_size, np.nan)
      for token, lp in entry.top:
        got[token] = lp
      np.testing.assert_allclose(got, want, atol=TOL)
    # Step 1 aside, the prompt's pages were cached (by the last call) before this step's update.
    page = cfg.engine.page_size
    assert computed == [len(prompt), len(prompt) - (len(prompt) - 1) // page * page], computed
    assert engine.scheduler.allocator.num_cached >= len(prompt) // page
    seen.append(want)

  loop.train(cfg, workdir, on_step=check, progress=False)
  assert len(seen) == cfg.steps
  assert all(np.abs(a - b).max() > 1e-3 for a, b in zip(seen, seen[1:]))  # the weights moved


def test_after_each_step_the_engine_serves_the_trainers_weights(tmp_path):
  base = str(tmp_path / 'full')
  _serves_the_trainers_weights(load_rl_config([GIN], TINY + ['rl.steps = 3']), base)
  # LoRA over that run's policy: the engine samples with the adapters merged into the base.
  _serves_the_trainers_weights(load_rl_config([GIN], TINY + [
      'rl.steps = 2', f"lora.base = '{base}'", 'lora.rank = 4', 'rl.beta = 0.1']), str(tmp_path / 'lora'))


def _final_state(workdir):
  return jax.tree.leaves(checkpoint.restore_arrays(workdir)[1])


@pytest.mark.parametrize('fail_at', [2])
def test_a_run_failing_just_in_time_resumes_bitwise_equal(tmp_path, fail_at):
  params = TINY + ['rl.steps = 4', 'rl.beta = 0.05', 'rl.eval_every = 3']
  whole = str(tmp_path / 'whole')
  logged = loop.train(load_rl_config([GIN], params), whole, progress=False)
  broken = str(tmp_path / 'broken')
  cfg = load_rl_config([GIN], params + ["fault.kind = 'exception'", f'fault.step = {fail_at}'])
  with pytest.raises(faults.TrainingInterrupted) as e:
    loop.train(cfg, broken, progress=False)
  assert e.value.exit_code == faults.EXIT_STEP_FAILED and e.value.saved_step == fail_at
  resumed = loop.train(cfg, broken, progress=False)
  assert [r['step'] for r in resumed] == list(range(fail_at + 1, 5))
  by_step = {r['step']: r for r in logged}
  for b in resumed:  # the same samples and rewards, the same updates
    a = by_step[b['step']]
    assert {k: v for k, v in a.items() if not k.endswith(('_s', '_per_s', 'time'))} == \
           {k: v for k, v in b.items() if not k.endswith(('_s', '_per_s', 'time'))}
  assert logged[-1]['kl'] > 0
  for x, y in zip(_final_state(whole), _final_state(broken), strict=True):
    assert np.array_equal(x, y)


@pytest.mark.parametrize('binding, message', [
    ('rl.minibatches = 3', 'multiple of rl.minibatches'),
    ('rl.group_size = 1', 'group needs 2 or more'),
    ("rl.normalisation = 'mean'", "rl.normalisation='mean'"),
    ('rl.reward_weights = (1.0,)', '1 weights for 2 reward_fns'),
    ('engine.max_seqs = 2', 'raise engine.max_seqs'),
    ("lora.base = 'x'", 'leave rl.init empty'),
])
def test_bad_configs_name_the_problem_and_the_fix(binding, message):
  extra = ["rl.init = 'y'"] if 'lora' in binding else []
  with pytest.raises(ValueError, match=message):
    load_rl_config([GIN], TINY + [binding] + extra)
