"""Import hook that serves a few modules of sglang's import chain from their stand-ins.

Installed by .ci/install-sglang and loaded by sglang_minimal_env.pth at interpreter start.
sglang's modules are always replaced; torchvision only when it is not installed, so that an
environment with a working torchvision keeps it.
"""

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ALWAYS = {
    "sglang.srt.mem_cache.memory_pool": os.path.join(HERE, "sglang_kv_pool_base.py"),
    "sglang.srt.layers.radix_attention": os.path.join(HERE, "sglang_radix_attention.py"),
}
IF_MISSING = {
    "torchvision": os.path.join(HERE, "if-missing", "torchvision", "__init__.py"),
    "torchvision.io": os.path.join(HERE, "if-missing", "torchvision", "io.py"),
}


def _installed(name):
    top = name.partition(".")[0]
    return importlib.machinery.PathFinder.find_spec(top) is not None


class StandInFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        stand_in = ALWAYS.get(fullname)
        if stand_in is None and fullname in IF_MISSING and not _installed(fullname):
            stand_in = IF_MISSING[fullname]
        if stand_in is None:
            return None
        is_package = stand_in.endswith("__init__.py")
        locations = [os.path.dirname(stand_in)] if is_package else None
        return importlib.util.spec_from_file_location(fullname, stand_in, submodule_search_locations=locations)


if not any(type(finder).__name__ == "StandInFinder" for finder in sys.meta_path):
    sys.meta_path.insert(0, StandInFinder())
