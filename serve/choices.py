"""One choice of a completion as OpenAI shapes it: text deltas and logprobs, built off the event loop.

The routes' deliver callback runs `Choice.take` on the engine driver's thread for each
RequestOutput, so detokenization (TextStream: incremental, O(1) per token) and the logprobs'
token strings never run on the asyncio loop; the loop only assembles JSON from the Deltas.

Logprob shapes (OpenAI's):
  completions  {"tokens": [...], "token_logprobs": [...], "top_logprobs": [{text: logprob}, ...],
               "text_offset": [...]}, one entry per token; with `echo` the prompt's tokens come
               first and its first token has null logprobs (nothing predicts it). top_logprobs
               holds the k likeliest tokens, likeliest first, and the chosen token after them when
               it is not among them (OpenAI: "up to logprobs + 1 elements").
  chat         {"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob",
               "bytes"}, ...]}]}, top_logprobs the k likeliest.
Token strings: Codec.token_text ('bytes:\\xNN' for a piece of a UTF-8 character, as OpenAI).
text_offset counts the characters of the text before each token (a token inside a character
points at that character's start).
"""

from __future__ import annotations

import codecs
import dataclasses
from typing import Sequence

from serve.engine import RequestOutput, TokenLogprob
from serve.text import Codec, TextStream


@dataclasses.dataclass(frozen=True)
class Delta:
  """What one RequestOutput adds to a choice."""

  text: str
  logprobs: dict | None  # this output's logprobs in the endpoint's shape, or None
  num_tokens: int  # generated tokens it carries
  finished: bool
  finish_reason: str | None


class Choice:
  """One sequence's text and logprobs; `take` is called in order, on one thread."""

  def __init__(self, codec: Codec, stop: Sequence[str], chat: bool, logprobs: int | None,
               echo: str | None = None, prompt_ids: Sequence[int] = ()):
    self.codec, self.chat, self.k = codec, chat, logprobs
    self.stream = TextStream(codec.decode, stop)
    self.echo = echo  # the prompt's text, sent before the first generated text
    self.prompt_ids = prompt_ids  # with echo: the prompt's tokens
    self.offset = 0  # completions' text_offset of the next token, in characters of the text
    self._utf8 = codecs.getincrementaldecoder('utf-8')('replace')  # tokens' bytes -> characters

  def take(self, item: RequestOutput) -> Delta:
    text = self.stream.push(item.new_token_ids, final=item.finished)
    logprobs = None
    if self.k is not None:
      entries: list[TokenLogprob | None] = []
      if self.echo is not None and item.prompt_logprobs is not None:
        entries = list(item.prompt_logprobs)
      logprobs = self._format(entries, list(item.logprobs or ()))
    if self.echo is not None:
      text, self.echo = self.echo + text, None
    reason = ('stop' if self.stream.stopped else item.finish_reason) if item.finished else None
    return Delta(text, logprobs, len(item.new_token_ids), item.finished, reason)

  def _format(self, prompt: list[TokenLogprob | None], generated: list[TokenLogprob]) -> dict:
    if self.chat:
      return {'content': [self._chat_entry(e) for e in generated]}
    out = {'tokens': [], 'token_logprobs': [], 'top_logprobs': [], 'text_offset': []}
    for i, e in enumerate(prompt):
      self._completion_entry(out, e, self.prompt_ids[i])
    if prompt:  # generated text starts after the echoed prompt's text
      self.offset, self._utf8 = len(self.echo), codecs.getincrementaldecoder('utf-8')('replace')
    for e in generated:
      self._completion_entry(out, e)
    return out

  def _completion_entry(self, out: dict, e: TokenLogprob | None, token_id: int | None = None):
    if e is None:  # the prompt's first token: nothing predicts it
      token = self.codec.token_text(token_id)
      out['tokens'].append(token)
      out['token_logprobs'].append(None)
      out['top_logprobs'].append(None)
    else:
      token = self.codec.token_text(e.token_id)
      top = {}
      for token_id, lp in e.top:
        top.setdefault(self.codec.token_text(token_id), lp)
      if all(token_id != e.token_id for token_id, _ in e.top):
        top.setdefault(token, e.logprob)
      out['tokens'].append(token)
      out['token_logprobs'].append(e.logprob)
      out['top_logprobs'].append(top)
    out['text_offset'].append(self.offset)
    self.offset += len(self._utf8.decode(bytes(self.codec.token_bytes(
        e.token_id if e is not None else token_id))))

  def _chat_entry(self, e: TokenLogprob) -> dict:
    def one(token_id: int, lp: float) -> dict:
      return {'token': self.codec.token_text(token_id), 'logprob': lp,
              'bytes': self.codec.token_bytes(token_id)}
    return {**one(e.token_id, e.logprob), 'top_logprobs': [one(t, lp) for t, lp in e.top]}


def merge(chat: bool, parts: list[dict]) -> dict | None:
  """One choice's logprobs from its Deltas' (the non-streamed response)."""
  if not parts:
    return None
  if chat:
    return {'content': [e for p in parts for e in p['content']]}
  return {key: [x for p in parts for x in p[key]] for key in parts[0]}
