"""PageAllocator against hand-worked cases: null page, ref counts, prefix matching, LRU eviction, deferred reuse."""

import hashlib

import pytest

from serve.allocator import ROOT_HASH, PageAllocator, hash_blocks


def _sha(parent: bytes, tokens) -> bytes:
  """Independent chained hash: sha256 over the parent digest and the tokens as little-endian int64."""
  return hashlib.sha256(parent + b''.join(int(t).to_bytes(8, 'little', signed=True) for t in tokens)).digest()


def test_null_page_never_granted_and_pool_exhausts():
  alloc = PageAllocator(num_pages=5, page_size=2)
  assert (alloc.total, alloc.num_free, alloc.num_used, alloc.num_cached) == (4, 4, 0, 0)
  pages = alloc.allocate(4)
  assert sorted(pages) == [1, 2, 3, 4]
  assert (alloc.num_free, alloc.num_used) == (0, 4)
  with pytest.raises(RuntimeError, match='only 0 are free or cached'):
    alloc.allocate(1)
  alloc.check()


def test_ref_counts_share_and_release():
  alloc = PageAllocator(num_pages=4, page_size=2)
  (page,) = alloc.allocate(1)
  h = _sha(ROOT_HASH, [7, 8])
  assert alloc.commit(page, h)
  assert alloc.match([h]) == [page]
  alloc.share([page])  # a second sequence now holds it
  assert alloc.ref_counts[page] == 2 and alloc.num_used == 1
  alloc.release([page])
  assert alloc.ref_counts[page] == 1 and alloc.num_used == 1 and alloc.num_cached == 0
  alloc.release([page])  # last holder: a hashed page goes to the cache, not the free list
  assert alloc.ref_counts[page] == 0 and (alloc.num_used, alloc.num_cached, alloc.num_free) == (0, 1, 2)
  alloc.check()
  alloc.share(alloc.match([h]))  # revived from the cache
  assert (alloc.num_used, alloc.num_cached) == (1, 0)
  alloc.check()
  alloc.release([page])
  with pytest.raises(ValueError, match='double free'):
    alloc.release([page])
  with pytest.raises(ValueError, match='not in use'):
    alloc.commit(page, _sha(ROOT_HASH, [1, 1]))


def test_hash_blocks_is_a_chain_over_full_blocks():
  tokens = [1, 2, 3, 4, 5, 6, 7]
  h1 = _sha(ROOT_HASH, [1, 2, 3])
  h2 = _sha(h1, [4, 5, 6])
  assert hash_blocks(tokens, 3) == [h1, h2]  # the partial block [7] is not hashed
  assert hash_blocks(tokens, 3, [h1]) == [h1, h2]  # extends known hashes


def test_prefix_match_longest_run_and_chaining():
  G = 2
  alloc = PageAllocator(num_pages=8, page_size=G)
  a = [1, 2, 3, 4, 5, 6]
  pages = alloc.allocate(3)
  for page, h in zip(pages, hash_blocks(a, G)):
    assert alloc.commit(page, h)
  # Same first two blocks, different third: the run stops there.
  assert alloc.match(hash_blocks([1, 2, 3, 4, 9, 9], G)) == pages[:2]
  # Differs only in the first block: the identical later blocks must not match (their parents differ).
  b = [0, 2, 3, 4, 5, 6]
  assert hash_blocks(b, G)[1:] != hash_blocks(a, G)[1:]
  assert alloc.match(hash_blocks(b, G)) == []
  # A one-block prefix.
  assert alloc.match(hash_blocks([1, 2], G)) == pages[:1]
  # A run stops at the first uncached block even when later ones are cached.
  c = [7, 7, 8, 8, 9, 9]
  c_pages, c_hashes = alloc.allocate(2), hash_blocks(c, G)
  assert alloc.commit(c_pages[0], c_hashes[0]) and alloc.commit(c_pages[1], c_hashes[2])
  assert alloc.match(c_hashes) == c_pages[:1]
  alloc.release(c_pages)
  # Duplicate content computed by a second sequence keeps the first page as the cached one.
  (dup,) = alloc.allocate(1)
  assert not alloc.commit(dup, hash_blocks(a, G)[0])
  alloc.release([dup])
  assert (alloc.num_free, alloc.num_cached) == (7 - 3 - 2, 2)  # dup is unhashed, so back on the free list
  alloc.check()


def test_prefix_caching_off_never_matches():
  alloc = PageAllocator(num_pages=4, page_size=2, prefix_caching=False)
  (page,) = alloc.allocate(1)
  h = _sha(ROOT_HASH, [1, 2])
  assert not alloc.commit(page, h)
  assert alloc.match([h]) == []
  alloc.release([page])
  assert (alloc.num_free, alloc.num_cached) == (3, 0)
  alloc.check()


def test_lru_evicts_oldest_and_only_when_free_list_is_empty():
  alloc = PageAllocator(num_pages=6, page_size=1)
  p = alloc.allocate(5)  # [1, 2, 3, 4, 5]
  hashes = [_sha(ROOT_HASH, [i]) for i in range(3)]
  for page, h in zip(p[:3], hashes):
    alloc.commit(page, h)
  # Release order sets LRU age: page p[1] oldest, then p[2], then p[0]; p[3], p[4] unhashed -> free list.
  alloc.release([p[1], p[2], p[0], p[3], p[4]])
  assert (alloc.num_free, alloc.num_cached, alloc.num_used) == (2, 3, 0)
  # Free pages are granted before any cached page is evicted.
  assert alloc.allocate(2) == [p[3], p[4]]
  assert alloc.num_cached == 3
  # Touching p[2] (share then release) makes it the newest.
  alloc.share(alloc.match([hashes[2]]))
  alloc.release([p[2]])
  # Now evictions go oldest first: p[1], then p[0], then p[2].
  assert alloc.allocate(1) == [p[1]]
  assert alloc.match([hashes[1]]) == []  # evicted: no longer matchable
  assert alloc.match([hashes[0]]) == [p[0]]
  assert alloc.allocate(2) == [p[0], p[2]]
  assert alloc.num_cached == 0 and alloc.match([hashes[0]]) == [] and alloc.match([hashes[2]]) == []
  alloc.check()


def test_deferred_reuse_grants_recently_freed_pages_last():
  alloc = PageAllocator(num_pages=6, page_size=4)
  first = alloc.allocate(2)  # [1, 2]
  alloc.release(first[::-1])  # free list: 3, 4, 5, 2, 1
  assert alloc.allocate(5) == [3, 4, 5, 2, 1]
  alloc.check()


def test_check_catches_a_leak():
  alloc = PageAllocator(num_pages=4, page_size=2)
  alloc.allocate(1)
  alloc.free.popleft()  # a page lost from every list
  with pytest.raises(AssertionError, match='leaked'):
    alloc.check()


@pytest.mark.parametrize('num_pages, page_size, match', [
    (1, 4, 'num_pages must be an int >= 2'),
    (4, 0, 'page_size must be an int >= 1'),
    (4.0, 4, 'num_pages must be an int'),
])
def test_bad_arguments(num_pages, page_size, match):
  with pytest.raises(ValueError, match=match):
    PageAllocator(num_pages, page_size)
