"""Stand-in for torchvision (served by sglang_minimal_env only when torchvision is not
installed): sglang 0.5.10-0.5.20 import torchvision.io.decode_jpeg in sglang.srt.utils at
module level, for image inputs the allocator never sees."""
