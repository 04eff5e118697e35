"""Stand-in for sglang.srt.layers.radix_attention (served by sglang_minimal_env): the SWA KV
pool module of 0.5.8-0.5.12 imports RadixAttention for a type annotation only."""


class RadixAttention:
    """An attention layer; only its name is used next to the allocator."""
