"""DESIGN.md, the architecture document the code cites ("DESIGN.md layering", "letters as in DESIGN.md"), is in
the repository, has the sections cited, and its layering names every layer tests/test_build.py enforces."""

from __future__ import annotations

import ast
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_the_cited_design_document_is_here_and_has_the_cited_sections():
  design = (ROOT / 'DESIGN.md').read_text(encoding='utf-8')
  for section in ('## Layering', '## Dimension vocabulary', '## Tests', '## Key decisions'):
    assert section in design
  assert 'Tolerances' in design  # cited by tests choosing float32 tolerances


def test_the_layering_names_every_enforced_layer():
  build_test = (ROOT / 'tests' / 'test_build.py').read_text(encoding='utf-8')
  layers = ast.literal_eval(re.search(r"^LAYERS = (\{.*?\})", build_test, re.M | re.S).group(1))
  design = (ROOT / 'DESIGN.md').read_text(encoding='utf-8')
  layering = design[design.index('## Layering'):design.index('## Dimension vocabulary')]
  for name in layers:
    assert f'`{name}/`' in layering or f'`{name}.py`' in layering, name
