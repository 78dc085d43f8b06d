"""The peers of benchmarks/serve_engine.py: one random Llama in transformers and in Stoker's layout, transformers
`generate`, and a naive dense-cache JAX decode. Import after JAX's flags are set (serve_engine.py does)."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers
from flax import nnx

from models import hf, transformer
from models.config import ModelConfig


# ----------------------------------------------------------------------------- one model, two frameworks


def hf_llama(cfg: ModelConfig, seed: int) -> transformers.LlamaForCausalLM:
  """LlamaForCausalLM with the shapes of `cfg`, weights drawn like Stoker's (std 1/sqrt(fan in))
  rather than HF's std 0.02, whose nearly flat logits would make greedy ties common."""
  if cfg.qkv_bias or cfg.qk_norm or cfg.rope_scaling:
    raise ValueError('This benchmark builds LlamaForCausalLM; pick a plain Llama preset (tiny, small).')
  config = transformers.LlamaConfig(
      vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.mlp_dim,
      num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
      num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, rope_theta=cfg.rope_theta,
      rms_norm_eps=cfg.rms_eps, tie_word_embeddings=cfg.tie_embeddings,
      max_position_embeddings=4096, attn_implementation='sdpa', bos_token_id=None,
      eos_token_id=None, pad_token_id=0)
  torch.manual_seed(seed)
  model = transformers.LlamaForCausalLM(config).float().eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if p.ndim == 2:  # [out, in] linears; embeddings [V, D] use D like Stoker's embed_VD
        torch.nn.init.trunc_normal_(p, std=p.shape[1] ** -0.5, a=-2 * p.shape[1] ** -0.5,
                                    b=2 * p.shape[1] ** -0.5)
  model.generation_config.eos_token_id = None
  model.generation_config.pad_token_id = 0
  return model


def stoker_params(cfg: ModelConfig, model: transformers.LlamaForCausalLM) -> nnx.State:
  weights = {k: v.detach().numpy() for k, v in model.state_dict().items()}
  abstract = nnx.eval_shape(lambda: transformer.Transformer(cfg, nnx.Rngs(0)))
  state = nnx.state(abstract)
  nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, hf.params_from_hf(cfg, weights)))
  return state


# ----------------------------------------------------------------------------- peers


def hf_generate(model, prompts, batch: int, max_tokens: int) -> list[list[int]]:
  """transformers generate, greedy, static batches of `batch` left-padded prompts."""
  out = []
  for i in range(0, len(prompts), batch):
    group = prompts[i:i + batch]
    width = max(map(len, group))
    ids = torch.zeros((len(group), width), dtype=torch.long)
    mask = torch.zeros((len(group), width), dtype=torch.long)
    for b, p in enumerate(group):
      ids[b, width - len(p):] = torch.as_tensor(p)
      mask[b, width - len(p):] = 1
    with torch.no_grad():
      gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_tokens,
                           do_sample=False)
    out += gen[:, width:].tolist()
  return out


class DenseDecoder:
  """The naive JAX decode: a static batch, one dense [L, B, S_max, K, H] cache, every decode step
  attends over all S_max positions (masked). Right-padded prompts: each row decodes from its own
  length, overwriting its padding; positions past a row's current token are masked."""

  def __init__(self, cfg: ModelConfig, params, batch: int, prompt_len: int, max_len: int):
    self.params, self.batch, self.prompt_len, self.max_len = params, batch, prompt_len, max_len
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: transformer.Transformer(cfg, nnx.Rngs(0))))
    L, K, H = cfg.num_layers, cfg.num_kv_heads, cfg.head_dim

    def layers(model, x_BTD, pos_BT, attend):
      inv = model.inv_freq()
      layers_def, layers_state = nnx.split(model.layers)

      def body(x_BTD, xs):
        block = nnx.merge(layers_def, xs[0])
        q, k, v = block.attn.project_qkv(block.attn_norm(x_BTD), pos_BT, inv)
        out, kv = attend(xs[1], q, k, v)
        x_BTD = x_BTD + block.attn.project_out(out)
        return x_BTD + block.mlp(block.mlp_norm(x_BTD)), kv
      return jax.lax.scan(body, x_BTD, (layers_state, jnp.arange(L)))

    def attention(q_BTNH, k_BSKH, v_BSKH, mask_BTS):
      B, T, N, _ = q_BTNH.shape
      q = q_BTNH.reshape(B, T, K, N // K, H)
      s = jnp.einsum('BTKRH,BSKH->BKRTS', q, k_BSKH) * H ** -0.5
      s = jnp.where(mask_BTS[:, None, None], s, jnp.finfo(s.dtype).min)
      out = jnp.einsum('BKRTS,BSKH->BTKRH', jax.nn.softmax(s, axis=-1), v_BSKH)
      return out.reshape(B, T, N, H)

    def prefill(params, tokens_BT, lens_B):
      model = nnx.merge(graphdef, params)
      B, T = tokens_BT.shape
      pos_BT = jnp.broadcast_to(jnp.arange(T), (B, T))
      causal = jnp.tril(jnp.ones((T, T), bool))[None]

      def attend(_, q, k, v):
        return attention(q, k, v, causal), (k, v)
      x, (k_LBTKH, v_LBTKH) = layers(model, model.embed(tokens_BT), pos_BT, attend)
      last = jnp.take_along_axis(x, (lens_B - 1)[:, None, None], axis=1)
      pad = ((0, 0), (0, 0), (0, max_len - T), (0, 0), (0, 0))
      return (jnp.argmax(model.logits(last)[:, 0], -1).astype(jnp.int32),
              jnp.pad(k_LBTKH, pad), jnp.pad(v_LBTKH, pad))

    def decode(params, k_LBSKH, v_LBSKH, tokens_B, pos_B):
      model = nnx.merge(graphdef, params)
      B = tokens_B.shape[0]
      mask_B1S = (jnp.arange(max_len)[None, :] <= pos_B[:, None])[:, None]
      rows = jnp.arange(B)

      def attend(l, q, k, v):
        k_all = k_LBSKH[l].at[rows, pos_B].set(k[:, 0])
        v_all = v_LBSKH[l].at[rows, pos_B].set(v[:, 0])
        return attention(q, k_all, v_all, mask_B1S), (k_all, v_all)
      x, (k_LBSKH, v_LBSKH) = layers(model, model.embed(tokens_B[:, None]), pos_B[:, None], attend)
      return jnp.argmax(model.logits(x)[:, 0], -1).astype(jnp.int32), k_LBSKH, v_LBSKH

    start = time.perf_counter()
    tokens, lens = np.zeros((batch, prompt_len), np.int32), np.ones(batch, np.int32)
    self._prefill = jax.jit(prefill).lower(params, tokens, lens).compile()
    _, k, v = jax.eval_shape(prefill, params, tokens, lens)
    self._decode = jax.jit(decode, donate_argnums=(1, 2)).lower(
        params, k, v, lens, lens).compile()
    self.compile_s = time.perf_counter() - start

  def generate(self, prompts, max_tokens: int) -> list[list[int]]:
    out = []
    for i in range(0, len(prompts), self.batch):
      group = prompts[i:i + self.batch]
      tokens = np.zeros((self.batch, self.prompt_len), np.int32)
      lens = np.ones(self.batch, np.int32)
      for b, p in enumerate(group):
        tokens[b, :len(p)], lens[b] = p, len(p)
      token_B, k, v = self._prefill(self.params, tokens, lens)
      generated = [token_B]
      pos_B = jnp.asarray(lens)
      for _ in range(max_tokens - 1):
        token_B, k, v = self._decode(self.params, k, v, token_B, pos_B)
        generated.append(token_B)
        pos_B = pos_B + 1
      rows = np.stack([np.asarray(t) for t in generated], axis=1)
      out += rows[:len(group)].tolist()
    return out
