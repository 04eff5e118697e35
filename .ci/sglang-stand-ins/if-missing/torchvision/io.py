"""Stand-in for torchvision.io: see torchvision/__init__.py."""


def decode_jpeg(*args, **kwargs):
    raise RuntimeError("torchvision is a stand-in in this environment (.ci/install-sglang): no image decoding")
