"""Knowledge distillation: the loss, and the frozen teacher the train step runs beside the student.

The loss of a batch (train/step.py adds it when `distill.teacher` is set) is

    alpha * T^2 * sum_t KL(softmax(teacher_t / T) || softmax(student_t / T)) + (1 - alpha) * CE

summed over the target tokens the loss mask keeps, like the cross-entropy, so gradient accumulation
and the division by the token count work unchanged. T^2 keeps the KL term's gradient on the scale of
the cross-entropy's as T grows (Hinton et al., 2015). With `top_k` > 0 both distributions are
renormalised over the teacher's k most likely tokens at each position: a teacher's logits could then
be stored as k (id, logit) pairs, and a student equal to its teacher still has KL 0.

The teacher is a Stoker workdir (its newest checkpoint) or a Hugging Face directory, restored onto
the training mesh by the same logical-axis rules as the student and passed to the compiled step as
an argument (never a constant folded into it); its logits are under stop_gradient. It must share
the student's vocabulary and tokenizer: the KL compares distributions token id by token id.

`distill.teacher_dtype='int8'` holds the teacher as int8 weights with W8A8 products (models/quant.py,
as `stoker serve --weight-dtype int8` runs them): a quarter of its float32 bytes. No gradient passes
through the teacher, so its rounded activations cost only the int8 model's own small error
(validation perplexity within 0.02% of float on the tiny preset, benchmarks/quantized_serving.py).
"""

from __future__ import annotations

import json
import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from models import checkpoint as model_checkpoint
from models import checkpoint_io, hf, hf_files, quant, transformer
from models.config import ModelConfig
from parallelism import sharding
from parallelism.rules import DEFAULT_RULES, Rules
from train import datasets
from train.config import DistillConfig, TrainConfig


def kl_BT(teacher_BTV: jax.Array, student_BTV: jax.Array, temperature: float = 1.0,
          top_k: int = 0) -> jax.Array:
  """KL(teacher_T || student_T) per position, in float32 (natural log)."""
  t_BTV = teacher_BTV.astype(jnp.float32) / temperature
  s_BTV = student_BTV.astype(jnp.float32) / temperature
  if top_k:
    t_BTV, ids_BTk = jax.lax.top_k(t_BTV, top_k)
    s_BTV = jnp.take_along_axis(s_BTV, ids_BTk, axis=-1)
  log_p_BTV = jax.nn.log_softmax(t_BTV, axis=-1)
  log_q_BTV = jax.nn.log_softmax(s_BTV, axis=-1)
  return jnp.sum(jnp.exp(log_p_BTV) * (log_p_BTV - log_q_BTV), axis=-1)


def kl_sum(teacher_BTV, student_BTV, weights_BT, cfg: DistillConfig) -> jax.Array:
  """The KL summed over the positions `weights_BT` keeps (the loss mask)."""
  return jnp.sum(kl_BT(teacher_BTV, student_BTV, cfg.temperature, cfg.top_k) * weights_BT)


def objective(ce_sum: jax.Array, kl: jax.Array, cfg: DistillConfig) -> jax.Array:
  """alpha * T^2 * KL + (1 - alpha) * CE (both summed over target tokens)."""
  return cfg.alpha * cfg.temperature ** 2 * kl + (1 - cfg.alpha) * ce_sum


class Teacher(NamedTuple):
  """The frozen teacher: its graph (static) and params (an argument of the compiled step)."""

  graphdef: Any
  params: nnx.State
  config: ModelConfig


def teacher_logits(graphdef, params, batch) -> jax.Array:
  """The teacher's float32 logits of the batch's inputs; no gradient flows into it."""
  model = nnx.merge(graphdef, jax.lax.stop_gradient(params))
  return jax.lax.stop_gradient(model(batch['inputs'], batch['positions'], batch['segment_ids']))


def teacher_config(path: str) -> ModelConfig:
  """The ModelConfig of a teacher given as a Stoker workdir or a Hugging Face directory."""
  if checkpoint_io.is_hf_dir(path):
    return hf.config_from_hf(hf_files.read_config(path))
  return checkpoint_io.read_model_config(path)


def tokenizer_file(path: str) -> str | None:
  """The tokenizer.json a model directory or workdir was trained with, if it can be found."""
  if checkpoint_io.is_hf_dir(path):
    found = os.path.join(path, 'tokenizer.json')
    return found if os.path.isfile(found) else None
  directory = model_checkpoint.step_dir(path)
  sidecar = os.path.join(os.path.dirname(os.path.dirname(directory)), checkpoint_io.HF_SUBDIR,
                         'tokenizer.json')
  if os.path.isfile(sidecar):
    return sidecar
  saved = model_checkpoint.saved_config(directory)
  data = (saved.get('train') or {}).get('data') or {}
  source = data.get('source', 'synthetic')
  if source == 'synthetic':
    return None
  if source == 'stdlib':
    vocab = saved['train']['model']['vocab_size']
    source = os.path.join(os.path.expanduser(data.get('cache_dir', '~/.cache/stoker/data')),
                          f'stdlib-v{vocab}')
  found = os.path.join(source, 'tokenizer.json')
  return found if os.path.isfile(found) else None


def _vocabulary(tokenizer_json: str) -> tuple:
  with open(tokenizer_json) as f:
    spec = json.load(f)
  model = spec.get('model') or {}
  added = sorted((t.get('id'), t.get('content')) for t in spec.get('added_tokens') or [])
  return model.get('type'), json.dumps(model.get('vocab'), sort_keys=True), tuple(added)


def check_teacher(cfg: TrainConfig, teacher_cfg: ModelConfig, student_tokenizer: str | None,
                  teacher_tokenizer: str | None) -> None:
  """Refuses a teacher whose vocabulary or tokenizer differs from the student's."""
  where = f'distill.teacher={cfg.distill.teacher!r}'
  if teacher_cfg.vocab_size != cfg.model.vocab_size:
    raise ValueError(
        f'{where} has vocab_size {teacher_cfg.vocab_size}, the student {cfg.model.vocab_size}: '
        'distillation compares the two distributions token by token, so both must share one '
        'vocabulary. Distil into a student pruned from (or converted with the tokenizer of) this '
        'teacher.')
  if student_tokenizer and teacher_tokenizer and (
      _vocabulary(student_tokenizer) != _vocabulary(teacher_tokenizer)):
    raise ValueError(
        f'{where} was trained with the tokenizer {teacher_tokenizer}, the student with another '
        f'({student_tokenizer}) of the same size: token ids mean different strings, so its '
        'distribution cannot teach this student. Train the student on data prepared with the '
        "teacher's tokenizer (stoker prepare --tokenizer).")


def validate(cfg: TrainConfig) -> None:
  """Fails, naming the problem, unless cfg.distill's teacher (if any) can teach cfg's student."""
  path = cfg.distill.teacher
  if not path:
    return
  if not os.path.isdir(path):
    raise FileNotFoundError(f"distill.teacher={path!r}: no such directory; give a Stoker training "
                            'workdir or a Hugging Face model directory.')
  directory = datasets.data_dir(cfg)
  student_tokenizer = os.path.join(directory, 'tokenizer.json') if directory else None
  if student_tokenizer and not os.path.isfile(student_tokenizer):
    student_tokenizer = None
  check_teacher(cfg, teacher_config(path), student_tokenizer, tokenizer_file(path))


def load_teacher(cfg: TrainConfig, mesh, rules: Rules = DEFAULT_RULES) -> Teacher | None:
  """The teacher named by cfg.distill, checked and restored onto `mesh`; None when it is unset."""
  path = cfg.distill.teacher
  if not path:
    return None
  validate(cfg)
  shardings_for = lambda a: sharding.logical_shardings(a, mesh, rules)
  model_cfg, params = checkpoint_io.load(path, shardings_for=shardings_for, remat='none')
  if cfg.distill.teacher_dtype == 'int8':
    params = jax.jit(quant.quantize_params, donate_argnums=0, out_shardings=shardings_for(
        jax.eval_shape(quant.quantize_params, params)))(params)
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: transformer.Transformer(model_cfg, nnx.Rngs(0))))
  return Teacher(graphdef, params, model_cfg)


def add_arguments(p) -> None:
  """`stoker distill`'s flags: `stoker train` on the student's train.gin with distill.teacher set."""
  p.add_argument('--teacher', required=True,
                 help='A Stoker training workdir (its newest checkpoint) or a Hugging Face directory.')
  p.add_argument('--student', required=True,
                 help='The workdir to train (from `stoker prune`; its train.gin is the recipe).')
  p.add_argument('--gin_file', action='append', default=[],
                 help="More gin files after STUDENT/train.gin; repeatable.")
  p.add_argument('--gin_param', action='append', default=[],
                 help="A binding such as 'distill.alpha=0.5' or 'distill.top_k=64'; repeatable.")


def command(args, run_training) -> int:
  """`stoker distill`: `run_training(gin files, bindings, workdir)` (the `stoker train` path) on the
  student's train.gin with distill.teacher bound; the flags' other gin files and bindings after."""
  return run_training([os.path.join(args.student, 'train.gin'), *args.gin_file],
                      [f'distill.teacher={os.path.abspath(args.teacher)!r}', *args.gin_param],
                      args.student)
