"""The GRPO loop: sample with the in-process engine, score, step the policy, hand the engine the new
weights. Trainer and engine share the process and the devices; the weights never leave them.

One step s:
  1. sample  rl.group_size completions of each of the step's rl.prompts_per_step prompts with the
             engine (rl/rollout.py: deterministic prompts and per-request seeds), keeping the
             engine's log-probability of every sampled token;
  2. score   every completion with the gin-named rewards (rl/rewards.py: one that raises scores 0)
             and take group-relative advantages of their weighted sum (rl/grpo.py);
  3. train   rl.minibatches optimizer steps on the clipped objective, each on a slice of the
             groups, with the sampler's log-probabilities as the old policy (rl/step.py);
  4. update  engine.update_params(new params): each leaf is put where the engine's copy lives
             (a no-op where the shardings agree; one on-device copy where the engine sits on one
             device of the training mesh) and the prefix cache, whose KV the old weights computed,
             is flushed.
With LoRA (lora.base) the state trains adapters alone; the base is a frozen input of the step and
the KL reference (adapters off), and the engine gets the base with the adapters merged (one jitted
merge per step, on device). Merged and attached weights round differently (W + s a b against
x W + s (x a) b), one of the places where the importance ratio corrects a sampler/trainer gap.
Held-out greedy evaluation (rl.eval_every) runs on the engine after an update; the prefix cache is
flushed again before the next sampling, so every step samples from an empty cache (a resumed run
samples what the uninterrupted one did).

Checkpoints and failures are training's: train/checkpoint.py saves the TrainState (a workdir that
`stoker serve` reads) every checkpoint.every_steps steps and at the end, and a run on a workdir with
checkpoints resumes. The prompts are a function of the step, so no data-iterator state is saved.
Neither computation of the step donates the state, so the state before a step stays intact until
the step ends: train/recovery.py saves it just in time when the step fails or hangs, and the state
after a finished step on SIGTERM/SIGINT.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import time
from typing import Callable

import jax
import numpy as np
import tokenizers
from flax import nnx

from models import checkpoint_io, lora
from parallelism import sharding
from parallelism.mesh import make_mesh
from parallelism.rules import DEFAULT_RULES
from rl import grpo, rewards, rollout, tasks
from rl import step as step_lib
from rl.config import RLConfig
from serve.engine import Engine
from serve.sampling import SamplingParams
from train import faults, finetune
from train.checkpoint import Checkpoints
from train.metrics import MetricsWriter
from train.optimizer import make_optimizer
from train.recovery import Recovery
from train.step import TrainState


class Run:
  """What the loop holds between steps; `on_step` callbacks (tests, benchmarks) read it."""

  def __init__(self, cfg: RLConfig, workdir: str):
    self.cfg = cfg
    paths = task_paths(cfg, workdir)
    self.tokenizer = tokenizers.Tokenizer.from_file(paths['tokenizer'])
    self.stop_id = self.tokenizer.token_to_id(tasks.EOS)
    if self.stop_id is None:
      raise ValueError(f'{paths["tokenizer"]} has no {tasks.EOS!r} token to end completions with.')
    self.rows = rollout.read_rows(paths['train'])
    self.held_out = rollout.read_rows(paths['held_out'])[:cfg.eval_prompts or None]
    self.reward_fns = rewards.resolve(cfg.reward_fns)
    self.sampling = SamplingParams(max_tokens=cfg.max_tokens, temperature=cfg.temperature,
                                   top_k=cfg.top_k, top_p=cfg.top_p, stop_token_ids=(self.stop_id,))
    self.engine: Engine | None = None
    self.state: TrainState | None = None
    self.policy = lambda params: params  # the trained params -> the model's (LoRA: merged)
    self.frozen: dict = {}  # the step's frozen inputs: {'base'} (LoRA) or {'reference'} (beta > 0)

  def step_rows(self, step: int) -> list[dict]:
    idx = rollout.prompt_indices(len(self.rows), step, self.cfg.prompts_per_step, self.cfg.seed)
    return [self.rows[i] for i in idx]

  def sample(self, engine: Engine, step: int) -> rollout.Samples:
    return rollout.sample(engine, self.tokenizer, self.step_rows(step), self.cfg.group_size,
                          step=step, seed=self.cfg.seed, params=self.sampling)

  def evaluate(self) -> dict[str, float]:
    """Means of every reward over greedy completions of the held-out prompts."""
    texts = rollout.greedy(self.engine, self.tokenizer, self.held_out, self.cfg.max_tokens,
                           self.stop_id)
    scores = rewards.score(self.reward_fns, self.held_out, texts)
    return {f'eval_{name}': float(np.mean(v)) for name, v in scores.items()}


def task_paths(cfg: RLConfig, workdir: str) -> dict[str, str]:
  """The prompt files and tokenizer: rl.task_dir's, or the addition task written into the workdir."""
  directory = cfg.task_dir or os.path.join(workdir, 'task')
  names = {'train': 'prompts-train.jsonl', 'held_out': 'prompts-held-out.jsonl',
           'tokenizer': 'tokenizer.json'}
  paths = {k: os.path.join(directory, v) for k, v in names.items()}
  if not cfg.task_dir and not all(map(os.path.exists, paths.values())):
    tasks.write_task(directory, seed=cfg.seed)
  missing = [p for p in paths.values() if not os.path.exists(p)]
  if missing:
    raise FileNotFoundError(f'rl.task_dir={cfg.task_dir!r} lacks {missing}; write one with '
                            'rl/tasks.write_task, or leave rl.task_dir empty for the addition task.')
  return paths


def initial_params(cfg: RLConfig, mesh, rules=DEFAULT_RULES) -> nnx.State:
  """What the state trains at step 0, on `mesh`: rl.init's weights, or fresh ones (a new model
  from rl.seed, or new LoRA adapters over lora.base)."""
  shardings_for = lambda a: sharding.logical_shardings(a, mesh, rules)
  if not cfg.init:
    return sharding.init_sharded(lambda: step_lib.fresh_params(cfg), mesh, rules)[0]
  if not os.path.isdir(cfg.init):
    raise FileNotFoundError(f'rl.init={cfg.init!r}: no such directory; give a training workdir or a '
                            "Hugging Face model directory (or '' for a fresh model).")
  saved = checkpoint_io.read_config(cfg.init)
  ours = dataclasses.replace(saved, **{f: getattr(cfg.model, f) for f in finetune.EXECUTION_FIELDS})
  if ours != cfg.model:
    raise ValueError(f'rl.init={cfg.init!r} holds another model ({saved}) than rl.model '
                     f'({cfg.model}); bind model(...) to the saved architecture.')
  return checkpoint_io.load(cfg.init, shardings_for=shardings_for,
                            **{f: getattr(cfg.model, f) for f in finetune.EXECUTION_FIELDS})[1]


def train(cfg: RLConfig, workdir: str, config_text: str = '',
          on_step: Callable[[Run, int], None] | None = None, progress: bool = True) -> list[dict]:
  """Runs GRPO up to rl.steps, resuming from <workdir>/checkpoints; returns the records this call
  logged (also in <workdir>/metrics.jsonl). `on_step(run, step)` is called after each step's
  update (run.state, run.engine hold the new weights). Raises faults.TrainingInterrupted after a
  just-in-time save."""
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    json.dump(dataclasses.asdict(cfg), f, indent=2, default=str)
  run = Run(cfg, workdir)
  mesh = make_mesh(cfg.mesh, jax.devices()[:cfg.devices or None])
  tx = make_optimizer(cfg.optimizer, cfg.steps * cfg.minibatches)
  abstract = jax.eval_shape(lambda: step_lib.abstract_state(cfg, tx))
  shardings = sharding.logical_shardings(abstract, mesh)
  target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract,
                        shardings)
  ckpts = Checkpoints(workdir, cfg.checkpoint, cfg, config_text)
  try:
    start = ckpts.latest_step()
    params0 = initial_params(cfg, mesh) if start is None or cfg.beta else None
    frozen = {'reference': params0} if cfg.beta else {}
    if finetune.enabled(cfg):  # the base: frozen, the reference (adapters off), merged for the engine
      frozen = {'base': finetune.load_base(cfg.lora.base, cfg.model, mesh, DEFAULT_RULES)}
      merge = jax.jit(functools.partial(lora.merge, cfg.model, lora=cfg.lora))
      run.policy = lambda adapters: merge(frozen['base'], adapters)
    run.frozen = frozen
    if start is None:
      start = 0
      run.state = jax.jit(lambda p: TrainState(jax.numpy.zeros((), jax.numpy.int32), p, tx.init(p)),
                          out_shardings=shardings)(params0)
    else:
      run.state, _ = ckpts.restore(start, target)
      logging.info('Resumed from the checkpoint of step %d in %s.', start, workdir)
    if start >= cfg.steps:
      return []
    step_fn = step_lib.compile_step(cfg, mesh, tx, shardings, frozen)
    run.engine = Engine(cfg.model, jax.device_put(run.policy(run.state.params), mesh.devices.flat[0]),
                        cfg.engine)
    return _loop(cfg, run, start, step_fn, ckpts, workdir, mesh, on_step, progress, target)
  finally:
    ckpts.close()


def _loop(cfg, run, start, step_fn, ckpts, workdir, mesh, on_step, progress, target) -> list[dict]:
  logged = []
  recovery = Recovery(cfg.checkpoint, ckpts, workdir, restart=lambda: None, target=target,
                      data=None, initial_data=None)
  injector = faults.FaultInjector(cfg.fault, start)
  batch_sharding = {k: v.sharding for k, v in step_lib.batch_spec(cfg, mesh).items()}
  with MetricsWriter(workdir, resume_step=start, enabled=jax.process_index() == 0) as writer, \
       faults.SignalGuard() as guard, \
       faults.Watchdog(cfg.checkpoint.hang_timeout_s, recovery.on_hang) as watchdog:
    flush = False  # the engine ran something since its last update: empty its prefix cache
    if start == 0 and cfg.eval_every:
      record = run.evaluate()
      writer.write(0, record)
      logged.append({'step': 0, **record})
      flush = True
    for step in range(start, cfg.steps):
      recovery.mark(step, run.state, None)
      with recovery.guard_step(step):
        if flush:
          run.engine.scheduler.allocator.flush()
        samples = run.sample(run.engine, step)
        clock = time.perf_counter()
        rows = [r for r in run.step_rows(step) for _ in range(cfg.group_size)]
        scores = rewards.score(run.reward_fns, rows, samples.texts)
        total = sum(w * scores[n] for w, n in zip(cfg.weights, cfg.reward_fns))
        adv = np.asarray(grpo.advantages(total.reshape(-1, cfg.group_size), cfg.scale_std)).ravel()
        batch = step_lib.pack(cfg, samples.prompts, samples.completions, samples.logprobs, adv)
        score_s = time.perf_counter() - clock
        injector.during_step(step)
        clock = time.perf_counter()
        state, metrics = _train(step_fn, run.state, batch, cfg.minibatches, batch_sharding)
        train_s = time.perf_counter() - clock
      watchdog.beat()
      run.state = state
      clock = time.perf_counter()
      run.engine.update_params(run.policy(state.params))
      update_s = time.perf_counter() - clock
      flush = False
      record = {**{f'reward_{n}_{stat}': float(f(scores[n])) for n in cfg.reward_fns
                   for stat, f in (('mean', np.mean), ('std', np.std))},
                'reward_mean': float(np.mean(total)), **metrics,
                'sample_s': samples.seconds, 'score_s': score_s, 'train_s': train_s,
                'update_s': update_s, 'sampled_tokens': samples.tokens,
                'sample_tokens_per_s': samples.tokens / samples.seconds}
      if cfg.eval_every and ((step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps):
        with watchdog.paused():
          record.update(run.evaluate())
        flush = True
      record['time'] = time.time()
      writer.write(step + 1, record)
      logged.append({'step': step + 1, **record})
      if progress:
        print(f"step {step + 1:>5}  reward {record['reward_mean']:.3f}  "
              + ''.join(f"{k} {v:.3f}  " for k, v in record.items() if k.startswith('eval_'))
              + f"kl {record['kl']:.4f}  clip {record['clip_fraction']:.3f}  "
              f"sample {samples.seconds:.2f}s train {train_s:.2f}s", flush=True)
      if on_step is not None:  # what it runs on the engine stays in the prefix cache
        on_step(run, step + 1)
      recovery.mark(step + 1, run.state, None)
      every = cfg.checkpoint.every_steps
      if every and (step + 1) % every == 0 and step + 1 < cfg.steps:
        with watchdog.paused():
          ckpts.save(step + 1, run.state, None)
      if guard.received is not None and step + 1 < cfg.steps:
        with watchdog.paused():
          recovery.preempt(guard.received)
    with watchdog.paused():
      ckpts.save(cfg.steps, run.state, None, wait=True)
  return logged


def _train(step_fn, state, batch, minibatches: int, shardings) -> tuple[TrainState, dict]:
  """`minibatches` optimizer steps, each on a slice of whole groups; the metrics averaged, but
  'sampler_gap' from the first (where trainer and sampler hold the same weights)."""
  B = len(batch['advantages_B']) // minibatches
  records = []
  for m in range(minibatches):
    part = {k: jax.device_put(v[m * B:(m + 1) * B], shardings[k]) for k, v in batch.items()}
    grads, metrics = step_fn.grad(state, part, step_fn.frozen)
    state, update_metrics = step_fn.update(state, grads)
    records.append({**metrics, **update_metrics})
  records = jax.device_get(records)
  out = {k: float(np.mean([r[k] for r in records])) for k in records[0]}
  out['sampler_gap'] = float(records[0]['sampler_gap'])
  out['skipped_steps'] = float(records[-1]['skipped_steps'])
  del out['nonfinite_streak']
  return state, out
