"""Hugging Face <-> Stoker conversion through files, against `transformers` (PyTorch CPU, float32).

Each family's tiny random model is saved with save_pretrained (one of them sharded with an index),
converted into a training workdir (step 0), read back the way serving reads it, and compared with
the PyTorch model: logits within f32 tolerance, greedy generations (the serving Engine vs
`generate`) identical; exported back, every tensor equals the original and the tokenizer files
come along unchanged.
"""

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file, save_file

from models import checkpoint_io, hf, hf_files
from serve.engine import Engine, EngineConfig
from serve.sampling import SamplingParams
from tests.models.hf_reference import hf_logits, tiny_hf_model
from train import from_hf

ATOL = 1e-4  # float32 logits of magnitude ~1 after two layers (DESIGN.md, tolerances)
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

FAMILIES = {
    'llama2': ('llama', dict(num_key_value_heads=4)),
    'llama3': ('llama', dict(rope_theta=500_000.0)),
    'llama31': ('llama', dict(rope_theta=500_000.0, rope_scaling=dict(
        rope_type='llama3', factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=32))),
    'mistral': ('mistral', {}),
    'qwen2': ('qwen2', dict(rms_norm_eps=1e-6, tie_word_embeddings=True)),
    'qwen3': ('qwen3', dict(rms_norm_eps=1e-6)),
}
CHAT_TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"


# The fine-tuning recipe: tiny_cpu.gin on synthetic data, two short steps.
RECIPE = ['train/tiny_cpu.gin']
RECIPE_PARAMS = ["data.source = 'synthetic'", 'data.eval_every = 0', 'train.steps = 2',
                 'train.batch_size = 8', 'train.seq_len = 16', 'train.log_every = 1',
                 'checkpoint.every_steps = 0', 'checkpoint.just_in_time = False']


def convert(hf_dir, workdir):
  import configs
  files = [configs.resolve(f) for f in RECIPE]
  return from_hf.from_hf(hf_dir, workdir, configs.load_train_config(files, RECIPE_PARAMS), files,
                         RECIPE_PARAMS)


def save_tokenizer(directory):
  """A word-level tokenizer.json and a tokenizer_config.json with a chat template."""
  from tokenizers import Tokenizer, models, pre_tokenizers
  tok = Tokenizer(models.WordLevel({f'w{i}': i for i in range(128)}, unk_token='w0'))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.save(os.path.join(directory, 'tokenizer.json'))
  with open(os.path.join(directory, 'tokenizer_config.json'), 'w') as f:
    json.dump({'chat_template': CHAT_TEMPLATE, 'eos_token': 'w2'}, f)


# One xdist group per family: its tests share one conversion, families spread over workers.
@pytest.fixture(scope='module', params=[pytest.param(n, marks=pytest.mark.xdist_group(f'hf-{n}'))
                                        for n in sorted(FAMILIES)])
def converted(request, tmp_path_factory):
  """(name, torch model, its HF dir, the converted workdir)."""
  name = request.param
  family, kwargs = FAMILIES[name]
  model = tiny_hf_model(family, **kwargs)
  root = tmp_path_factory.mktemp(name)
  hf_dir, workdir = str(root / 'hf'), str(root / 'work')
  # The llama2 checkpoint is sharded (with an index), as large ones are.
  model.save_pretrained(hf_dir, max_shard_size='100KB' if name == 'llama2' else '5GB')
  save_tokenizer(hf_dir)
  convert(hf_dir, workdir)
  return name, model, hf_dir, workdir


def tokens(batch=2, length=24, seed=0):
  return np.random.default_rng(seed).integers(0, 128, (batch, length)).astype(np.int32)


def test_logits_match_transformers(converted):
  _, model, _, workdir = converted
  cfg, params = checkpoint_io.read_params(workdir, dtype='float32')
  assert cfg == hf.config_from_hf(model.config.to_dict(), dtype='float32')
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: _model(cfg)))
  ids = tokens()
  got = jax.jit(lambda p, t: nnx.merge(graphdef, p)(t))(params, jnp.asarray(ids))
  np.testing.assert_allclose(np.asarray(got), hf_logits(model, ids),
                             atol=ATOL, rtol=0)


def _model(cfg):
  from models import transformer
  return transformer.Transformer(cfg, nnx.Rngs(0))


def test_served_greedy_generations_match_transformers_generate(converted):
  name, model, hf_dir, workdir = converted
  # The converted checkpoint; and (once, for the sharded checkpoint) the HF directory served directly.
  for path in (workdir, hf_dir) if name == 'llama2' else (workdir,):
    cfg, params = checkpoint_io.load(path, dtype='float32')
    engine = Engine(cfg, params, EngineConfig(num_pages=32, page_size=8, max_seqs=2,
                                              max_pages_per_seq=4, token_budget=32, min_bucket=32))
    prompts = [list(tokens(1, n, seed=n)[0]) for n in (5, 11)]
    got = engine.generate(prompts, SamplingParams(max_tokens=10))
    for prompt, out in zip(prompts, got):
      with torch.no_grad():
        ref = model.generate(torch.as_tensor([prompt]), max_new_tokens=10, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
      assert out == ref[0, len(prompt):].tolist(), path


def test_round_trip_to_hf_gives_the_original_tensors_and_files(converted, tmp_path):
  name, model, hf_dir, workdir = converted
  out = str(tmp_path / 'exported')
  written = checkpoint_io.to_hf(workdir, out, max_shard_bytes=60_000)
  assert 'model.safetensors.index.json' in written and 'tokenizer.json' in written
  reader = hf_files.Reader(out)
  original = model.state_dict()
  expected = {k for k in original if not (model.config.tie_word_embeddings and k == 'lm_head.weight')}
  assert set(reader) == expected
  for k in expected:
    np.testing.assert_array_equal(reader[k], original[k].numpy(), err_msg=k)
  for f in ('tokenizer.json', 'tokenizer_config.json'):
    with open(os.path.join(hf_dir, f), 'rb') as a, open(os.path.join(out, f), 'rb') as b:
      assert a.read() == b.read()
  with open(os.path.join(out, 'config.json')) as f:
    exported = json.load(f)
  assert hf.config_from_hf(exported) == hf.config_from_hf(model.config.to_dict())
  assert exported['model_type'] == FAMILIES[name][0]
  import transformers
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  ids = tokens(1, 12)
  np.testing.assert_array_equal(hf_logits(reloaded, ids), hf_logits(model, ids))
  with pytest.raises(ValueError, match='exists and is not empty'):
    checkpoint_io.to_hf(workdir, out)  # never deletes what is there


@pytest.mark.slow
@pytest.mark.xdist_group('hf-llama31')
@pytest.mark.parametrize('converted', ['llama31'], indirect=True)  # RoPE scaling: train.gin binds it
def test_fine_tuning_resumes_the_converted_workdir(converted, tmp_path):
  """`stoker train --gin_file WORKDIR/train.gin` picks up step 0 and trains from the HF weights."""
  _, _, hf_dir, converted_dir = converted
  workdir = str(tmp_path / 'work')
  shutil.copytree(converted_dir, workdir)
  with open(os.path.join(workdir, 'train.gin')) as f:  # the copy's own recipe is the same file
    assert "import train.from_hf" in f.read()
  import configs
  from train.checkpoint import restore_arrays
  from train.loop import train
  cfg = configs.load_train_config([os.path.join(workdir, 'train.gin')])
  assert cfg.model == checkpoint_io.read_model_config(workdir)
  _, before = checkpoint_io.read_params(workdir)
  logged = train(cfg, workdir, progress=False)
  assert [r['step'] for r in logged] == [1, 2]
  step, after = restore_arrays(workdir)
  assert step == 2
  q0 = np.asarray(before['layers']['attn']['q_DNH'][...])
  q2 = np.asarray(after['params']['layers']['attn']['q_DNH']['value'])
  assert q0.shape == q2.shape and 0 < np.abs(q2 - q0).max() < 0.1  # trained from, not replaced
  with pytest.raises(ValueError, match='already holds checkpoints'):
    convert(hf_dir, workdir)


@pytest.fixture(scope='module')
def llama_dir(tmp_path_factory):
  directory = tmp_path_factory.mktemp('bad')
  tiny_hf_model('llama').save_pretrained(str(directory / 'ok'))
  return directory


def _variant(llama_dir, name, edit_config=None, edit_tensors=None):
  src, dst = llama_dir / 'ok', llama_dir / name
  dst.mkdir()
  with open(src / 'config.json') as f:
    config = json.load(f)
  tensors = load_file(str(src / 'model.safetensors'))
  if edit_config:
    edit_config(config)
  if edit_tensors:
    edit_tensors(tensors)
    save_file(tensors, str(dst / 'model.safetensors'))
  else:
    os.link(src / 'model.safetensors', dst / 'model.safetensors')
  with open(dst / 'config.json', 'w') as f:
    json.dump(config, f)
  return str(dst)


@pytest.mark.parametrize('case,message', [
    ('arch', "Unsupported model: model_type='gpt2'"),
    ('act', "hidden_act='gelu'"),
    ('window', 'sliding_window=16 < max_position_embeddings=256'),
    ('missing', "1 missing: model.layers.1.mlp.up_proj.weight"),
    ('extra', "1 unexpected: model.layers.0.self_attn.o_proj.bias"),
    ('shape', 'model.embed_tokens.weight: expected (128, 64), found (100, 64)'),
    ('config', '6 wrong shape: model.layers.0.mlp.down_proj.weight: expected (64, 96), found (64, 160)'),
])
def test_bad_inputs_name_what_was_expected_and_found(llama_dir, case, message):
  edits = {
      'arch': dict(edit_config=lambda c: c.update(model_type='gpt2', architectures=['GPT2LMHeadModel'])),
      'act': dict(edit_config=lambda c: c.update(hidden_act='gelu')),
      'window': dict(edit_config=lambda c: c.update(model_type='mistral', architectures=[
          'MistralForCausalLM'], sliding_window=16)),
      'missing': dict(edit_tensors=lambda t: t.pop('model.layers.1.mlp.up_proj.weight')),
      'extra': dict(edit_tensors=lambda t: t.update({'model.layers.0.self_attn.o_proj.bias':
                                                        np.zeros(64, np.float32)})),
      'shape': dict(edit_tensors=lambda t: t.update({'model.embed_tokens.weight':
                                                        np.zeros((100, 64), np.float32)})),
      'config': dict(edit_config=lambda c: c.update(intermediate_size=96)),
  }
  directory = _variant(llama_dir, case, **edits[case])
  with pytest.raises(ValueError, match=message.replace('(', r'\(').replace(')', r'\)')):
    hf_files.load_params(directory)


def test_pickle_checkpoints_are_refused(tmp_path):
  (tmp_path / 'config.json').write_text(json.dumps(tiny_hf_model('llama').config.to_dict()))
  (tmp_path / 'pytorch_model.bin').write_bytes(b'not loaded')
  with pytest.raises(FileNotFoundError, match=r"pickle checkpoints \['pytorch_model.bin'\]"):
    hf_files.load_params(str(tmp_path))


@pytest.mark.slow
def test_convert_command_both_ways(llama_dir, tmp_path):
  env = {k: v for k, v in os.environ.items() if k not in ('XLA_FLAGS', 'JAX_PLATFORMS')}

  def stoker(*args):
    return subprocess.run([sys.executable, os.path.join(REPO, 'cli.py'), 'convert', *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)

  work, out = str(tmp_path / 'work'), str(tmp_path / 'out')
  result = stoker('--from-hf', str(llama_dir / 'ok'), '--out', work,
                  '--gin_param', "data.source='synthetic'")
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'train.gin' in result.stdout
  result = stoker('--to-hf', work, '--out', out)
  assert result.returncode == 0, result.stderr[-3000:]
  original = load_file(str(llama_dir / 'ok' / 'model.safetensors'))
  exported = load_file(os.path.join(out, 'model.safetensors'))
  assert original.keys() == exported.keys()
  assert all(np.array_equal(original[k], exported[k]) for k in original)


@pytest.mark.xdist_group('hf-qwen3')
@pytest.mark.parametrize('converted', ['qwen3'], indirect=True)  # the engine path: every family
def test_stoker_serve_answers_like_transformers_generate(converted):
  """The converted workdir behind the OpenAI-compatible server, its tokenizer from WORKDIR/hf."""
  _, model, _, workdir = converted
  import urllib.request
  from serve import loader
  from serve.server import BackgroundServer, Service, ServerConfig
  from serve.text import Codec
  engine_cfg = EngineConfig(num_pages=32, page_size=8, max_seqs=2, max_pages_per_seq=4,
                            token_budget=32, min_bucket=32)
  tokenizer = os.path.join(workdir, checkpoint_io.HF_SUBDIR)
  server = BackgroundServer(Service(ServerConfig(port=0), lambda: loader.load_checkpoint(
      workdir, engine_cfg, tokenizer=tokenizer))).start()
  try:
    server.wait_ready(300)
    prompt = [int(t) for t in tokens(1, 6, seed=3)[0]]
    body = {'model': 'work', 'prompt': prompt, 'max_tokens': 8, 'temperature': 0,
            'ignore_eos': True}
    request = urllib.request.Request(server.url + '/v1/completions', json.dumps(body).encode(),
                                     {'Content-Type': 'application/json'})
    with urllib.request.urlopen(request, timeout=120) as response:
      got = json.loads(response.read())
  finally:
    server.stop()
  with torch.no_grad():
    ref = model.generate(torch.as_tensor([prompt]), max_new_tokens=8, do_sample=False,
                         eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
  codec = Codec.from_file(os.path.join(tokenizer, 'tokenizer.json'))
  assert got['choices'][0]['text'] == codec.decode(ref)
  assert got['usage']['completion_tokens'] == 8


def test_bfloat16_checkpoints_round_trip_bit_exactly(tmp_path):
  """Most published checkpoints are bfloat16: read (as float32 params), written back as bfloat16."""
  model = tiny_hf_model('qwen2').to(torch.bfloat16)
  model.save_pretrained(str(tmp_path / 'hf'))
  cfg, params = hf_files.load_params(str(tmp_path / 'hf'))
  assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype('float32')}
  base = hf_files.read_config(str(tmp_path / 'hf'))
  hf_files.write(str(tmp_path / 'out'), cfg, params, base_config=base)
  reader = hf_files.Reader(str(tmp_path / 'out'))
  for name, tensor in model.state_dict().items():
    if name == 'lm_head.weight' and cfg.tie_embeddings:
      continue
    assert reader[name].dtype == jnp.bfloat16, name
    np.testing.assert_array_equal(reader[name].view(np.uint16),
                                  tensor.view(torch.int16).numpy().view(np.uint16), err_msg=name)
