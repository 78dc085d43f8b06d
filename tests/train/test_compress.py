"""A pruned model is a first-class model: on a briefly trained tiny teacher (stdlib corpus), importance
ranking beats random and least-important choices; the pruned workdir serves, exports to
`transformers` with equal logits, trains on, and distils with a bitwise resume after a just-in-time
checkpoint; bad input is refused before anything is written."""

import dataclasses
import json
import os
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import configs
from models import checkpoint_io, quant
from parallelism.mesh import make_mesh
from train import distill, faults, prune
from train.checkpoint import restore_arrays
from train.loop import train
from train.metrics import read_metrics

pytestmark = pytest.mark.xdist_group('compress')

TEACHER = ['model.num_layers=2', 'model.d_model=64', 'model.num_heads=4', 'model.num_kv_heads=2',
           'model.head_dim=16', 'model.mlp_dim=256', "data.source='stdlib'", 'data.eval_every=0',
           'train.steps=120', 'train.batch_size=8', 'train.seq_len=64', 'train.log_every=60',
           'checkpoint.every_steps=0', 'optimizer.warmup_steps=10']
SHORT = ['train.steps=4', 'train.log_every=1', 'optimizer.warmup_steps=1']


def assert_bitwise_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.dtype == y.dtype and np.array_equal(x, y)


def stoker(*argv) -> int:
  import cli
  return cli.main(list(argv))


@pytest.fixture(scope='module')
def teacher(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('teacher') / 'w')
  cfg = configs.load_train_config(['train/tiny_cpu.gin'], TEACHER)
  train(cfg, workdir, progress=False)
  return workdir, cfg


@pytest.fixture(scope='module')
def pruned(teacher, tmp_path_factory):
  out = str(tmp_path_factory.mktemp('pruned') / 'w2')
  assert stoker('prune', '--checkpoint', teacher[0], '--out', out, '--layers-keep', '0.5',
                '--calibration-batches', '4') == 0
  with open(os.path.join(out, 'prune.json')) as f:
    return out, json.load(f)


def _perplexity(cfg, params, batches):
  model = prune._model(cfg, params)  # pylint: disable=protected-access

  @nnx.jit
  def nll(model, batch):
    logits = model(batch['inputs'], batch['positions'], batch['segment_ids'])
    logz = jax.nn.logsumexp(logits, -1)
    target = jnp.take_along_axis(logits, batch['targets'][..., None], -1)[..., 0]
    return jnp.sum((logz - target) * batch['loss_mask']), jnp.sum(batch['loss_mask'])

  sums = np.sum([np.asarray(nll(model, b)) for b in batches], axis=0)
  return float(np.exp(sums[0] / sums[1]))


def test_keeping_the_important_half_of_the_mlp_beats_random_and_least_important(teacher):
  workdir, cfg = teacher
  from train import datasets
  with datasets.validation_batches(cfg, datasets.data_dir(cfg)) as val:
    batches = [{k: np.asarray(v) for k, v in b.items()} for b, _ in zip(val, range(16))]
  calibration, held_out = batches[:8], batches[8:]
  model_cfg, params = checkpoint_io.load(workdir)
  params = prune.stack_layers(jax.tree.map(np.asarray, nnx.to_pure_dict(params)))
  scores = prune.activation_stats(model_cfg, params, calibration)['neurons']
  L, F = scores.shape
  choices = {'important': [np.sort(np.argsort(-s)[:F // 2]) for s in scores],
             'least': [np.sort(np.argsort(s)[:F // 2]) for s in scores],
             'random': [np.sort(np.random.default_rng(i).permutation(F)[:F // 2]) for i in range(L)]}
  ppl = {}
  for name, neurons in choices.items():
    keep = prune.Keep(np.arange(L), np.tile(np.arange(model_cfg.num_kv_heads), (L, 1)),
                      np.stack(neurons), np.arange(model_cfg.d_model))
    ppl[name] = _perplexity(prune.pruned_config(model_cfg, keep),
                            prune.slice_params(model_cfg, params, keep), held_out)
  assert ppl['important'] < ppl['random'] < ppl['least'], ppl


def test_pruning_writes_an_ordinary_step0_workdir(teacher, pruned):
  out, saved = pruned
  assert saved['sizes'] == {'num_layers': [2, 1], 'num_heads': [4, 2], 'num_kv_heads': [2, 1],
                            'mlp_dim': [256, 128], 'd_model': [64, 64]}
  assert saved['command'] == (f'stoker prune --checkpoint {teacher[0]} --out {out} --layers-keep 0.5 '
                              '--calibration-batches 4')
  assert len(saved['removed']['layers']) == 1 and len(saved['scores']['blocks']) == 2
  kept = [i for i in range(2) if i not in saved['removed']['layers']][0]
  assert len(saved['removed']['mlp_neurons'][str(kept)]) == 128
  assert os.path.isfile(os.path.join(out, 'hf', 'tokenizer.json'))
  cfg = configs.load_train_config([os.path.join(out, 'train.gin')])
  assert (cfg.model.num_layers, cfg.model.mlp_dim, cfg.model.num_heads) == (1, 128, 2)
  assert cfg.data == teacher[1].data and cfg.optimizer == teacher[1].optimizer
  step, arrays = restore_arrays(out)
  assert step == 0 and int(arrays['step']) == 0
  moments = [x for path, x in jax.tree_util.tree_flatten_with_path(arrays['opt_state'])[0]
             if any(getattr(k, 'key', None) in ('mu', 'nu') for k in path)]
  assert moments and not any(np.any(m) for m in moments)  # a fresh optimizer


def test_the_pruned_model_serves_exports_and_trains_on(pruned, tmp_path):
  import torch
  import transformers
  from serve import loader
  from serve.engine import EngineConfig
  from serve.sampling import SamplingParams
  out, _ = pruned
  loaded = loader.load_checkpoint(out, EngineConfig(num_pages=16, page_size=8, max_seqs=2,
                                                    max_pages_per_seq=4, token_budget=32,
                                                    min_bucket=32))
  ids = loaded.codec.encode('def main():')
  generated = loaded.engine.generate([ids], SamplingParams(max_tokens=6))
  assert len(generated[0]) == 6

  hf_dir = str(tmp_path / 'hf')
  checkpoint_io.to_hf(out, hf_dir)
  model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
  cfg, params = checkpoint_io.read_params(out)
  tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 16)).astype(np.int32)
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: prune._model(cfg, prune.stack_layers(  # pylint: disable=protected-access
      jax.tree.map(np.asarray, nnx.to_pure_dict(params))))))
  got = np.asarray(jax.jit(lambda p, t: nnx.merge(graphdef, p)(t))(params, jnp.asarray(tokens)))
  with torch.no_grad():
    want = model(torch.as_tensor(tokens)).logits.numpy()
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)

  work = str(tmp_path / 'continued')
  shutil.copytree(out, work)
  logged = train(configs.load_train_config([os.path.join(work, 'train.gin')], SHORT), work,
                 progress=False)
  assert [r['step'] for r in logged] == [1, 2, 3, 4] and restore_arrays(work)[0] == 4


def test_distillation_logs_kl_and_ce_and_resumes_bitwise_after_a_failure(teacher, pruned, tmp_path):
  out, _ = pruned
  params = SHORT + [f"distill.teacher='{teacher[0]}'", 'distill.temperature=2.0']
  runs = {}
  for name in ('reference', 'interrupted'):
    runs[name] = str(tmp_path / name)
    shutil.copytree(out, runs[name])
  gin = [os.path.join(out, 'train.gin')]
  train(configs.load_train_config(gin, params), runs['reference'], progress=False)
  metrics = read_metrics(runs['reference'])
  assert all(r['kl'] > 0 and r['ce'] == r['loss'] for r in metrics)
  cfg = configs.load_train_config(gin, params + ["fault.kind='exception'", 'fault.step=2'])
  with pytest.raises(faults.TrainingInterrupted) as raised:
    train(cfg, runs['interrupted'], progress=False)
  assert raised.value.saved_step == 2
  logged = train(cfg, runs['interrupted'], progress=False)
  assert logged[0]['step'] == 3
  assert_bitwise_equal(restore_arrays(runs['interrupted'])[1], restore_arrays(runs['reference'])[1])


def test_an_int8_teacher_is_a_quarter_of_the_bytes_and_distils_like_its_float_self(teacher, pruned, tmp_path):
  out, _ = pruned
  gin, params = [os.path.join(out, 'train.gin')], SHORT + [f"distill.teacher='{teacher[0]}'"]
  cfg = configs.load_train_config(gin, params + ["distill.teacher_dtype='int8'", 'train.steps=2'])
  mesh = make_mesh(cfg.mesh)
  floats, int8 = (distill.load_teacher(c, mesh) for c in (configs.load_train_config(gin, params), cfg))
  assert quant.nbytes(int8.params) < 0.27 * quant.nbytes(floats.params)
  assert sum(isinstance(x, quant.Int8) for x in jax.tree.leaves(
      int8.params, is_leaf=lambda x: isinstance(x, quant.Int8))) == 9  # 7 stacked matrices, embedding, LM head
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 4096, (2, 64)), jnp.int32)
  batch = {'inputs': tokens, 'positions': jnp.broadcast_to(jnp.arange(64), (2, 64)),
           'segment_ids': jnp.ones_like(tokens)}
  p, q = (jax.nn.log_softmax(distill.teacher_logits(t.graphdef, t.params, batch).astype(jnp.float32))
          for t in (floats, int8))
  kl = float(jnp.mean(jnp.sum(jnp.exp(p) * (p - q), -1)))  # per token, nats
  assert 0 < kl < 5e-3, kl  # int8's own small error (the float teacher's entropy is ~5 nats here)
  logged = train(cfg, str(tmp_path / 'student'), progress=False)
  assert [r['step'] for r in logged] == [1, 2] and all(r['kl'] > 0 for r in logged)


def test_a_teacher_of_another_vocabulary_is_refused_before_training(pruned, tmp_path):
  out, _ = pruned
  cfg = configs.load_train_config([os.path.join(out, 'train.gin')],
                                  SHORT + ['model.vocab_size=512', "data.source='synthetic'",
                                           f"distill.teacher='{out}'"])
  with pytest.raises(ValueError, match='has vocab_size 4096, the student 512'):
    train(cfg, str(tmp_path / 'student'), progress=False)
  assert not os.listdir(os.path.join(tmp_path, 'student', 'checkpoints'))  # nothing saved


@pytest.mark.parametrize('flags,message', [
    (['--mlp-keep', '0'], r'--mlp-keep 0.0: a keep fraction must be in \(0, 1\]'),
    (['--layers-keep', '1.5'], r'--layers-keep 1.5: a keep fraction must be in \(0, 1\]'),
    (['--heads-keep', '0.2'], r'--heads-keep 0.2 keeps 0.40 of 2 key/value-head groups'),
    (['--calibration', '/nonexistent/data'], r"calibration set '/nonexistent/data' has no manifest"),
])
def test_bad_prune_input_exits_2_naming_the_value_and_writes_nothing(teacher, tmp_path, capsys,
                                                                     flags, message):
  out = str(tmp_path / 'out')
  assert stoker('prune', '--checkpoint', teacher[0], '--out', out, *flags) == 2
  assert re.search(message, capsys.readouterr().err)
  assert not os.path.exists(out)


def test_prune_and_distill_commands(teacher, pruned, tmp_path, capsys):
  assert stoker('prune', '--checkpoint', teacher[0], '--out', pruned[0]) == 2  # an existing --out
  assert f'--out {pruned[0]} exists; prune into a new directory' in capsys.readouterr().err
  # A teacher of another vocabulary: a Hugging Face directory whose config.json says 128.
  from models import hf
  other = tmp_path / 'other'
  other.mkdir()
  small = dataclasses.replace(configs.load_train_config([os.path.join(pruned[0], 'train.gin')]).model,
                              vocab_size=128)
  (other / 'config.json').write_text(json.dumps(hf.config_to_hf(small)))
  def files():  # but the command's log (cli.py logs a distillation in the student's workdir)
    return sorted(set(os.listdir(pruned[0])) - {'stoker.log'})
  before = files()
  assert stoker('distill', '--teacher', str(other), '--student', pruned[0]) == 2
  assert 'has vocab_size 128, the student 4096' in capsys.readouterr().err
  assert files() == before and os.listdir(os.path.join(pruned[0], 'checkpoints')) == ['0']
