"""The DPO loss and its metrics against a numpy reference written from the paper's formula."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from train import dpo


def _log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_sequence_logprobs_sum_the_masked_target_logprobs():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(3, 5, 11)).astype(np.float32)
  targets = rng.integers(0, 11, (3, 5))
  mask = (rng.random((3, 5)) < 0.6).astype(np.float32)
  expect = [sum(_log_softmax(logits[b, t])[targets[b, t]] for t in range(5) if mask[b, t])
            for b in range(3)]
  np.testing.assert_allclose(dpo.sequence_logprobs(logits, targets, mask), expect, rtol=1e-5,
                             atol=1e-5)


@pytest.mark.parametrize('beta,eps', [(0.1, 0.0), (0.5, 0.2)])
def test_loss_rewards_and_metrics_match_numpy(beta, eps):
  rng = np.random.default_rng(1)
  pc, pr, rc, rr = (rng.normal(-20, 4, 16) for _ in range(4))
  z = beta * ((pc - rc) - (pr - rr))
  log_sigmoid = lambda v: -np.log1p(np.exp(-v))
  expect = -(1 - eps) * log_sigmoid(z) - eps * log_sigmoid(-z)
  loss, chosen, rejected = dpo.losses(*(jnp.asarray(x) for x in (pc, pr, rc, rr)), beta, eps)
  np.testing.assert_allclose(loss, expect, rtol=1e-5)
  np.testing.assert_allclose(chosen - rejected, z, rtol=1e-5, atol=1e-5)
  m = dpo.metrics(loss, chosen, rejected, jnp.asarray(pc), jnp.asarray(pr))
  assert float(m['reward_accuracy']) == pytest.approx(np.mean(z > 0))
  assert float(m['reward_margin']) == pytest.approx(np.mean(z), rel=1e-5)
  assert float(m['dpo_loss']) == pytest.approx(np.mean(expect), rel=1e-5)


def test_gradient_pushes_chosen_up_and_rejected_down():
  g = jax.grad(lambda c, r: dpo.losses(c, r, jnp.zeros(1), jnp.zeros(1), 0.1)[0].sum(), (0, 1))(
      jnp.zeros(1), jnp.zeros(1))
  assert float(g[0][0]) < 0 < float(g[1][0])  # descending the loss raises log pi(y+), lowers log pi(y-)
  # At z = 0 the slope is beta / 2 per pair: -d loss / d log pi(y+) = beta * sigmoid(-z).
  assert float(g[0][0]) == pytest.approx(-0.05)


def test_dpo_with_lora_learns_held_out_preferences(tmp_path):
  """Synthetic preferences: after any prompt, an answer with a word of one set is preferred to one
  with a word of another. The held-out reward accuracy (ties count half) starts at 0.5, where the
  policy is its reference, and must reach 0.9, the margin growing."""
  import json
  from flax import nnx
  import configs
  from data import prepare, preference, source
  from models import checkpoint_io
  from models.transformer import Transformer
  from train.loop import train

  rng = np.random.default_rng(0)
  good, bad = ['great', 'fine', 'nice', 'good', 'super'], ['awful', 'poor', 'bad', 'weak', 'dull']
  topics = ['tea', 'rain', 'code', 'maps', 'jazz', 'bread', 'snow', 'boats', 'chess', 'glass']
  rows = [{'prompt': f'How is the {t} {n}?', 'chosen': f' It is {rng.choice(good)}.',
           'rejected': f' It is {rng.choice(bad)}.'} for n in range(40) for t in topics[:3]]
  (tmp_path / 'pairs.jsonl').write_text('\n'.join(json.dumps(r) for r in rows) + '\n')
  data = str(tmp_path / 'data')
  prepare.prepare(prepare.PrepareConfig(source=str(tmp_path / 'pairs.jsonl'), format='preference',
                                        train_tokenizer=True, vocab_size=300,
                                        validation_fraction=0.2), data)
  params = ['model.num_layers=2', 'model.d_model=64', 'model.num_heads=4', 'model.num_kv_heads=2',
            'model.head_dim=16', 'model.mlp_dim=128', 'model.vocab_size=512', 'data.eval_every=0',
            'train.seq_len=24', 'train.batch_size=16', 'train.log_every=1',
            'checkpoint.every_steps=0', 'optimizer.warmup_steps=0']
  base = str(tmp_path / 'base')
  train(configs.load_train_config(['train/tiny_cpu.gin'], params + ["data.source='synthetic'",
                                                                     'train.steps=1']),
        base, progress=False)
  cfg = configs.load_train_config(['train/tiny_cpu.gin'], params + [
      f"data.source='{data}'", 'train.steps=40', f"lora.base='{base}'", 'lora.rank=4',
      'lora.alpha=8.0', 'dpo.beta=0.5', 'optimizer.learning_rate=0.01', 'train.microbatches=2'])
  logged = train(cfg, str(tmp_path / 'dpo'), progress=False)
  steps = [r for r in logged if "reward_accuracy" in r]
  assert len(steps) == 40 and steps[-1]['reward_margin'] > steps[0]['reward_margin']

  val = source.open_split(data, 'validation')
  pairs = preference.PreferenceBatches(val, seq_len=24, pairs=len(val) // 2)
  batch = next(pairs)  # every held-out pair once
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: Transformer(cfg.model, nnx.Rngs(0))))

  def rewards(path):
    logits = nnx.merge(graphdef, checkpoint_io.load(path)[1])(
        batch['inputs'], batch['positions'], batch['segment_ids'])
    return dpo.sequence_logprobs(logits, batch['targets'], batch['loss_mask'])

  margin = cfg.dpo.beta * (rewards(str(tmp_path / 'dpo')) - rewards(base))
  P = margin.shape[0] // 2
  z = np.asarray(margin[:P] - margin[P:])
  accuracy = float(np.mean((z > 0) + 0.5 * (z == 0)))
  assert P >= 20 and accuracy >= 0.9, (P, accuracy)
