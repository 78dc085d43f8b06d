"""Chat messages -> one prompt string, with the model's chat template or a documented default.

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
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

import jinja2
from jinja2 import sandbox

DEFAULT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


class ChatTemplateError(ValueError):
  """The conversation cannot be rendered (the template rejected it, or the template is broken)."""


def load_template(tokenizer_dir: str | None) -> str | None:
  """`chat_template` from <tokenizer_dir>/tokenizer_config.json, if there is one."""
  if not tokenizer_dir:
    return None
  path = os.path.join(tokenizer_dir, 'tokenizer_config.json')
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    template = json.load(f).get('chat_template')
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
