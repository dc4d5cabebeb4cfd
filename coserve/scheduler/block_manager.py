"""Paged KV-cache bookkeeping with prefix caching. Pure Python.

The pool holds `num_blocks` blocks of `block_size` token slots. A sequence owns
a block table (list of block ids) covering its computed tokens. A full block
whose tokens are computed gets a key: hash(parent key, adapter, its tokens).
Keys chain, so equal keys mean equal prefixes under the same adapter (an
adapter changes K and V, so it is part of the key). Blocks whose reference
count drops to zero stay keyed in an LRU free list and are reused by the next
sequence with the same prefix, or evicted (key dropped) when the pool needs
them.

Check/act pairs: `can_allocate`/`allocate` and `can_append`/`append`; the
checks never mutate state.
"""

from __future__ import annotations

from collections import OrderedDict

from coserve.scheduler.request import Sequence


def block_key(parent_key: int | None, adapter_id: str | None, tokens: tuple[int, ...]) -> int:
    return hash((parent_key, adapter_id, tokens))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError("num_blocks and block_size must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._ref_counts = [0] * num_blocks
        self._key_of_block: list[int | None] = [None] * num_blocks
        self._block_of_key: dict[int, int] = {}
        # Free blocks in eviction order (oldest first); keyed ones can still be hit.
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.prefix_queried_tokens = 0
        self.prefix_hit_tokens = 0

    # ---- queries (no mutation) ----
    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of blocks referenced by live sequences (0..1)."""
        return 1.0 - len(self._free) / self.num_blocks

    @property
    def prefix_hit_rate(self) -> float:
        if self.prefix_queried_tokens == 0:
            return 0.0
        return self.prefix_hit_tokens / self.prefix_queried_tokens

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _keys_for(self, seq: Sequence, num_full_blocks: int) -> list[int]:
        """Chained keys of the first num_full_blocks blocks (memoised on the sequence)."""
        keys = seq.block_hashes
        bs = self.block_size
        while len(keys) < num_full_blocks:
            i = len(keys)
            parent = keys[-1] if keys else None
            keys.append(block_key(parent, seq.adapter_id, tuple(seq.tokens_between(i * bs, (i + 1) * bs))))
        return keys[:num_full_blocks]

    def find_cached_prefix(self, seq: Sequence) -> list[int]:
        """Block ids holding the longest cached prefix of seq's known tokens.

        At least one token is always left to compute, since the runner needs the
        last token's logits to sample.
        """
        if not self.enable_prefix_caching:
            return []
        max_blocks = (seq.num_tokens - 1) // self.block_size
        hits: list[int] = []
        for key in self._keys_for(seq, max_blocks):
            block = self._block_of_key.get(key)
            if block is None:
                break
            hits.append(block)
        return hits

    def can_allocate(self, seq: Sequence, cached_blocks: list[int], num_new_tokens: int) -> bool:
        """Whether a waiting seq can take its cached blocks and room for num_new_tokens more."""
        num_cached_tokens = len(cached_blocks) * self.block_size
        new_blocks = self.blocks_for(num_cached_tokens + num_new_tokens) - len(cached_blocks)
        revived = sum(1 for b in cached_blocks if self._ref_counts[b] == 0)
        return new_blocks + revived <= len(self._free)

    def can_append(self, seq: Sequence, num_new_tokens: int) -> bool:
        needed = self.blocks_for(seq.num_computed_tokens + num_new_tokens) - len(seq.block_ids)
        return needed <= len(self._free)

    # ---- actions ----
    def allocate(self, seq: Sequence, cached_blocks: list[int], num_new_tokens: int) -> None:
        """Give a waiting seq its cached prefix blocks plus fresh ones; sets num_computed_tokens."""
        assert not seq.block_ids, "allocate is for sequences holding no blocks"
        for block in cached_blocks:
            if self._ref_counts[block] == 0:
                del self._free[block]
            self._ref_counts[block] += 1
        seq.block_ids = list(cached_blocks)
        seq.num_computed_tokens = len(cached_blocks) * self.block_size
        self.prefix_queried_tokens += seq.num_tokens
        self.prefix_hit_tokens += seq.num_computed_tokens
        self.append(seq, num_new_tokens)

    def append(self, seq: Sequence, num_new_tokens: int) -> None:
        """Grow seq's block table to cover num_new_tokens beyond its computed ones."""
        needed = self.blocks_for(seq.num_computed_tokens + num_new_tokens) - len(seq.block_ids)
        for _ in range(needed):
            seq.block_ids.append(self._take_free_block())

    def _take_free_block(self) -> int:
        block, _ = self._free.popitem(last=False)
        key = self._key_of_block[block]
        if key is not None:  # evict its cached prefix
            del self._block_of_key[key]
            self._key_of_block[block] = None
        self._ref_counts[block] = 1
        return block

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Key the seq's full, computed blocks so later sequences can share them."""
        if not self.enable_prefix_caching:
            return
        num_full = min(seq.num_computed_tokens // self.block_size, len(seq.block_ids))
        keys = self._keys_for(seq, num_full)
        for block, key in zip(seq.block_ids[:num_full], keys):
            if self._key_of_block[block] is not None:
                continue
            if key in self._block_of_key:  # same prefix computed twice concurrently
                continue
            self._key_of_block[block] = key
            self._block_of_key[key] = block

    def free(self, seq: Sequence) -> None:
        """Drop seq's references; its blocks become free (tail blocks evicted first)."""
        for block in reversed(seq.block_ids):
            self._ref_counts[block] -= 1
            if self._ref_counts[block] == 0:
                self._free[block] = None
        seq.block_ids = []
