"""Targets for the out-of-process tests: the reference allocator, planted with a fault that
ends its process, or never returns, on its second allocation.

Loaded by the worker (`tests.isolation_targets:segfaults_on_second_alloc@`), never in the
harness process: a segfault there would take the test run down.
"""

from __future__ import annotations

import ctypes
import os
import time
from typing import Any

from allocator import SWATokenToKVPoolAllocator
from properties.targets import AllocatorConfig, build_allocator

FAULTY_CALL = 2


class _CountsAllocations(SWATokenToKVPoolAllocator):
    allocations = 0

    def fault(self) -> None:
        raise NotImplementedError

    def _count(self) -> None:
        self.allocations += 1
        if self.allocations == FAULTY_CALL:
            self.fault()

    def alloc(self, *args: Any) -> Any:
        self._count()
        return super().alloc(*args)

    def alloc_extend(self, *args: Any) -> Any:
        self._count()
        return super().alloc_extend(*args)

    def alloc_decode(self, *args: Any) -> Any:
        self._count()
        return super().alloc_decode(*args)


class _Segfaults(_CountsAllocations):
    def fault(self) -> None:
        ctypes.string_at(0)  # reads address 0: SIGSEGV


class _Exits(_CountsAllocations):
    def fault(self) -> None:
        os._exit(3)


class _Hangs(_CountsAllocations):
    def fault(self) -> None:
        time.sleep(3600)


def segfaults_on_second_alloc(config: AllocatorConfig) -> SWATokenToKVPoolAllocator:
    return build_allocator(_Segfaults, config, checked=True)


def exits_on_second_alloc(config: AllocatorConfig) -> SWATokenToKVPoolAllocator:
    return build_allocator(_Exits, config, checked=True)


def hangs_on_second_alloc(config: AllocatorConfig) -> SWATokenToKVPoolAllocator:
    return build_allocator(_Hangs, config, checked=True)
