"""Stand-in for sglang.srt.mem_cache.memory_pool (served by sglang_minimal_env).

The allocators are handed a KV pool and only subclass or type-check these classes: releases
up to 0.5.7 assert `isinstance(kvcache, SWAKVPool)`, 0.5.8-0.5.12 subclass KVCache and name
MHATokenToKVPool as a default argument, later ones subclass KVCache in base_swa_memory_pool.
"""

import abc


class KVCache(abc.ABC):
    """Base of sglang's KV pools, without the KV data interface."""


class MHATokenToKVPool(KVCache):
    """Named by the SWA KV pool of 0.5.8-0.5.12 as its default full pool class; never built."""


class SWAKVPool(KVCache):
    """The SWA KV pool type that releases up to 0.5.7 check their pool against."""
