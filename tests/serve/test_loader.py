"""What `stoker serve` loads (serve/loader.py): a Hugging Face directory served greedily as
`transformers` generates; a training checkpoint restored onto a 2-way tensor mesh serves what the
single-device one does; the training data's tokenizer is found from the saved config."""

import os
import shutil

import numpy as np
import pytest
import torch
import transformers

from serve import loader
from serve.engine import EngineConfig
from serve.sampling import SamplingParams
from tests.serve.server_fixtures import make_workdir

ENGINE = EngineConfig(num_pages=32, page_size=8, max_seqs=2, max_pages_per_seq=8, token_budget=32,
                      min_bucket=32)
PROMPTS = [[5, 17, 42, 7, 99], [3] * 11]


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
  return make_workdir(str(tmp_path_factory.mktemp('loader')))


def greedy(loaded, prompts, n=8):
  return loaded.engine.generate(prompts, SamplingParams(max_tokens=n))  # no stop ids: n tokens


def test_hf_dir_serves_what_transformers_generates(workdir, tmp_path):
  config = transformers.LlamaConfig(
      vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
      tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=0)
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(config).float().eval()
  with torch.no_grad():  # HF inits norms to 1; randomise them so the mapping of each matters
    for name, p in model.named_parameters():
      if name.endswith('norm.weight'):
        p.add_(0.1 * torch.randn_like(p))
  model.save_pretrained(tmp_path, safe_serialization=True)
  shutil.copy(os.path.join(os.path.dirname(workdir), 'data', 'tokenizer.json'), tmp_path)
  loaded = loader.load_hf(str(tmp_path), ENGINE)
  assert loaded.name == os.path.basename(tmp_path) and loaded.chat.is_default
  with torch.no_grad():
    expected = [model.generate(torch.tensor([p]), max_new_tokens=8, do_sample=False,
                               attention_mask=torch.ones(1, len(p), dtype=torch.long),
                               pad_token_id=0)[0, len(p):].tolist() for p in PROMPTS]
  assert greedy(loaded, PROMPTS) == expected


def test_checkpoint_on_a_tensor_mesh_serves_the_same(workdir):
  one = loader.load_checkpoint(workdir, ENGINE)
  two = loader.load_checkpoint(workdir, ENGINE, mesh=loader.serving_mesh(2))
  leaf = two.engine.params['embed_VD'].get_value()  # [V, D] as in the model
  assert len(leaf.sharding.device_set) == 2
  np.testing.assert_array_equal(np.asarray(leaf), np.asarray(one.engine.params['embed_VD'].get_value()))
  assert greedy(two, PROMPTS) == greedy(one, PROMPTS)
  assert one.name == 'run' and one.codec.vocab_size == 300 and one.codec.stop_token_ids == (0,)


def test_tokenizer_of_the_training_data(tmp_path):
  cfg = type('Cfg', (), {'vocab_size': 4096})
  saved = {'train': {'data': {'source': 'stdlib', 'cache_dir': str(tmp_path)}}}
  assert loader.training_tokenizer(saved, cfg) is None  # not prepared yet
  os.makedirs(tmp_path / 'stdlib-v4096')
  (tmp_path / 'stdlib-v4096' / 'tokenizer.json').write_text('{}')
  assert loader.training_tokenizer(saved, cfg) == str(tmp_path / 'stdlib-v4096' / 'tokenizer.json')
  assert loader.training_tokenizer({'train': {'data': {'source': 'synthetic'}}}, cfg) is None
  with pytest.raises(ValueError, match='tensor_parallel 99'):
    loader.serving_mesh(99)
