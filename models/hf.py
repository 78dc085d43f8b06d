"""Hugging Face Llama/Mistral/Qwen2/Qwen3/Mixtral/Qwen3-MoE configs and tensor names <-> Stoker's layout (numpy, no torch).

One table (`tensor_specs`) says, for every tensor of a Hugging Face checkpoint of a config, its name, its
shape there, the Stoker parameter it becomes, and how the layouts differ (HF linear weights are [out, in];
Stoker's are [in..., out...] with heads split out). Conversion both ways, and the checks of a checkpoint
against a config, read that table, tensor by tensor, so nothing needs the whole model twice.
models/hf_files.py reads and writes the files; the tests compare logits with `transformers`.

Mixtures of experts: checkpoints hold one tensor per expert (`...experts.{e}.w1.weight`, the layout
save_pretrained writes); Stoker's [E, ...] expert weights are stacked from them (`assemble`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterator, Mapping

import numpy as np

from models.config import ModelConfig, RopeScaling

# config.json `model_type` -> the architecture it names.
SUPPORTED = {'llama': 'LlamaForCausalLM', 'mistral': 'MistralForCausalLM',
             'qwen2': 'Qwen2ForCausalLM', 'qwen3': 'Qwen3ForCausalLM',
             'mixtral': 'MixtralForCausalLM', 'qwen3_moe': 'Qwen3MoeForCausalLM'}


def config_from_hf(hf: Mapping[str, Any], **overrides) -> ModelConfig:
  """A ModelConfig from a Hugging Face `config.json` dict; ValueError for what Stoker cannot run."""
  model_type = hf.get('model_type')
  arch = SUPPORTED.get(model_type)
  if arch is None or arch not in (hf.get('architectures') or [arch]):
    raise ValueError(f"Unsupported model: model_type={model_type!r}, "
                     f"architectures={hf.get('architectures')}; supported: {SUPPORTED}.")
  _check_features(hf, model_type)
  scaling = hf.get('rope_scaling') or hf.get('rope_parameters') or {}
  rope_type = scaling.get('rope_type', scaling.get('type', 'default'))
  if rope_type not in ('default', 'llama3'):
    raise ValueError(f'Unsupported rope_scaling type {rope_type!r}; supported: default, llama3.')
  theta = hf.get('rope_theta') or (hf.get('rope_parameters') or {}).get('rope_theta') or 10_000.0
  heads = hf['num_attention_heads']
  fields = dict(
      vocab_size=hf['vocab_size'], d_model=hf['hidden_size'], num_layers=hf['num_hidden_layers'],
      num_heads=heads, num_kv_heads=hf.get('num_key_value_heads') or heads,
      head_dim=hf.get('head_dim') or hf['hidden_size'] // heads,
      mlp_dim=hf['intermediate_size'], rope_theta=float(theta), rms_eps=hf['rms_norm_eps'],
      tie_embeddings=bool(hf.get('tie_word_embeddings', False)),
      qkv_bias=model_type == 'qwen2', qk_norm=model_type in ('qwen3', 'qwen3_moe'),
      rope_scaling=RopeScaling(
          factor=scaling['factor'], low_freq_factor=scaling['low_freq_factor'],
          high_freq_factor=scaling['high_freq_factor'],
          original_max_position=scaling['original_max_position_embeddings'],
      ) if rope_type == 'llama3' else None)
  fields.update(_moe_fields(hf, model_type))
  fields.update(overrides)
  return ModelConfig(**fields)


def _moe_fields(hf: Mapping[str, Any], model_type: str) -> dict:
  """Mixtral: softmax over the top-k router logits; Qwen3-MoE: the top-k of the softmax, renormalised
  if norm_topk_prob. router_aux_loss_coef becomes the load-balancing weight."""
  if model_type == 'mixtral':
    return dict(num_experts=hf['num_local_experts'], experts_per_token=hf['num_experts_per_tok'],
                load_balance_loss=float(hf.get('router_aux_loss_coef', 0.0)))
  if model_type == 'qwen3_moe':
    # The Hub's config.json says num_experts; transformers 5 writes num_local_experts.
    return dict(num_experts=hf.get('num_experts') or hf['num_local_experts'],
                experts_per_token=hf['num_experts_per_tok'], moe_mlp_dim=hf['moe_intermediate_size'], router='softmax_topk',
                router_renormalize=bool(hf.get('norm_topk_prob', False)),
                load_balance_loss=float(hf.get('router_aux_loss_coef', 0.0)))
  return {}


def _check_features(hf: Mapping[str, Any], model_type: str) -> None:
  """Features of these families that Stoker's decoder does not implement: refuse, naming them."""
  problems = []
  if hf.get('hidden_act', 'silu') != 'silu':
    problems.append(f"hidden_act={hf['hidden_act']!r} (Stoker's MLP is SwiGLU: 'silu')")
  if hf.get('mlp_bias'):
    problems.append('mlp_bias=true')
  if hf.get('attention_bias') and model_type != 'qwen2':
    problems.append('attention_bias=true (an o_proj bias; only Qwen2 q/k/v biases are supported)')
  window = hf.get('sliding_window')
  uses_window = hf.get('use_sliding_window', model_type in ('mistral', 'mixtral'))
  if uses_window and window and window < hf.get('max_position_embeddings', 0):
    problems.append(f'sliding_window={window} < max_position_embeddings='
                    f"{hf.get('max_position_embeddings')} (Stoker attends to the whole context)")
  layer_types = set(hf.get('layer_types') or ()) - {'full_attention'}
  if layer_types and hf.get('use_sliding_window', True):
    problems.append(f'layer_types {sorted(layer_types)}')
  if model_type == 'qwen3_moe':
    if hf.get('decoder_sparse_step', 1) != 1 or hf.get('mlp_only_layers'):
      problems.append(f"dense layers among the experts' (decoder_sparse_step="
                      f"{hf.get('decoder_sparse_step')}, mlp_only_layers={hf.get('mlp_only_layers')}; "
                      'Stoker makes every layer a mixture of experts)')
  if problems:
    raise ValueError(f'Unsupported {model_type} config: {"; ".join(problems)}.')


def architecture(cfg: ModelConfig) -> str:
  """The Hugging Face model_type a ModelConfig exports as: qwen3 (q/k norm), qwen2 (QKV bias), llama;
  mixtures of experts: qwen3_moe (q/k norm, softmax then top-k), mixtral (top-k then softmax)."""
  if cfg.qk_norm and cfg.qkv_bias:
    raise ValueError('No Hugging Face family has both q/k norm and QKV bias; cannot export this model.')
  if cfg.moe:
    if cfg.shared_mlp_dim or cfg.qkv_bias:
      raise ValueError('No supported Hugging Face MoE family has shared experts or QKV bias; '
                       'cannot export this model.')
    if cfg.qk_norm and cfg.router == 'softmax_topk':
      return 'qwen3_moe'
    if not cfg.qk_norm and cfg.router == 'topk_softmax':
      return 'mixtral'
    raise ValueError(f'No Hugging Face MoE family has qk_norm={cfg.qk_norm} with router='
                     f"{cfg.router!r} (mixtral: no q/k norm, 'topk_softmax'; qwen3_moe: q/k norm, "
                     "'softmax_topk').")
  return 'qwen3' if cfg.qk_norm else 'qwen2' if cfg.qkv_bias else 'llama'


def config_to_hf(cfg: ModelConfig, base: Mapping[str, Any] | None = None,
                 dtype: str = 'float32') -> dict:
  """A `config.json` dict for `cfg`. `base` (the config a model was converted from) keeps its other
  fields (token ids, context length, ...); the architecture fields always come from `cfg`."""
  out = dict(base or {})
  model_type = architecture(cfg)
  if model_type == 'llama' and out.get('model_type') == 'mistral':
    model_type = 'mistral'  # the same tensors; keep the family the model came from
  rope = {'rope_theta': cfg.rope_theta, 'rope_type': 'default'}
  if cfg.rope_scaling is not None:
    s = cfg.rope_scaling
    rope.update(rope_type='llama3', factor=s.factor, low_freq_factor=s.low_freq_factor,
                high_freq_factor=s.high_freq_factor,
                original_max_position_embeddings=s.original_max_position)
  for stale in ('rope_scaling', 'rope_theta', 'torch_dtype', 'transformers_version'):
    out.pop(stale, None)
  out.update(
      architectures=[SUPPORTED[model_type]], model_type=model_type, vocab_size=cfg.vocab_size,
      hidden_size=cfg.d_model, num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
      num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, intermediate_size=cfg.mlp_dim,
      rms_norm_eps=cfg.rms_eps, tie_word_embeddings=cfg.tie_embeddings, hidden_act='silu',
      rope_parameters=rope, dtype=dtype)
  out.setdefault('max_position_embeddings',
                 cfg.rope_scaling.original_max_position * int(cfg.rope_scaling.factor)
                 if cfg.rope_scaling else 4096)
  if model_type == 'llama':
    out.update(attention_bias=False, mlp_bias=False)
  if model_type == 'mixtral':
    out.update(num_local_experts=cfg.num_experts, num_experts_per_tok=cfg.experts_per_token,
               intermediate_size=cfg.expert_mlp_dim, router_aux_loss_coef=cfg.load_balance_loss)
  if model_type == 'qwen3_moe':
    out.update(num_experts=cfg.num_experts, num_experts_per_tok=cfg.experts_per_token,
               moe_intermediate_size=cfg.expert_mlp_dim, norm_topk_prob=cfg.router_renormalize,
               decoder_sparse_step=1, mlp_only_layers=[],
               router_aux_loss_coef=cfg.load_balance_loss)
  return out


@dataclasses.dataclass(frozen=True)
class TensorSpec:
  """One Hugging Face tensor and the Stoker parameter it is.

  path: keys of the parameter in the nested params ('layers' first for a block's tensor; the layer
  index is `layer`, a leading axis of stacked params or a key of unrolled ones). in_dims: for a
  linear weight, how many leading Stoker axes are its input (HF stores [out, in]); 0: same layout
  up to a reshape (embeddings, norms, biases). expert: for one expert's tensor, its index on the
  parameter's expert axis (after the layer axis); `shape` is then one expert's.
  """

  name: str
  hf_shape: tuple[int, ...]
  path: tuple[str, ...]
  shape: tuple[int, ...]
  layer: int | None = None
  in_dims: int = 0
  expert: int | None = None

  def to_stoker(self, x: np.ndarray) -> np.ndarray:
    return (x.T if self.in_dims else x).reshape(self.shape)

  def to_hf(self, x: np.ndarray) -> np.ndarray:
    if self.in_dims:
      return x.reshape(math.prod(self.shape[:self.in_dims]), -1).T
    return x.reshape(self.hf_shape)


def tensor_specs(cfg: ModelConfig) -> list[TensorSpec]:
  """Every tensor a Hugging Face checkpoint of `cfg` holds, in a fixed order."""
  D, F, N, K, H, V = (cfg.d_model, cfg.mlp_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                      cfg.vocab_size)
  specs = [TensorSpec('model.embed_tokens.weight', (V, D), ('embed_VD',), (V, D))]
  for i in range(cfg.num_layers):
    p = f'model.layers.{i}.'

    def add(name, hf_shape, path, shape, in_dims=0, p=p, i=i, expert=None):
      specs.append(TensorSpec(p + name, hf_shape, ('layers',) + path, shape, i, in_dims, expert))

    add('input_layernorm.weight', (D,), ('attn_norm', 'scale'), (D,))
    add('self_attn.q_proj.weight', (N * H, D), ('attn', 'q_DNH'), (D, N, H), 1)
    add('self_attn.k_proj.weight', (K * H, D), ('attn', 'k_DKH'), (D, K, H), 1)
    add('self_attn.v_proj.weight', (K * H, D), ('attn', 'v_DKH'), (D, K, H), 1)
    add('self_attn.o_proj.weight', (D, N * H), ('attn', 'o_NHD'), (N, H, D), 2)
    if cfg.qkv_bias:
      add('self_attn.q_proj.bias', (N * H,), ('attn', 'bias', 'q_NH'), (N, H))
      add('self_attn.k_proj.bias', (K * H,), ('attn', 'bias', 'k_KH'), (K, H))
      add('self_attn.v_proj.bias', (K * H,), ('attn', 'bias', 'v_KH'), (K, H))
    if cfg.qk_norm:
      add('self_attn.q_norm.weight', (H,), ('attn', 'q_norm', 'scale'), (H,))
      add('self_attn.k_norm.weight', (H,), ('attn', 'k_norm', 'scale'), (H,))
    add('post_attention_layernorm.weight', (D,), ('mlp_norm', 'scale'), (D,))
    if cfg.moe:
      _add_experts(cfg, add)
      continue
    add('mlp.gate_proj.weight', (F, D), ('mlp', 'gate_DF'), (D, F), 1)
    add('mlp.up_proj.weight', (F, D), ('mlp', 'up_DF'), (D, F), 1)
    add('mlp.down_proj.weight', (D, F), ('mlp', 'down_FD'), (F, D), 1)
  specs.append(TensorSpec('model.norm.weight', (D,), ('final_norm', 'scale'), (D,)))
  if not cfg.tie_embeddings:
    specs.append(TensorSpec('lm_head.weight', (V, D), ('lm_head_DV',), (D, V), in_dims=1))
  return specs


def _add_experts(cfg: ModelConfig, add) -> None:
  """A layer's router and experts: Mixtral's block_sparse_moe.{gate, experts.e.w1/w3/w2} or
  Qwen3-MoE's mlp.{gate, experts.e.gate_proj/up_proj/down_proj}."""
  D, E, F = cfg.d_model, cfg.num_experts, cfg.expert_mlp_dim
  mixtral = architecture(cfg) == 'mixtral'
  moe, (gate, up, down) = (('block_sparse_moe', ('w1', 'w3', 'w2')) if mixtral else
                           ('mlp', ('gate_proj', 'up_proj', 'down_proj')))
  add(f'{moe}.gate.weight', (E, D), ('mlp', 'router_DE'), (D, E), 1)
  for e in range(E):
    add(f'{moe}.experts.{e}.{gate}.weight', (F, D), ('mlp', 'gate_EDF'), (D, F), 1, expert=e)
    add(f'{moe}.experts.{e}.{up}.weight', (F, D), ('mlp', 'up_EDF'), (D, F), 1, expert=e)
    add(f'{moe}.experts.{e}.{down}.weight', (D, F), ('mlp', 'down_EFD'), (F, D), 1, expert=e)


def check_tensors(cfg: ModelConfig, found: Mapping[str, tuple[int, ...]], where: str = '') -> None:
  """ValueError listing missing, unexpected and wrongly shaped tensors (name -> shape found)."""
  expected = {s.name: s.hf_shape for s in tensor_specs(cfg)}
  extra = set(found) - set(expected)
  if cfg.tie_embeddings:  # some tied checkpoints still carry the (identical) head
    extra.discard('lm_head.weight')
  extra = sorted(n for n in extra if not n.endswith('rotary_emb.inv_freq'))
  missing = sorted(set(expected) - set(found))
  shapes = sorted(f'{n}: expected {expected[n]}, found {tuple(found[n])}'
                  for n in set(expected) & set(found) if tuple(found[n]) != expected[n])
  if missing or extra or shapes:
    parts = []
    for title, items in (('missing', missing), ('unexpected', extra), ('wrong shape', shapes)):
      if items:
        parts.append(f'{len(items)} {title}: ' + ', '.join(items[:8]) +
                     (f', ... ({len(items) - 8} more)' if len(items) > 8 else ''))
    raise ValueError(f'{where or "checkpoint"} does not fit the config ({cfg.num_layers} layers, '
                     f'D={cfg.d_model}, N={cfg.num_heads}, K={cfg.num_kv_heads}, '
                     f'H={cfg.head_dim}, F={cfg.mlp_dim}, V={cfg.vocab_size}); ' + '; '.join(parts) +
                     '. Check that config.json belongs to these weights.')


def leaf_specs(cfg: ModelConfig) -> dict[tuple, list[TensorSpec]]:
  """Stoker leaf -> the HF tensors that make it, in layer order. With scan_layers a block's leaf is
  stacked over layers (path without a layer key); otherwise each layer's is its own leaf."""
  out: dict[tuple, list[TensorSpec]] = {}
  for s in tensor_specs(cfg):
    key = s.path
    if s.layer is not None and not cfg.scan_layers:
      key = (s.path[0], s.layer) + s.path[1:]
    out.setdefault(key, []).append(s)
  return out


def params_from_hf(cfg: ModelConfig, weights: Mapping[str, np.ndarray]) -> dict:
  """Nested dict of arrays shaped like `nnx.state(Transformer(cfg))`, from HF tensor names.

  `weights` maps names such as 'model.layers.0.self_attn.q_proj.weight' to arrays; it may be lazy
  (each tensor is read once, when its leaf is built).
  """
  check_tensors(cfg, {n: np.shape(weights[n]) for n in weights})
  out: dict = {}
  for key, specs in leaf_specs(cfg).items():
    set_path(out, key, assemble(cfg, specs, [s.to_stoker(np.asarray(weights[s.name]))
                                             for s in specs]))
  return out


def assemble(cfg: ModelConfig, specs: list[TensorSpec], parts: list[np.ndarray]) -> np.ndarray:
  """One Stoker leaf from its tensors (in leaf_specs order): experts stacked on their axis, and
  layers on theirs when scanned."""
  if specs[0].expert is not None:  # [layer][expert] -> per-layer [E, ...]
    E = cfg.num_experts
    parts = [np.stack(parts[i:i + E]) for i in range(0, len(parts), E)]
  return np.stack(parts) if specs[0].layer is not None and cfg.scan_layers else parts[0]


def params_to_hf(cfg: ModelConfig, params: Mapping) -> Iterator[tuple[str, np.ndarray]]:
  """(HF name, numpy array) for every tensor, one at a time, from nested params (arrays or
  jax.Arrays, possibly sharded: each tensor is fetched to the host alone)."""
  for key, specs in leaf_specs(cfg).items():
    leaf = get_path(params, key)
    for s in specs:
      x = leaf[s.layer] if s.layer is not None and cfg.scan_layers else leaf
      x = x if s.expert is None else x[s.expert]
      yield s.name, s.to_hf(np.asarray(x))


def set_path(tree: dict, path: tuple, value) -> None:
  for k in path[:-1]:
    tree = tree.setdefault(k, {})
  tree[path[-1]] = value


def get_path(tree: Mapping, path: tuple):
  for k in path:
    if k not in tree:
      raise KeyError(f'params have no {"/".join(map(str, path))}; found keys {sorted(tree)}.')
    tree = tree[k]
  return tree
