"""models/presets.py: the names a user may give a preset, and the error that lists them."""

from __future__ import annotations

import pytest

from models import presets


@pytest.mark.parametrize('name, want', [
    ('llama3_8b', 'llama3_8b'), ('llama3-8b', 'llama3_8b'), ('Llama-3-8B', 'llama3_8b'),
    ('meta-llama/Meta-Llama-3-8B', 'llama3_8b'), ('meta-llama/Meta-Llama-3-70B-Instruct', 'llama3_70b'),
    ('meta-llama/Llama-3.1-8B', 'llama31_8b'), ('Qwen/Qwen3-0.6B', 'qwen3_0_6b'),
    ('Qwen/Qwen2-0.5B-Instruct', 'qwen2_0_5b'), ('mistralai/Mistral-7B-v0.1', 'mistral_7b'),
    ('TINY', 'tiny'), ('Small', 'small')])
def test_hyphens_case_and_hugging_face_ids_name_presets(name, want):
  assert presets.resolve(name) == want
  assert presets.preset(name) == presets.PRESETS[want]


@pytest.mark.parametrize('name', ['llama9', 'meta-llama/Meta-Llama-3-9B', 'gpt2', ''])
def test_an_unknown_name_lists_the_presets(name):
  with pytest.raises(ValueError, match="Unknown model preset") as e:
    presets.preset(name)
  assert all(p in str(e.value) for p in presets.PRESETS)


def test_overrides_apply_to_a_resolved_name():
  assert presets.preset('Llama-3-8B', num_layers=2).num_layers == 2
