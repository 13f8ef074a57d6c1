"""A page pool whose full pages are shared by the hash of their token prefix (no JAX).

Every full page a sequence has computed is keyed by a hash chain, `hash(parent hash, the page's
tokens)`, so equal keys mean equal whole prefixes, not just equal pages (vLLM's
`hash_block_tokens`). A new sequence takes references on the cached pages of its longest cached
prefix and skips their prefill; the rest of its pages are fresh. Only full pages are ever shared
and a sequence writes only positions past its cached prefix, so a shared page is never written:
the first divergent page is the sequence's own (copy-on-write without the copy: its tokens are
recomputed into a private page). At least one prompt token is always recomputed, since the
prefill must produce the logits of the last one.

A page is in exactly one of three places: referenced by live sequences (ref count > 0), cached
and unreferenced (evictable, in LRU order), or free. Allocation takes free pages first, then
evicts the least recently released cached page. `caching=False` makes it a plain pool.
"""

from __future__ import annotations

import collections
import hashlib
from typing import Hashable, Iterable, Sequence

from serving.generation.pages import pages_for


def block_hash(parent: bytes, tokens: Sequence[int]) -> bytes:
  """The key of a full page: its tokens chained to the key of the page before it."""
  h = hashlib.blake2b(parent, digest_size=16)
  h.update(b"".join(int(t).to_bytes(4, "little", signed=True) for t in tokens))
  return h.digest()


class PrefixCachePool:
  """PagePool's interface (reserve, release, table, check, ...) plus prefix sharing."""

  def __init__(self, num_pages: int, page_size: int, *, reserved: Iterable[int] = (0,),
               caching: bool = True):
    reserved = set(reserved)
    if not reserved <= set(range(num_pages)):
      raise ValueError(f"reserved pages {sorted(reserved)} outside [0, {num_pages})")
    self.page_size = page_size
    self.num_pages = num_pages
    self.caching = caching
    self._free = [p for p in range(num_pages - 1, -1, -1) if p not in reserved]  # a stack
    self.capacity = len(self._free)
    if self.capacity < 1:
      raise ValueError(f"no usable pages: {num_pages} pages, reserved {sorted(reserved)}")
    self._tables: dict[Hashable, list[int]] = {}
    self._refs: dict[int, int] = {}  # referenced pages -> number of tables holding them
    self._lru: collections.OrderedDict[int, None] = collections.OrderedDict()  # evictable
    self._page_of: dict[bytes, int] = {}  # cached pages by key
    self._key_of: dict[int, bytes] = {}
    self._chain: dict[Hashable, tuple[int, bytes]] = {}  # owner -> (pages keyed, last key)
    self.hit_tokens = 0
    self.queried_tokens = 0
    self.evictions = 0

  @property
  def num_free(self) -> int:
    """Pages an allocation may take (free or cached but unreferenced)."""
    return len(self._free) + len(self._lru)

  @property
  def num_used(self) -> int:
    """Pages referenced by live sequences."""
    return len(self._refs)

  @property
  def num_cached(self) -> int:
    """Pages holding a keyed prefix (referenced or not)."""
    return len(self._key_of)

  @property
  def usage(self) -> float:
    return self.num_used / self.capacity

  def table(self, owner: Hashable) -> list[int]:
    return self._tables.get(owner, [])

  def owners(self) -> list[Hashable]:
    return list(self._tables)

  def _match(self, tokens: Sequence[int]) -> list[int]:
    """Cached pages of the longest cached prefix of `tokens`, leaving >= 1 token uncached."""
    ps, pages, key = self.page_size, [], b""
    if not self.caching:
      return pages
    for i in range((len(tokens) - 1) // ps):
      key = block_hash(key, tokens[i * ps:(i + 1) * ps])
      page = self._page_of.get(key)
      if page is None:
        break
      pages.append(page)
    return pages

  def _take(self) -> int:
    """A page for new writes: a free one, else the least recently released cached one."""
    if self._free:
      return self._free.pop()
    page, _ = self._lru.popitem(last=False)
    del self._page_of[self._key_of.pop(page)]
    self.evictions += 1
    return page

  def _ref(self, page: int) -> None:
    self._refs[page] = self._refs.get(page, 0) + 1
    self._lru.pop(page, None)

  def allocate(self, owner: Hashable, tokens: Sequence[int], num_tokens: int) -> int | None:
    """A table for a new owner holding `num_tokens`, starting with the cached prefix of `tokens`;
    returns how many tokens are cached (their prefill is skipped), None if pages run out."""
    if owner in self._tables:
      raise ValueError(f"{owner!r} already holds pages")
    hits = self._match(tokens)
    need = pages_for(num_tokens, self.page_size) - len(hits)
    if need > self.num_free - sum(1 for p in hits if p in self._lru):
      return None
    for p in hits:
      self._ref(p)
    table = hits + [self._take() for _ in range(need)]
    for p in table[len(hits):]:
      self._ref(p)
    self._tables[owner] = table
    self._chain[owner] = (len(hits), self._key_of[hits[-1]] if hits else b"")
    cached = len(hits) * self.page_size
    self.queried_tokens += len(tokens)
    self.hit_tokens += cached
    return cached

  def reserve(self, owner: Hashable, num_tokens: int) -> bool:
    """Grows the owner's table to hold `num_tokens`; False (and no change) if pages run out."""
    table = self._tables.get(owner)
    if table is None:
      return self.allocate(owner, (), num_tokens) is not None
    need = pages_for(num_tokens, self.page_size) - len(table)
    if need <= 0:
      return True
    if need > self.num_free:
      return False
    for _ in range(need):
      table.append(self._take())
      self._ref(table[-1])
    return True

  def commit(self, owner: Hashable, tokens: Sequence[int], num_computed: int) -> None:
    """Keys the owner's pages that are now full of computed tokens (`tokens[:num_computed]`
    are in the cache), so later sequences can share them."""
    if not self.caching or owner not in self._tables:
      return
    done, key = self._chain[owner]
    table, ps = self._tables[owner], self.page_size
    while done < min(num_computed // ps, len(table)):
      key = block_hash(key, tokens[done * ps:(done + 1) * ps])
      page = table[done]
      if key not in self._page_of and page not in self._key_of:
        self._page_of[key], self._key_of[page] = page, key
      # Else an equal page is already cached (computed twice at once): this one stays private.
      done += 1
    self._chain[owner] = (done, key)

  def shrink(self, owner: Hashable, num_tokens: int) -> int:
    """Drops the owner's pages past those holding `num_tokens` (speculative decoding's pages
    for rejected drafts: never keyed, so they go back to the free list); returns how many."""
    table = self._tables.get(owner, [])
    keep = pages_for(num_tokens, self.page_size)
    dropped = table[keep:]
    del table[keep:]
    self._unref(reversed(dropped))
    return len(dropped)

  def _unref(self, pages: Iterable[int]) -> None:
    """One reference fewer on each page; unreferenced ones become evictable (keyed) or free."""
    for p in pages:
      self._refs[p] -= 1
      if self._refs[p] == 0:
        del self._refs[p]
        if p in self._key_of:
          self._lru[p] = None
        else:
          self._free.append(p)

  def release(self, owner: Hashable) -> int:
    """Drops the owner's references; its keyed pages stay cached (evictable), tail pages
    first in line for eviction. Returns how many pages it held."""
    table = self._tables.pop(owner, [])
    self._chain.pop(owner, None)
    self._unref(reversed(table))
    return len(table)

  def clear_cache(self) -> None:
    """Forgets every key (the cache contents are gone, e.g. after an engine reset)."""
    self._free.extend(reversed(self._lru))
    self._lru.clear()
    self._page_of.clear()
    self._key_of.clear()  # live owners' pages stay theirs, unkeyed; their chains go on

  def check(self) -> None:
    """Raises AssertionError unless every page is in exactly one place and ref counts equal
    the number of tables holding each page (so no referenced page can be handed out)."""
    counts = collections.Counter(p for t in self._tables.values() for p in t)
    if counts != collections.Counter(self._refs):
      raise AssertionError(f"ref counts {self._refs} disagree with the tables {dict(counts)}")
    if any(len(t) != len(set(t)) for t in self._tables.values()):
      raise AssertionError("a table holds a page twice")
    places = list(self._refs) + list(self._lru) + self._free
    if len(places) != len(set(places)):
      raise AssertionError("a page is both referenced and free/evictable, or free twice")
    if len(places) != self.capacity:
      raise AssertionError(f"{self.capacity - len(places)} pages leaked")
    if set(self._lru) - set(self._key_of) or any(self._page_of[k] != p
                                                 for p, k in self._key_of.items()):
      raise AssertionError("cache keys and pages disagree")
    if set(self._key_of) & set(self._free):
      raise AssertionError("a free page still has a key")
