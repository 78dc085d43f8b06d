"""Streamed detokenization (serve/text.py) with a real byte-level BPE: deltas concatenate to the full
decode, never show a half character, and cut at stop strings exactly as str.find would."""

import random

import pytest

from data import tokenizer as tokenizer_lib
from serve.text import Codec, TextStream

TEXT = 'naïve café → ½ 漢字 emoji 😀 done. def f(x): return x ** 2\n' * 3


@pytest.fixture(scope='module')
def codec(tmp_path_factory):
  path = tmp_path_factory.mktemp('tok') / 'tokenizer.json'
  tokenizer_lib.train_bpe([TEXT, 'plain ascii words here'] * 4, 300).save(str(path))
  return Codec.from_file(str(path))


def stream_all(codec, ids, stop=(), chunk=1):
  s, deltas = TextStream(codec.decode, stop), []
  for i in range(0, len(ids), chunk):
    deltas.append(s.push(ids[i:i + chunk], final=i + chunk >= len(ids)))
  return s, deltas


def test_codec_finds_the_end_of_text_token(codec):
  assert codec.eos_token == '<|endoftext|>' and codec.stop_token_ids == (0,)
  assert codec.vocab_size == 300


@pytest.mark.parametrize('chunk', [1, 2, 5])
def test_deltas_concatenate_to_the_decode_and_hold_back_partial_characters(codec, chunk):
  ids = codec.encode(TEXT)
  # Byte-level tokens split the multi-byte characters: some prefixes decode to a U+FFFD tail.
  assert any(codec.decode(ids[:k]).endswith('\ufffd') for k in range(1, len(ids)))
  s, deltas = stream_all(codec, ids, chunk=chunk)
  assert ''.join(deltas) == codec.decode(ids) == TEXT
  assert not any('\ufffd' in d for d in deltas)


@pytest.mark.parametrize('stop', [['emoji'], ['😀'], ['é →', 'zzz'], ['x ** 2\nnaï'], ['not there']])
def test_stop_strings_cut_where_find_says(codec, stop):
  ids = codec.encode(TEXT)
  s, deltas = stream_all(codec, ids, stop=stop)
  cuts = [TEXT.find(x) for x in stop if x in TEXT]
  expected = TEXT[:min(cuts)] if cuts else TEXT
  assert ''.join(deltas) == expected and s.stopped == bool(cuts)
  # Nothing sent before the end may be a stop string's beginning that later completes it.
  sent = ''
  for d in deltas:
    sent += d
    assert all(x not in sent for x in stop)


def test_random_token_streams_agree_with_their_decode(codec):
  rng = random.Random(0)
  for _ in range(50):
    ids = [rng.randrange(300) for _ in range(rng.randint(1, 30))]
    text = codec.decode(ids)
    stop = [text[3:5]] if len(text) > 6 and '\ufffd' not in text[3:5] else []
    s, deltas = stream_all(codec, ids, stop=stop, chunk=rng.randint(1, 3))
    expected = text[:text.find(stop[0])] if stop else text
    assert ''.join(deltas) == expected, (ids, stop)


def test_bad_tokenizer_paths_are_named(tmp_path):
  with pytest.raises(FileNotFoundError, match='no such file'):
    Codec.from_file(str(tmp_path / 'missing.json'))
  (tmp_path / 'tokenizer.json').write_text('{not json')
  with pytest.raises(ValueError, match='not a valid tokenizer.json'):
    Codec.from_file(str(tmp_path))
