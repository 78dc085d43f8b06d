"""The model's forward pass over one engine step: a flat token budget against the paged cache.

A step's tokens (decodes of one token and prefill chunks, sequence after sequence) are one row of
T tokens. Each layer projects them with the model's own code (Attention.project_qkv: bias, q/k
norm, RoPE), writes their keys/values into their pages, runs ragged paged attention over the
pools, and finishes with the model's output projection and MLP. Only the rows whose next token is
needed go through the final norm and LM head.

Quantized serving (serve/quant.py): params whose weights are Int8 stay int8 through the step (the
model's matmuls hand them to quant.einsum: int8 x int8 products; the embedding gathers int8 rows);
int8 pools are written quantized and read through kv_cache.layer_pages.

Multi-LoRA (serve/lora.py): adapted weights hold MultiLoRA objects (the same einsum hook); each
layer binds the step's per-token slot ids `lora_slots_T` to them before projecting.

Prompt logprobs (`forward_with_token_logprobs`): each token's logits predict the token after it, so
the step's every token (a prefill chunk's included) can score the next one, given as `targets_T`.
That needs the LM head on all T tokens, so it runs in a branch taken only when some token has a
target; [T, V] never leaves the device (the target's logprob and a top-k come back).

Mixtures of experts: each layer's MoE MLP also counts the assignments its experts received from
the step's tokens (padding excluded): `forward_with_token_logprobs` returns them last, int32
[L, E] (None for a dense model), for the server's load-balance metrics.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from models import moe
from serve import attention, kv_cache, lora, sampling
from serve.kv_cache import KVPages


class StepBatch(NamedTuple):
  """One step's device inputs. T is the budget bucket, B the sequence slots, M pages per slot.

  Rows of the block tables, kv_lens and cu_q_lens are in the step's order of sequences (not slot
  ids); rows at or past num_seqs are padding (kv_len 0, cu_q_lens repeating the total).
  """

  token_ids_T: jax.Array  # int32; padding 0
  positions_T: jax.Array  # int32; position of each token in its sequence; padding 0
  block_tables_BM: jax.Array  # int32 page ids; 0 past a sequence's last page
  kv_lens_B: jax.Array  # int32 tokens in the cache after this step's writes
  cu_q_lens_B1: jax.Array  # int32 [B + 1]
  num_seqs_1: jax.Array  # int32 [1]
  logits_indices_B: jax.Array  # int32, token index whose logits each row needs (its last token)


def forward(graphdef: nnx.GraphDef, params: nnx.State, pages: KVPages, batch: StepBatch, *,
            backend: attention.AttentionBackend | str = attention.AttentionBackend.REFERENCE,
            mesh: Mesh | None = None, unroll: bool = False) -> tuple[jax.Array, KVPages]:
  """Runs one step. Returns float32 logits [B, V] (row b: the token at logits_indices_B[b]) and
  the pools with this step's keys/values written. Jit it with `pages` donated. `mesh`: the
  tensor-parallel mesh, for kernels that shard themselves. `unroll`: a Python loop over stacked
  layers instead of a scan (models built with scan_layers=False always unroll)."""
  model, x_1TD, pages, _ = _layers(graphdef, params, pages, batch, backend, mesh, unroll)
  x_1BD = jnp.take(x_1TD, batch.logits_indices_B, axis=1)
  return model.logits(x_1BD)[0], pages


def forward_with_token_logprobs(
    graphdef: nnx.GraphDef, params: nnx.State, pages: KVPages, batch: StepBatch,
    targets_T: jax.Array, *, backend: attention.AttentionBackend | str = attention.AttentionBackend.REFERENCE,
    mesh: Mesh | None = None, unroll: bool = False, lora_slots_T: jax.Array | None = None,
    with_head: Callable | None = None):
  """`forward`, plus per token t the logprob of targets_T[t] (the token after it; -1: none) and
  the top MAX_LOGPROBS, under the model's distribution at t: all zeros when no target is set.
  Returns (logits_BV, scored, pages[, head's result], expert_tokens_LE).

  with_head: called as with_head(head, logits_indices_B) -> (logits_BV, result), head(indices_R) giving
  the logits [R, V] at those token indices (speculative verification: the step's sampled rows and every
  drafted position in one product, so the LM head's weights are read once); `result` is returned fourth.
  The caller decides when the drafted rows run (inside its own lax.cond), so a step that verifies
  nothing computes no [R, V] logits."""
  model, x_1TD, pages, expert_tokens_LE = _layers(graphdef, params, pages, batch, backend, mesh,
                                                  unroll, lora_slots_T)
  scored = sampling.logprobs(lambda: model.logits(x_1TD)[0], targets_T, jnp.any(targets_T >= 0),
                             model.cfg.vocab_size)
  head = lambda indices_R: model.logits(jnp.take(x_1TD, indices_R, axis=1))[0]
  if with_head is None:
    return head(batch.logits_indices_B), scored, pages, expert_tokens_LE
  logits_BV, result = with_head(head, batch.logits_indices_B)
  return logits_BV, scored, pages, result, expert_tokens_LE


def _layers(graphdef, params, pages, batch, backend, mesh, unroll, lora_slots_T=None):
  """The model, the last layer's activations x_1TD (before the final norm), the pools and the
  assignments each layer's experts received from the step's tokens (int32 [L, E]; None: dense)."""
  model = nnx.merge(graphdef, params)
  L, _, G, _, H = pages.k_LPGKH.shape
  dt = jnp.dtype(model.cfg.compute_dtype(jax.default_backend()))
  inv_freq = model.inv_freq()
  positions_1T = batch.positions_T[None]
  slots_T = kv_cache.slot_mapping(batch.positions_T, batch.block_tables_BM, batch.cu_q_lens_B1,
                                  batch.num_seqs_1, G)
  valid_1T = (jnp.arange(batch.token_ids_T.shape[0]) < batch.cu_q_lens_B1[-1])[None]

  def layer(block_def, block_state, l, x_1TD, cache):
    if lora_slots_T is not None:
      block_state = lora.bind(block_state, lora_slots_T)
    block = nnx.merge(block_def, block_state)
    q_1TNH, k_1TKH, v_1TKH = block.attn.project_qkv(block.attn_norm(x_1TD), positions_1T, inv_freq)
    cache = kv_cache.write_step(cache, l, k_1TKH[0], v_1TKH[0], slots_T)
    k_PGKH, v_PGKH, tables_BM = kv_cache.layer_pages(cache, l, batch.block_tables_BM, dt)
    out_TNH = attention.ragged_paged_attention(
        backend, q_1TNH[0], k_PGKH, v_PGKH, batch.kv_lens_B, tables_BM,
        batch.cu_q_lens_B1, batch.num_seqs_1, sm_scale=H ** -0.5, mesh=mesh)
    x_1TD = x_1TD + block.attn.project_out(out_TNH[None])
    if isinstance(block.mlp, moe.MoE):
      y_1TD, aux = block.mlp.with_aux(block.mlp_norm(x_1TD), valid_1T)
      return x_1TD + y_1TD, cache, aux['expert_tokens'].astype(jnp.int32)
    return x_1TD + block.mlp(block.mlp_norm(x_1TD)), cache, None

  x_1TD = model.embed(batch.token_ids_T[None])
  counts = []  # per layer: int32 [E], or None (dense)
  if model.cfg.scan_layers and unroll:  # stacked params, each layer's slice taken statically
    layers_def, layers_state = nnx.split(model.layers)
    for l in range(L):
      x_1TD, pages, n_E = layer(layers_def, jax.tree.map(lambda x: x[l], layers_state), l, x_1TD,
                                pages)
      counts.append(n_E)
  elif model.cfg.scan_layers:
    layers_def, layers_state = nnx.split(model.layers)

    def body(carry, xs):
      layer_state, l = xs
      x_1TD, cache, n_E = layer(layers_def, layer_state, l, *carry)
      return (x_1TD, cache), n_E

    (x_1TD, pages), expert_tokens_LE = jax.lax.scan(
        body, (x_1TD, pages), (layers_state, jnp.arange(L, dtype=jnp.int32)))
  else:
    for l, block in enumerate(model.layers):
      x_1TD, pages, n_E = layer(*nnx.split(block), l, x_1TD, pages)
      counts.append(n_E)
  if counts:
    expert_tokens_LE = None if counts[0] is None else jnp.stack(counts)
  return model, x_1TD, pages, expert_tokens_LE
