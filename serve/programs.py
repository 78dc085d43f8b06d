"""The engine's compiled programs and where their inputs live: the weights laid out as the step reads
them (layers unstacked when it unrolls), checked against the model; params, KV pools and LoRA
slot stacks placed on the mesh (or the default device); one jitted step per bucket, pools donated.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from models import transformer
from models.config import ModelConfig
from parallelism import sharding as sharding_lib
from parallelism.rules import Rules
from serve import kv_cache, quant


def layout(cfg: ModelConfig, params: nnx.State | nnx.Module, unstack: bool) -> nnx.State:
  """`params` (the state of models.transformer.Transformer(cfg), or of its unrolled twin) checked,
  and re-laid as the engine holds them: each layer's weights apart when `unstack`. An engine's own
  params (OutMajor weights) are taken back to the model's layout first."""
  if isinstance(params, nnx.Module):
    params = nnx.state(params)
  params = quant.model_layout(params)
  got = shapes(params)
  for scan in dict.fromkeys((cfg.scan_layers, False)):
    expected = model_shapes(dataclasses.replace(cfg, scan_layers=scan))
    if expected == got:
      break
  else:
    raise ValueError(f'params do not match ModelConfig {cfg}: expected the state of '
                     f'models.transformer.Transformer (scan_layers={cfg.scan_layers}), '
                     f'shapes {jax.tree.leaves(expected)[:4]}...; got {jax.tree.leaves(got)[:4]}...')
  if unstack:
    return transformer.unstacked_state(cfg, params)[2]
  if scan != cfg.scan_layers:
    raise ValueError('params with unrolled layers for a ModelConfig with scan_layers=True: pass '
                     'stacked params, or set EngineConfig.layer_loop=\'unroll\' without LoRA.')
  return params


@functools.lru_cache(maxsize=None)
def relay(int8: bool, out_major: bool):
  """What the engine's weights go through after `layout`: int8 quantization, then the OutMajor
  layout of the float weights left (models/quant.py), as one jitted function shared by engines."""
  steps = [f for f, on in ((quant.quantize_params, int8), (quant.out_major_params, out_major)) if on]
  if not steps:
    return lambda params: params
  return jax.jit(lambda params: functools.reduce(lambda p, f: f(p), steps, params))


def shapes(tree):
  return jax.tree.map(lambda x: (x.shape, jax.numpy.dtype(x.dtype)), tree)


@functools.lru_cache(maxsize=8)
def model_shapes(cfg: ModelConfig):
  """(shape, dtype) per leaf of Transformer(cfg)'s state: traced once per config, not per update."""
  return shapes(nnx.state(nnx.eval_shape(lambda: transformer.Transformer(cfg, nnx.Rngs(0)))))


def place(steps: dict, params: nnx.State, abstract_params: nnx.State, spec: kv_cache.KVCacheSpec,
          stacks: dict, mesh: Mesh | None, rules: Rules, int8: bool, extra_inputs: int):
  """(params, pages, LoRA stacks, {bucket: jitted step}): on the default device without a mesh;
  with one, params sharded by `rules` (their int8 layout's rules when `int8`), the pools on kv
  heads, everything else replicated. `extra_inputs`: the step's optional inputs after the four
  always there (a draft model's q and draft tokens, the LoRA stacks), each replicated."""
  if mesh is None:
    jitted = {T: jax.jit(f, donate_argnums=(1,)) for T, f in steps.items()}
    return params, kv_cache.init_pages(spec), jax.device_put(stacks), jitted
  param_shardings = (quant.logical_shardings(abstract_params, mesh, rules) if int8 else
                     sharding_lib.logical_shardings(abstract_params, mesh, rules))
  pool = kv_cache.pool_sharding(spec, mesh, rules)
  replicated = NamedSharding(mesh, PartitionSpec())
  pools = kv_cache.pages_sharding(spec, pool)
  jitted = {T: jax.jit(f, donate_argnums=(1,),
                       in_shardings=(param_shardings, pools) + (replicated,) * (4 + extra_inputs),
                       out_shardings=(replicated, pools)) for T, f in steps.items()}
  return (jax.device_put(params, param_shardings), kv_cache.init_pages(spec, pool),
          jax.device_put(stacks, replicated), jitted)


def stack_rows(xs_XV, B: int) -> jax.Array:
  """Per-step [X, V] arrays (a small bucket samples X < B rows) stacked as [n, B, V], zero-padded."""
  return jax.numpy.stack([jax.numpy.pad(x, ((0, B - x.shape[0]), (0, 0))) for x in xs_XV])


def chain(step_fns, B: int, pages, replicated: NamedSharding | None):
  """One jitted program running `step_fns` (serve/step.py's step, each at its bucket) in turn, each
  step's decodes fed the step before's sampled tokens: a draft model's k steps in one device call,
  not k (each a dispatch and a host round trip: 0.2-0.4 ms on a 2-core CPU against a 1M drafter's
  0.25 ms step). Arguments: (params, pages, no_tokens_B, mask_BW, ints_1, floats_1, ..., ints_n,
  floats_n); returns ((tokens_nB, logits_nBV), pages), each step's logits padded to B rows; the pools
  donated, and with a mesh kept on `pages`' shardings."""

  def run(params, pages, prev_tokens_B, mask_BW, *buffers):
    tokens, logits = [], []
    for j, f in enumerate(step_fns):
      (prev_tokens_B, _, _, logits_XV, _, _), pages = f(params, pages, buffers[2 * j], buffers[2 * j + 1],
                                                        prev_tokens_B, mask_BW)
      tokens.append(prev_tokens_B)
      logits.append(logits_XV)
    return (jax.numpy.stack(tokens), stack_rows(logits, B)), pages

  if replicated is None:
    return jax.jit(run, donate_argnums=(1,))
  return jax.jit(run, donate_argnums=(1,), out_shardings=(replicated, jax.tree.map(lambda x: x.sharding, pages)))


def enable_compilation_cache(directory: str) -> None:
  """Turns on JAX's persistent compilation cache in `directory` (process-wide), for every compile."""
  current = jax.config.jax_compilation_cache_dir
  if current and os.path.abspath(current) != os.path.abspath(directory):
    # JAX opens its cache once, at the first compile: an earlier directory may stay in use.
    logging.warning('EngineConfig.compilation_cache_dir=%s, but this process already set JAX\'s '
                    'cache to %s, which stays in use if anything was compiled since.', directory,
                    current)
  jax.config.update('jax_compilation_cache_dir', directory)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', -1)
