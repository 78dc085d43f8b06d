"""Chat templates (data/chat.py): the documented default, a Hugging Face style template from
tokenizer_config.json, and template errors as ChatTemplateError (the server's 400)."""

import json

import pytest

from data.chat import (ChatTemplate, ChatTemplateError, check_conversation, encode_conversation,
                       load_template, split_mask)

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


# Fine-tuning data: conversations whose loss counts only the assistant's turns.

CONVERSATION = [{'role': 'system', 'content': 'Be terse.'}, {'role': 'user', 'content': 'say: apple'},
                {'role': 'assistant', 'content': 'apple'}, {'role': 'user', 'content': 'say: pear'},
                {'role': 'assistant', 'content': 'pear'}]


def _tokenizer():
  from data import tokenizer as tok
  return tok.train_bpe(['say: apple pear plum <|user|> <|assistant|> <|system|> Be terse.'] * 4, 300)


def test_a_conversation_trains_on_the_assistant_turns_and_the_end_only():
  tokenizer = _tokenizer()
  stored = encode_conversation(tokenizer, ChatTemplate(), CONVERSATION, eos_id=0)
  ids, trained = split_mask(stored)
  # The whole conversation is there, as the template renders it, then EOS.
  assert tokenizer.decode(ids[:-1].tolist()) == ChatTemplate().render(CONVERSATION, False)
  assert ids[-1] == 0 and trained[-1]
  # The trained tokens spell the assistant turns (their text and the template's line end) only.
  runs, current = [], []
  for i, t in zip(ids[:-1], trained[:-1]):
    if t:
      current.append(int(i))
    elif current:
      runs.append(tokenizer.decode(current))
      current = []
  runs.append(tokenizer.decode(current))
  assert runs == ['apple\n', 'pear\n']
  # Every prompt the assistant answers is exactly what a server would send the model.
  second_prompt = ChatTemplate().render(CONVERSATION[:4], add_generation_prompt=True)
  n = len(tokenizer.encode(second_prompt, add_special_tokens=False).ids)
  assert tokenizer.decode(ids[:n].tolist()) == second_prompt and trained[n]
  everything = split_mask(encode_conversation(tokenizer, ChatTemplate(), CONVERSATION, 0, 'all'))[1]
  assert everything.all()


def test_conversations_that_cannot_be_masked_are_refused():
  with pytest.raises(ValueError, match=r'rows.jsonl:3: the conversation has no assistant turn'):
    check_conversation([{'role': 'user', 'content': 'hi'}], 'rows.jsonl:3')
  with pytest.raises(ValueError, match=r"message 1 must be"):
    check_conversation([{'role': 'user', 'content': 'hi'}, {'role': 'bot', 'content': 'x'}], 'x')
  # A template that renders the last message apart from the others: turns cannot be told apart.
  odd = ChatTemplate("{% for m in messages %}{% if loop.last %}LAST {% endif %}{{ m['content'] }} "
                     "{% endfor %}")
  with pytest.raises(ChatTemplateError, match='growing text at message 2'):
    encode_conversation(_tokenizer(), odd, CONVERSATION, 0)
