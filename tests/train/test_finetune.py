"""LoRA fine-tuning through `train`: only adapters are state, the base is never changed, the loss
falls, checkpoints hold the adapters alone, and a LoRA workdir reads back as the merged model."""

import dataclasses
import functools
import json
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers
from flax import nnx

import configs
from models import checkpoint_io, lora, quant
from parallelism.mesh import make_mesh
from parallelism.rules import DEFAULT_RULES
from parallelism.sharding import logical_shardings
from models.transformer import Transformer
from train import datasets, finetune, from_hf
from train.loop import train
from train.optimizer import make_optimizer
from train.step import compile_train_step, fresh_state, loss_sums

PARAMS = [
    'model.num_layers=2', 'model.d_model=64', 'model.num_heads=4', 'model.num_kv_heads=2',
    'model.head_dim=16', 'model.mlp_dim=128', 'model.vocab_size=256',
    "data.source='synthetic'", 'data.eval_every=0', 'data.eval_batches=0',
    'train.batch_size=8', 'train.seq_len=32', 'train.log_every=1', 'checkpoint.every_steps=0',
]
pytestmark = pytest.mark.xdist_group('finetune')


def config(*extra):
  return configs.load_train_config(['train/tiny_cpu.gin'], PARAMS + list(extra))


@pytest.fixture(scope='module')
def base(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('base'))
  train(config('train.steps=4'), workdir, progress=False)
  return workdir


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


@pytest.fixture(scope='module')
def lora_run(base, tmp_path_factory):
  """(config, workdir, logged metrics) of a LoRA run over `base` on one repeated batch."""
  cfg = config('train.steps=8', f"lora.base='{base}'", 'lora.rank=4', 'lora.alpha=8.0',
               'lora.dropout=0.1', 'optimizer.learning_rate=0.01', 'optimizer.warmup_steps=0',
               'train.microbatches=2', 'train.batch_size=16')
  workdir = str(tmp_path_factory.mktemp('lora'))
  # One batch, repeated: the adapters alone must fit it (the base has not seen it).
  batch = next(iter(datasets.train_batches(config('train.seed=7', 'train.batch_size=16'), None)))
  return cfg, workdir, train(cfg, workdir, itertools.repeat(batch), progress=False)


def test_lora_trains_adapters_only_and_reads_back_merged(base, lora_run):
  _, base_params = checkpoint_io.load(base)
  before = _leaves(base_params)
  cfg, workdir, logged = lora_run
  losses = [r['loss'] for r in logged if 'loss' in r]
  assert losses[-1] < losses[0] - 0.5, losses
  # The state, its optimizer moments and the checkpoint hold adapters alone.
  tx = make_optimizer(cfg.optimizer, cfg.steps)
  state = jax.eval_shape(functools.partial(fresh_state, cfg, tx))
  names = {'/'.join(map(str, p)) for p, _ in nnx.to_flat_state(state.params)}
  assert names and all(n.endswith(('lora_a', 'lora_b')) for n in names)
  # The base is untouched, bit for bit: in its workdir and in the copy the run held.
  np.testing.assert_equal(_leaves(checkpoint_io.load(base)[1]), before)
  np.testing.assert_equal(_leaves(finetune.load_base(base, cfg.model, make_mesh(cfg.mesh),
                                                     DEFAULT_RULES)), before)
  # Read back, the LoRA workdir is the base with its adapters merged.
  model_cfg, merged = checkpoint_io.load(workdir)
  adapters = checkpoint_io.restore_adapters(
      checkpoint_io.model_checkpoint.step_dir(workdir), model_cfg, cfg.lora)
  assert any(np.abs(x).max() > 0 for x in _leaves(adapters) if x.ndim == 3)  # b moved off zero
  expect = lora.merge(model_cfg, base_params, adapters, cfg.lora)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), merged, expect)
  assert checkpoint_io.lora_config(workdir) == cfg.lora


def test_qlora_trains_over_an_int8_base_and_reads_back_merged_into_it(base, tmp_path):
  cfg = config('train.steps=6', f"lora.base='{base}'", "lora.base_dtype='int8'", 'lora.rank=4',
               'lora.alpha=8.0', 'optimizer.learning_rate=0.01', 'optimizer.warmup_steps=0')
  batch = next(iter(datasets.train_batches(config('train.seed=7'), None)))
  logged = train(cfg, str(tmp_path), itertools.repeat(batch), progress=False)
  losses = [r['loss'] for r in logged if 'loss' in r]
  assert losses[-1] < losses[0] - 0.5, losses
  # The run held the base's decoder matrices as int8: a quarter of their float32 bytes, and a
  # float32 scale per output channel.
  _, floats = checkpoint_io.load(base)
  held = finetune.load_base(base, cfg.model, make_mesh(cfg.mesh), DEFAULT_RULES, cfg.lora)
  pairs = [(f.get_value(), h.get_value()) for (_, f), (_, h) in
           zip(nnx.to_flat_state(floats), nnx.to_flat_state(held))]
  quantized = [(f, h) for f, h in pairs if isinstance(h, quant.WeightOnly)]
  assert len(quantized) == 7 and all(h.q.dtype == jnp.int8 for _, h in quantized)
  assert quant.nbytes([h for _, h in quantized]) < 0.27 * quant.nbytes([f for f, _ in quantized])
  # Read back, the workdir is its adapters merged into the int8 base they were trained over.
  model_cfg, merged = checkpoint_io.load(str(tmp_path))
  adapters = checkpoint_io.restore_adapters(
      checkpoint_io.model_checkpoint.step_dir(str(tmp_path)), model_cfg, cfg.lora)
  expect = lora.merge(model_cfg, floats, adapters, cfg.lora)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), merged, expect)
  assert checkpoint_io.lora_config(str(tmp_path)).base_dtype == 'int8'


def peak_bytes(cfg, base=False) -> int:
  """XLA's memory analysis of the compiled fused step (per device): arguments + outputs (less what
  is donated into them) + temporaries. With `base`, a LoRA step over a base of zeros (the values
  do not change the compiled program)."""
  mesh = make_mesh(cfg.mesh)
  tx = make_optimizer(cfg.optimizer, cfg.steps)
  shardings = logical_shardings(jax.eval_shape(functools.partial(fresh_state, cfg, tx)), mesh)
  frozen = None
  if base:
    abstract = checkpoint_io.abstract_params(cfg.model)
    params = jax.jit(lambda: jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), abstract),
                     out_shardings=logical_shardings(abstract, mesh))()
    frozen = (({'base': params},), ({'base': jax.tree.map(lambda x: x.sharding, params)},), {})
  m = compile_train_step(cfg, mesh, tx, shardings, frozen=frozen).memory_analysis()
  return m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes


def test_the_lora_step_needs_at_most_40_percent_of_full_fine_tunings_memory():
  # The small preset (~126M) as configs/train/small_cpu.gin trains it (8 x 256 tokens in 2
  # microbatches, 8 devices), with full rematerialisation, as one fine-tunes under memory pressure.
  # Full fine-tuning holds params, gradients and two Adam moments; LoRA the params, the adapters'
  # share of the rest, and no gradient of a base weight. Measured: 0.39 (0.46 without remat, where
  # the activations weigh more).
  params = ["data.source='synthetic'", 'data.eval_every=0', 'checkpoint.just_in_time=False',
            "model.remat='full'"]
  full = peak_bytes(configs.load_train_config(['train/small_cpu.gin'], params))
  adapted = peak_bytes(configs.load_train_config(
      ['train/small_cpu.gin'], params + ["lora.base='unused'", 'lora.rank=8']), base=True)
  assert adapted <= 0.4 * full, (adapted, full, adapted / full)


def test_a_base_of_another_shape_is_refused(base):
  cfg = config(f"lora.base='{base}'", 'model.mlp_dim=256')
  mesh = make_mesh(cfg.mesh)
  with pytest.raises(ValueError, match=r"another model than the one this run trains \(mlp_dim: "
                                       r"base 128, train.model 256\)"):
    finetune.load_base(base, cfg.model, mesh, DEFAULT_RULES)
  with pytest.raises(FileNotFoundError, match="lora.base='/nonexistent': no such directory"):
    finetune.load_base('/nonexistent', cfg.model, mesh, DEFAULT_RULES)


def test_exports_to_transformers_and_peft_and_back(base, lora_run, tmp_path):
  cfg, workdir, _ = lora_run
  model_cfg, merged = checkpoint_io.load(workdir)
  tokens = np.arange(40).reshape(2, 20) * 13 % model_cfg.vocab_size
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: Transformer(model_cfg, nnx.Rngs(0))))
  ours = np.asarray(nnx.merge(graphdef, merged)(tokens))
  with pytest.raises(ValueError, match='pass --merge-lora'):
    checkpoint_io.to_hf(workdir, str(tmp_path / 'refused'))
  assert not (tmp_path / 'refused').exists()
  checkpoint_io.to_hf(workdir, str(tmp_path / 'merged'), merge_lora=True)
  checkpoint_io.to_hf(base, str(tmp_path / 'base'))
  checkpoint_io.to_peft(workdir, str(tmp_path / 'adapter'))
  with torch.no_grad():
    hf_merged = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / 'merged'))
    np.testing.assert_allclose(hf_merged(torch.as_tensor(tokens)).logits.numpy(), ours,
                               atol=1e-4, rtol=1e-4)
    hf_base = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / 'base'))
    with_adapter = peft.PeftModel.from_pretrained(hf_base, str(tmp_path / 'adapter'))
    np.testing.assert_allclose(with_adapter(torch.as_tensor(tokens)).logits.numpy(), ours,
                               atol=1e-4, rtol=1e-4)
  # The PEFT adapter over the exported base, read back as a LoRA workdir: the same model.
  from_hf.from_peft(str(tmp_path / 'adapter'), str(tmp_path / 'base'), str(tmp_path / 'back'),
                    config('train.steps=8'))
  assert checkpoint_io.lora_config(str(tmp_path / 'back')).rank == cfg.lora.rank
  back = np.asarray(nnx.merge(graphdef, checkpoint_io.load(str(tmp_path / 'back'))[1])(tokens))
  np.testing.assert_allclose(back, ours, atol=1e-5, rtol=1e-5)


def test_no_loss_flows_from_system_and_user_tokens(tmp_path):
  from data import pipeline, prepare
  rows = [{'messages': [{'role': 'system', 'content': 'Answer with the word.'},
                        {'role': 'user', 'content': f'say: {w}'}, {'role': 'assistant', 'content': w}]}
          for w in ('apple', 'pear', 'plum', 'fig', 'lime', 'kiwi')]
  (tmp_path / 'chat.jsonl').write_text('\n'.join(json.dumps(r) for r in rows) + '\n')
  prepare.prepare(prepare.PrepareConfig(source=str(tmp_path / 'chat.jsonl'), format='chat',
                                        train_tokenizer=True, vocab_size=300,
                                        validation_fraction=0.0), str(tmp_path / 'data'))
  batch = next(pipeline.make_iterator(str(tmp_path / 'data'), 'train', seq_len=64, global_batch_size=2,
                                      process_index=0, process_count=1))
  mask = batch['loss_mask'] > 0
  assert 0 < mask.sum() < (batch['segment_ids'] > 0).sum() / 3  # the answers: a small share
  cfg = config()
  graphdef, params = nnx.split(Transformer(dataclasses.replace(cfg.model, vocab_size=300), nnx.Rngs(0)))

  def grads(b):
    return jax.grad(lambda p: loss_sums(p, graphdef, b, 0.0)[0])(params)

  rng = np.random.default_rng(0)
  other = rng.integers(0, 300, batch['targets'].shape).astype(np.int32)
  # New targets wherever the loss mask is 0 (system and user turns, padding): the same gradient.
  same = grads({**batch, 'targets': np.where(mask, batch['targets'], other)})
  jax.tree.map(np.testing.assert_array_equal, same, grads(batch))
  # New targets at the trained (assistant) positions: another gradient.
  changed = grads({**batch, 'targets': np.where(mask, other, batch['targets'])})
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(changed),
                                                        jax.tree.leaves(same)))
