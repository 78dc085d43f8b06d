"""Every shipped gin file parses; the large presets build abstractly with the published sizes."""

import functools

import jax
import pytest
import torch
import transformers

import configs
from models import presets
from parallelism.mesh import make_mesh
from parallelism.sharding import logical_shardings
from train.optimizer import make_optimizer
from train.step import fresh_state


@pytest.mark.parametrize('path', configs.all_gin_files(), ids=lambda p: p.split('configs/')[-1])
def test_every_gin_file_parses(path):
  if '/rl/' in path:  # `stoker rl` recipes bind rl.* (rl/config.py)
    from rl.config import load_rl_config  # pylint: disable=g-import-not-at-top
    cfg = load_rl_config([path])
  else:
    cfg = configs.load_train_config([path])
  assert cfg.steps > 0 and cfg.model.num_layers > 0


def test_gin_params_override_files():
  cfg = configs.load_train_config(['train/tiny_cpu.gin'],
                                  ['train.steps = 7', "model.num_layers = 3", 'mesh.ici = (2, 2, 2)'])
  assert (cfg.steps, cfg.model.num_layers, cfg.mesh.ici) == (7, 3, (2, 2, 2))


def test_unknown_binding_is_an_error():
  with pytest.raises(ValueError, match='not_a_field'):
    configs.load_train_config(['train/tiny_cpu.gin'], ['train.not_a_field = 1'])


def _hf_count(cfg) -> int:
  """Parameter count of the same architecture in `transformers`, built on the meta device."""
  config = transformers.LlamaConfig(
      vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.mlp_dim,
      num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
      num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
      tie_word_embeddings=cfg.tie_embeddings)
  with torch.device('meta'):
    model = transformers.LlamaForCausalLM(config)
  return sum(p.numel() for p in model.parameters())


# Published sizes (model cards / the exact count of the released checkpoints).
PUBLISHED = {'llama3_8b': 8.03e9, 'llama3_70b': 70.6e9, 'mistral_7b': 7.24e9,
             'qwen2_0_5b': 0.494e9}


@pytest.mark.parametrize('name', sorted(PUBLISHED))
def test_large_configs_build_abstractly_with_published_sizes(name):
  cfg = configs.load_train_config([f'model/{name}.gin'])
  live_before = sum(x.nbytes for x in jax.live_arrays())
  mesh = make_mesh(cfg.mesh)
  tx = make_optimizer(cfg.optimizer, cfg.steps)
  abstract = jax.eval_shape(functools.partial(fresh_state, cfg, tx))
  shardings = logical_shardings(abstract, mesh)
  # Nothing was allocated: every array is abstract.
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(abstract))
  assert sum(x.nbytes for x in jax.live_arrays()) - live_before < 1 << 20
  count = sum(x.size for x in jax.tree.leaves(abstract.params))
  assert count == cfg.model.num_params()
  assert abs(count / PUBLISHED[name] - 1) < 0.01, (count, PUBLISHED[name])
  if not cfg.model.qkv_bias:
    assert count == _hf_count(cfg.model)
  # Parameters are split over the model-parallel axes (fsdp x tensor) and replicated over data.
  model_ways = mesh.shape['fsdp'] * mesh.shape['tensor']
  per_device = sum(functools.reduce(lambda a, b: a * b, s.shard_shape(x.shape), 1)
                   for x, s in zip(jax.tree.leaves(abstract.params),
                                   jax.tree.leaves(shardings.params)))
  assert count / model_ways <= per_device < 1.01 * count / model_ways
  print(f'{name}: {count / 1e9:.3f}B parameters, {per_device * 4 / 2**30:.2f} GiB f32 per device '
        f'on mesh {dict(mesh.shape)}')
