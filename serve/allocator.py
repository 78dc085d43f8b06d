"""Host-side page allocator of the paged KV cache: free list, reference counts, prefix cache.

Pure Python, no JAX. The device holds page pools [P, G, K, H]; this module only decides which page ids a sequence
owns. Page 0 is the null page: never granted, block tables are padded with it and padding tokens write there.

State (explicit, all of it; `check()` asserts the invariants that tie it together):
  ref_counts     list[int] [P]: running sequences holding each page (a prefix-shared page has several).
  free           deque of page ids with ref 0 and no cached content. Granted from the front, returned to the
                 back, so a page freed just now is reused last (deferred reuse: a late reader of a just-freed
                 page, e.g. a device step still in flight, sees its old contents for as long as possible).
  lru            OrderedDict page -> block hash: pages with ref 0 that hold a full, hashed token block. Still
                 matchable by the prefix cache; evicted oldest first, and only when `free` is empty.
  page_hash      dict page -> block hash for every hashed page, referenced (used) or not (in `lru`).
  hash_to_page   dict block hash -> page, the inverse of `page_hash` (one page per hash).

Every page 1..P-1 is in exactly one of three places: `free`, `lru` (cached), or used (ref count > 0), so
num_free + num_used + num_cached == total == P - 1.

Block hashes are chained: hash(block i) = sha256(hash(block i - 1) || tokens of block i), so a block matches only
when every earlier token matches too. sha256 rather than Python's `hash` because a collision would hand one request
another's keys/values; sha256 makes that infeasible, also for adversarial prompts, and is stable across processes.
"""

from __future__ import annotations

import array
import collections
import hashlib
from collections.abc import Iterable, Sequence

ROOT_HASH = b''  # the parent of a sequence's first block


def hash_block(parent_hash: bytes, token_ids: Sequence[int]) -> bytes:
  """The chained hash of one full block of tokens given the hash of the block before it (ROOT_HASH for the first)."""
  return hashlib.sha256(parent_hash + array.array('q', token_ids).tobytes()).digest()


def hash_blocks(token_ids: Sequence[int], page_size: int, hashes: Sequence[bytes] = (),
                root: bytes = ROOT_HASH) -> list[bytes]:
  """Chained hashes of every full page-size block of token_ids, extending the already known leading `hashes`.
  `root`: the first block's parent (another root, e.g. a LoRA adapter's, keys the same tokens apart)."""
  out = list(hashes)
  for i in range(len(out), len(token_ids) // page_size):
    out.append(hash_block(out[-1] if out else root, token_ids[i * page_size:(i + 1) * page_size]))
  return out


class PageAllocator:
  """Grants page ids on demand, counts references, and keeps full pages matchable by prefix (see module doc)."""

  def __init__(self, num_pages: int, page_size: int, prefix_caching: bool = True):
    if not isinstance(num_pages, int) or num_pages < 2:
      raise ValueError(f'num_pages must be an int >= 2 (page 0 is the null page, never granted); got {num_pages!r}.')
    if not isinstance(page_size, int) or page_size < 1:
      raise ValueError(f'page_size must be an int >= 1; got {page_size!r}.')
    self.num_pages = num_pages
    self.page_size = page_size
    self.prefix_caching = prefix_caching
    self.ref_counts = [0] * num_pages
    self.free: collections.deque[int] = collections.deque(range(1, num_pages))
    self.lru: collections.OrderedDict[int, bytes] = collections.OrderedDict()
    self.page_hash: dict[int, bytes] = {}
    self.hash_to_page: dict[bytes, int] = {}
    self._num_used = 0

  @property
  def total(self) -> int:
    return self.num_pages - 1

  @property
  def num_free(self) -> int:
    return len(self.free)

  @property
  def num_cached(self) -> int:
    return len(self.lru)

  @property
  def num_used(self) -> int:
    return self._num_used

  @property
  def num_available(self) -> int:
    """Pages `allocate` can grant now: free ones, then cached ones by eviction."""
    return len(self.free) + len(self.lru)

  def allocate(self, n: int) -> list[int]:
    """Grants n pages (ref count 1 each), from the free list first, then by evicting the oldest cached pages."""
    if n > self.num_available:
      raise RuntimeError(f'cannot grant {n} pages: only {self.num_available} are free or cached; callers check '
                         f'num_available first (and preempt).')
    pages = []
    for _ in range(n):
      if self.free:
        page = self.free.popleft()
      else:
        page, block_hash = self.lru.popitem(last=False)
        del self.page_hash[page], self.hash_to_page[block_hash]
      self.ref_counts[page] = 1
      pages.append(page)
    self._num_used += n
    return pages

  def match(self, block_hashes: Iterable[bytes]) -> list[int]:
    """The pages of the longest leading run of block_hashes that are cached (used or not). Takes no references."""
    pages = []
    if self.prefix_caching:
      for block_hash in block_hashes:
        page = self.hash_to_page.get(block_hash)
        if page is None:
          break
        pages.append(page)
    return pages

  def share(self, pages: Iterable[int]) -> None:
    """Takes one reference on each of `pages` (from `match`); an unreferenced cached page leaves the LRU."""
    for page in pages:
      if page not in self.page_hash:
        raise ValueError(f'page {page} holds no cached block; only pages returned by match() can be shared.')
      if self.ref_counts[page] == 0:
        del self.lru[page]
        self._num_used += 1
      self.ref_counts[page] += 1

  def release(self, pages: Iterable[int]) -> None:
    """Drops one reference on each page; at zero a hashed page goes to the LRU's newest end, others to the free list's back."""
    for page in pages:
      if not 0 < page < self.num_pages or self.ref_counts[page] <= 0:
        raise ValueError(f'release of page {page}, which is not in use (ref count '
                         f'{self.ref_counts[page] if 0 <= page < self.num_pages else "n/a"}): a double free.')
      self.ref_counts[page] -= 1
      if self.ref_counts[page] == 0:
        self._num_used -= 1
        block_hash = self.page_hash.get(page)
        if block_hash is None:
          self.free.append(page)
        else:
          self.lru[page] = block_hash

  def commit(self, page: int, block_hash: bytes) -> bool:
    """Makes a used, fully written page matchable under block_hash. False (and no change) when prefix caching is
    off, the page is already hashed, or another page already holds that block (two sequences computed it at once)."""
    if self.ref_counts[page] <= 0:
      raise ValueError(f'commit of page {page}, which is not in use; commit pages while their sequence holds them.')
    if not self.prefix_caching or page in self.page_hash or block_hash in self.hash_to_page:
      return False
    self.page_hash[page] = block_hash
    self.hash_to_page[block_hash] = page
    return True

  def flush(self) -> int:
    """Forgets every cached block (new weights make their KV stale): unreferenced cached pages go to the free list,
    pages in use keep their data but can no longer be matched. Returns the number of pages forgotten."""
    forgotten = len(self.page_hash)
    self.free.extend(self.lru)
    self.lru.clear()
    self.page_hash.clear()
    self.hash_to_page.clear()
    return forgotten

  def check(self) -> None:
    """Asserts the invariants in the module docstring; raises AssertionError naming the broken one."""
    free, cached = list(self.free), list(self.lru)
    used = [p for p in range(1, self.num_pages) if self.ref_counts[p] > 0]
    assert self.ref_counts[0] == 0 and 0 not in free and 0 not in cached, 'the null page 0 was granted or listed'
    assert all(c >= 0 for c in self.ref_counts), f'negative ref count: {self.ref_counts}'
    assert len(set(free)) == len(free), f'a page is twice in the free list: {free}'
    places = set(free), set(cached), set(used)
    assert not (places[0] & places[1] or places[0] & places[2] or places[1] & places[2]), (
        f'a page is in two places: free&cached {places[0] & places[1]}, free&used {places[0] & places[2]}, '
        f'cached&used {places[1] & places[2]}')
    assert len(free) + len(used) + len(cached) == self.total, (
        f'free {len(free)} + used {len(used)} + cached {len(cached)} != total {self.total}: a page leaked')
    assert self._num_used == len(used), f'used counter {self._num_used} != {len(used)} pages with references'
    assert all(self.page_hash.get(p) == h for p, h in self.lru.items()), 'an LRU page lost its hash'
    assert {h: p for p, h in self.page_hash.items()} == self.hash_to_page, 'page_hash and hash_to_page disagree'
    assert len(self.hash_to_page) == len(self.page_hash), 'two pages share one hash'
    assert all(p in self.lru or self.ref_counts[p] > 0 for p in self.page_hash), 'a hashed page is on the free list'
    assert self.prefix_caching or not self.page_hash, 'pages were hashed with prefix caching off'
