"""Keeping the resident memory of a compression near what it holds: glibc heap settings, and freeing between stages.

Both modes free large temporaries all the time (a layer's graph when streamed; whole-model: the batch logits of
the statistics pass, the rotated copy for QAT targets). glibc keeps freed heap pages and, after each large free,
raises its mmap threshold, so later large tensors come from a heap that fragments and the peak grows stage by
stage. :func:`bound_heap` fixes the threshold; :func:`release_memory` frees reference cycles (fx graphs are
cycles) and returns free pages at stage (or layer) boundaries.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc

M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
MMAP_THRESHOLD = 128 * 1024  # glibc's initial value, kept fixed


def bound_heap() -> None:
    """Fix glibc's mmap threshold at 128 KiB, so every larger tensor is its own mapping, returned to the OS when
    freed. (After each large free glibc raises the threshold, up to 32 MiB, and the next stage's tensors then come
    from a heap that fragments.) Process-wide, for the rest of the process: called by the streamed compression.
    Not by the whole-model one: every large tensor then costs an mmap and page faults, and on SmolLM2 ``wsvd`` W8A8
    (16 windows) it took 2:50 instead of 1:55 wall (86 s of system time) for 3.16 instead of 3.71 GB peak RSS.
    A no-op without glibc (macOS, musl)."""
    mallopt = getattr(_libc(), "mallopt", None)
    if mallopt is not None:
        mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)


def release_memory() -> None:
    """Free what a finished stage or layer held and hand the freed heap pages back to the OS.

    fx graphs are reference cycles: ``gc.collect()`` frees a graph's weights now, not at some later gen-2
    pass; ``malloc_trim(0)`` then returns the free pages glibc keeps. Measured (streamed, width-1024 random bf16
    checkpoints, ``wsvd-noq``, 2 windows, peak RSS of 16 layers minus 2 layers; one layer is 22.5 MB in bf16):
    264 MB with ``gc.collect()`` alone, 60 MB with ``malloc_trim``, 37 MB with :func:`bound_heap` too, 16 MB
    once layers were exported with static shapes (:func:`~wsvd_passes.compression.stream.capture_layer`).
    """
    gc.collect()
    trim = getattr(_libc(), "malloc_trim", None)
    if trim is not None:
        trim(0)


@functools.cache
def _libc():
    # ctypes because neither torch nor the standard library exposes mallopt / malloc_trim
    name = ctypes.util.find_library("c")
    return ctypes.CDLL(name) if name else None
