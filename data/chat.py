"""Chat messages -> text, with the model's chat template or a documented default; and chat data
for supervised fine-tuning: conversations as token ids whose loss skips all but the assistant's turns.

The template comes from `chat_template` in the tokenizer directory's tokenizer_config.json (the
Hugging Face convention: a Jinja2 template over `messages`, `add_generation_prompt`, `bos_token`,
`eos_token`, with `raise_exception` for bad conversations), rendered in Jinja2's immutable
sandbox, as `transformers` does. Without one, DEFAULT_TEMPLATE gives each message a header line
naming its role:

    <|system|>
    You are terse.
    <|user|>
    Hello
    <|assistant|>

and ends with the assistant header, where generation starts.

Fine-tuning data (`stoker prepare --format chat`). A conversation is rendered turn by turn: before
each assistant message, the conversation so far with the generation prompt (exactly the prompt a
server would send the model), then the conversation including that message; the difference is
the assistant's turn (its text and the template's end-of-turn marker). Each piece is tokenized on
its own, so the prompt's tokens are those serving produces. A token the loss skips is stored as
-1 - id (shards stay one int32 list per document; data/synthetic.pack_rows turns it back into
the id and a zero in loss_mask). The end-of-text token closes the document, trained when the
conversation ends with the assistant.
"""

from __future__ import annotations

import json
from typing import Any, Sequence

import jinja2
import numpy as np
from jinja2 import sandbox

import storage

ROLES = ('system', 'user', 'assistant')
TRAIN_ON = ('assistant', 'all')  # which tokens of a conversation the loss counts

DEFAULT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


class ChatTemplateError(ValueError):
  """The conversation cannot be rendered (the template rejected it, or the template is broken)."""


def load_template(tokenizer_dir: str | None) -> str | None:
  """`chat_template` from <tokenizer_dir>/tokenizer_config.json, if there is one."""
  if not tokenizer_dir:
    return None
  path = storage.join(tokenizer_dir, 'tokenizer_config.json')
  if not storage.isfile(path):
    return None
  template = json.loads(storage.read_text(path)).get('chat_template')
  if isinstance(template, list):  # named templates: [{'name': 'default', 'template': ...}, ...]
    named = {t.get('name'): t.get('template') for t in template if isinstance(t, dict)}
    template = named.get('default')
  if template is not None and not isinstance(template, str):
    raise ValueError(f'{path}: chat_template must be a string or a list of named templates; got '
                     f'{type(template).__name__}.')
  return template


def _raise(message: str):
  raise ChatTemplateError(message)


class ChatTemplate:
  """A compiled chat template; `render` turns messages into the prompt text."""

  def __init__(self, template: str | None = None, bos_token: str | None = None,
               eos_token: str | None = None):
    self.source = template or DEFAULT_TEMPLATE
    self.is_default = template is None
    env = sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                undefined=jinja2.StrictUndefined)
    env.globals['raise_exception'] = _raise
    env.filters['tojson'] = lambda x, indent=None: json.dumps(x, indent=indent, ensure_ascii=False)
    try:
      self._template = env.from_string(self.source)
    except jinja2.TemplateSyntaxError as e:
      raise ValueError(f'the chat template does not compile: {e} (line {e.lineno}).') from e
    self._special = {'bos_token': bos_token or '', 'eos_token': eos_token or ''}

  def render(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True) -> str:
    try:
      return self._template.render(messages=list(messages),
                                   add_generation_prompt=add_generation_prompt, **self._special)
    except ChatTemplateError:
      raise
    except (jinja2.TemplateError, TypeError, ValueError, KeyError, IndexError) as e:
      raise ChatTemplateError(f'the chat template cannot render these messages: {e}') from e


def check_conversation(messages: Any, where: str) -> list[dict[str, str]]:
  """`messages` as a list of {'role', 'content'} with at least one assistant turn, or ValueError."""
  if not isinstance(messages, list) or not messages:
    raise ValueError(f'{where}: messages must be a non-empty list of {{"role", "content"}} objects.')
  for i, m in enumerate(messages):
    if not isinstance(m, dict) or m.get('role') not in ROLES or not isinstance(m.get('content'), str):
      raise ValueError(f'{where}: message {i} must be {{"role": one of {", ".join(ROLES)}, "content": '
                       f'a string}}; got {json.dumps(m)[:120]}.')
  if not any(m['role'] == 'assistant' for m in messages):
    raise ValueError(f'{where}: the conversation has no assistant turn, so nothing to learn from; '
                     'remove the row or add the answer.')
  return [{'role': m['role'], 'content': m['content']} for m in messages]


def pieces(template: ChatTemplate, messages: Sequence[dict[str, str]]) -> list[tuple[str, bool]]:
  """The rendered conversation as consecutive (text, is_assistant_turn) pieces."""
  out, done = [], ''
  for i, m in enumerate(messages):
    if m['role'] != 'assistant':
      continue
    prompt = template.render(messages[:i], add_generation_prompt=True)
    full = template.render(messages[:i + 1], add_generation_prompt=False)
    if not prompt.startswith(done) or not full.startswith(prompt):
      raise ChatTemplateError(
          f'the chat template does not render the conversation as a growing text at message {i} '
          '(a prefix renders differently once more turns follow), so the assistant turns cannot '
          'be told apart; use a template that renders each turn independently.')
    out += [(prompt[len(done):], False), (full[len(prompt):], True)]
    done = full
  rest = template.render(messages, add_generation_prompt=False)[len(done):]
  return [(t, a) for t, a in out + [(rest, False)] if t]


def encode_conversation(tokenizer, template: ChatTemplate, messages: Sequence[dict[str, str]],
                        eos_id: int, train_on: str = 'assistant') -> np.ndarray:
  """Token ids (int32, EOS last), those the loss skips stored as -1 - id (see the module doc)."""
  if train_on not in TRAIN_ON:
    raise ValueError(f'train_on must be one of {TRAIN_ON}; got {train_on!r}.')
  tokenizer.encode_special_tokens = False  # the template's markers are special tokens
  ids, keep = [], []
  for text, assistant in pieces(template, messages):
    encoded = tokenizer.encode(text, add_special_tokens=False).ids
    ids += encoded
    keep += [assistant or train_on == 'all'] * len(encoded)
  ids.append(eos_id)
  keep.append(messages[-1]['role'] == 'assistant' or train_on == 'all')
  ids = np.asarray(ids, np.int32)
  return np.where(keep, ids, -1 - ids).astype(np.int32)


def split_mask(tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(ids, trained) of stored tokens: the ids, and whether the loss counts each."""
  tokens = np.asarray(tokens)
  trained = tokens >= 0
  return np.where(trained, tokens, -1 - tokens), trained
