"""YAML templates with ${name} placeholders, filled after parsing (so values keep their types).

Rules, applied to every string in the parsed documents:
  * a string that is exactly '${name}' becomes the value itself (a number, a list, a mapping);
    None removes the mapping entry (or list item) that holds it, and a list value in a list is
    spliced into it;
  * '${name}' inside a longer string is replaced by str(value).
Every placeholder must have a value and every value must be used, so a typo fails loudly.
"""

from __future__ import annotations

import os
import re
from typing import Any, Mapping

import yaml

TEMPLATE_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                            'configs', 'k8s')
_PLACEHOLDER = re.compile(r'\$\{([a-z_][a-z0-9_]*)\}')
_DROP = object()


def render(template: str, values: Mapping[str, Any], directory: str = TEMPLATE_DIR) -> list[dict]:
  """The documents of `directory`/`template` (default: configs/k8s/) with `values` filled in."""
  path = os.path.join(directory, template)
  with open(path) as f:
    docs = [d for d in yaml.safe_load_all(f) if d is not None]
  used: set[str] = set()

  def value(name: str) -> Any:
    if name not in values:
      raise ValueError(f'{path}: placeholder ${{{name}}} has no value (given: {sorted(values)}).')
    used.add(name)
    return values[name]

  def fill(node: Any) -> Any:
    if isinstance(node, dict):
      out = {}
      for k, v in node.items():
        v = fill(v)
        if v is not _DROP:
          out[k] = v
      return out
    if isinstance(node, list):
      out = []
      for item in node:
        whole = isinstance(item, str) and _PLACEHOLDER.fullmatch(item)
        item = fill(item)
        if whole and isinstance(item, list):
          out.extend(item)
        elif item is not _DROP:
          out.append(item)
      return out
    if isinstance(node, str):
      whole = _PLACEHOLDER.fullmatch(node)
      if whole:
        v = value(whole.group(1))
        return _DROP if v is None else v
      return _PLACEHOLDER.sub(lambda m: str(value(m.group(1))), node)
    return node

  docs = [fill(d) for d in docs]
  unused = set(values) - used
  if unused:
    raise ValueError(f'{path} has no placeholder for {sorted(unused)}.')
  return docs


class _Dumper(yaml.SafeDumper):
  """Writes a mapping used twice (the labels) out twice, not as a YAML anchor and alias."""

  def ignore_aliases(self, data):
    return True


def dump(docs: list[dict], header: str = '') -> str:
  """YAML for `kubectl apply -f -`, preceded by `header` as comment lines."""
  comments = ''.join(f'# {line}'.rstrip() + '\n' for line in header.splitlines())
  return comments + yaml.dump_all(docs, Dumper=_Dumper, sort_keys=False, default_flow_style=False)
