"""Chat templates (serve/chat.py): the documented default, a Hugging Face style template from
tokenizer_config.json, and template errors as ChatTemplateError (the server's 400)."""

import json

import pytest

from serve.chat import ChatTemplate, ChatTemplateError, load_template

MESSAGES = [{'role': 'system', 'content': 'Be terse.'}, {'role': 'user', 'content': 'Hi'}]

# The shape of Hugging Face templates (here a ChatML one that rejects bad roles).
CHATML = ("{{ bos_token }}{% for m in messages %}"
          "{% if m['role'] not in ['system', 'user', 'assistant'] %}"
          "{{ raise_exception('Unknown role: ' + m['role']) }}{% endif %}"
          "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_default_template_is_the_documented_one():
  assert ChatTemplate().render(MESSAGES) == '<|system|>\nBe terse.\n<|user|>\nHi\n<|assistant|>\n'
  assert ChatTemplate().render(MESSAGES, add_generation_prompt=False) == (
      '<|system|>\nBe terse.\n<|user|>\nHi\n')


def test_template_from_tokenizer_config(tmp_path):
  (tmp_path / 'tokenizer_config.json').write_text(json.dumps({'chat_template': CHATML}))
  template = ChatTemplate(load_template(str(tmp_path)), bos_token='<s>')
  assert template.render(MESSAGES) == ('<s><|im_start|>system\nBe terse.<|im_end|>\n'
                                       '<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n')
  with pytest.raises(ChatTemplateError, match='Unknown role: tool'):
    template.render([{'role': 'tool', 'content': 'x'}])


def test_named_templates_and_missing_files(tmp_path):
  assert load_template(str(tmp_path)) is None and load_template(None) is None
  (tmp_path / 'tokenizer_config.json').write_text(json.dumps(
      {'chat_template': [{'name': 'tool_use', 'template': 'T'}, {'name': 'default', 'template': 'D'}]}))
  assert load_template(str(tmp_path)) == 'D'


def test_broken_templates_fail_clearly():
  with pytest.raises(ValueError, match='does not compile'):
    ChatTemplate('{% for m in messages %}')
  with pytest.raises(ChatTemplateError, match='cannot render'):
    ChatTemplate('{{ messages[0].nope.deeper }}').render(MESSAGES)
  with pytest.raises(ChatTemplateError):  # the sandbox refuses attribute escapes
    ChatTemplate("{{ messages.__class__.__mro__[1].__subclasses__() }}").render(MESSAGES)
