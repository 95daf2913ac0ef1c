"""Keeping the resident memory of a compression near what it holds: glibc heap settings, and freeing between stages.

Both modes free large temporaries all the time (a layer's graph when streamed; whole-model: the batch logits of
the statistics pass, the rotated copy for QAT targets). glibc keeps freed heap pages and, after each large free,
raises its mmap threshold, so later large tensors come from a heap that fragments and the peak grows stage by
stage. :func:`bound_heap` fixes the threshold; :func:`release_memory` frees reference cycles (fx graphs are
cycles) and returns free pages at stage (or layer) boundaries; :func:`own_weights` takes a loaded model's weights
out of the memory-mapped checkpoint, so that replaced weights are freed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc

import torch

M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
STREAMED_MMAP_THRESHOLD = 128 * 1024  # glibc's initial value, kept fixed
WHOLE_MODEL_MMAP_THRESHOLD = 1 << 20


def bound_heap(threshold: int = STREAMED_MMAP_THRESHOLD) -> None:
    """Fix glibc's mmap threshold at ``threshold`` bytes, so every larger tensor is its own mapping, returned to the
    OS when freed. (After each large free glibc raises the threshold, up to 32 MiB, and the next stage's tensors
    then come from a heap that fragments.) Process-wide, for the rest of the process; a no-op without glibc
    (macOS, musl). Every tensor above the threshold costs an mmap and its page faults, so the two modes differ:

    - streamed (:func:`~wsvd_passes.compression.stream.compress_checkpoint`): 128 KiB, glibc's initial value;
    - whole-model (``wsvd compress --no-stream`` / ``wsvd table``): 1 MiB. SmolLM2-135M ``wsvd`` W8A8, 16
      windows, quiet 2-core machine, peak RSS / wall / system time: glibc's default 3.62 GB / 1:33 / 8 s,
      1 MiB 2.81 GB / 1:45 / 21 s, 512 KiB 2.68 GB / 2:00 / 37 s (128 KiB, measured before the calibration
      changes: 0.55 GB less for 55 s more).
    """
    mallopt = getattr(_libc(), "mallopt", None)
    if mallopt is not None:
        mallopt(M_MMAP_THRESHOLD, threshold)


def release_memory() -> None:
    """Free what a finished stage or layer held and hand the freed heap pages back to the OS.

    fx graphs are reference cycles: ``gc.collect()`` frees a graph's weights now, not at some later gen-2
    pass; ``malloc_trim(0)`` then returns the free pages glibc keeps. Measured (streamed, width-1024 random bf16
    checkpoints, ``wsvd-noq``, 2 windows, peak RSS of 16 layers minus 2 layers; one layer is 22.5 MB in bf16):
    264 MB with ``gc.collect()`` alone, 60 MB with ``malloc_trim``, 37 MB with :func:`bound_heap` too, 16 MB
    once layers were exported with static shapes (:func:`~wsvd_passes.compression.stream.capture_layer`).
    """
    gc.collect()
    trim_heap()


def trim_heap() -> None:
    """Hand the heap's free pages back to the OS (``malloc_trim(0)``; a no-op without glibc): after a step that
    freed many tensors below the mmap threshold, whose pages glibc would otherwise keep."""
    trim = getattr(_libc(), "malloc_trim", None)
    if trim is not None:
        trim(0)


def own_weights(model: torch.nn.Module) -> None:
    """Copy the model's CPU parameters out of the checkpoint file they may be memory-mapped from into memory of their
    own, in place (tied parameters stay tied), and drop the mapping. (Not the buffers: small, and swapping a buffer's
    data under transformers' RoPE modules breaks their export.)

    transformers maps a safetensors checkpoint and the loaded tensors are views of the mapping: it stays mapped until
    its last tensor is freed and every page a pass has read stays resident with it. A whole-model compression that
    replaces the weights as it goes (rotation, factorisation) would then hold all the old weights and the new ones
    (SmolLM2-135M ``wsvd`` W8A8: about 0.5 GB more at the rotation); copies of their own are freed one by one.
    """
    with torch.no_grad():
        for p in model.parameters():
            if p.device.type == "cpu":
                p.data = p.data.clone()
    release_memory()


@functools.cache
def _libc():
    # ctypes because neither torch nor the standard library exposes mallopt / malloc_trim
    name = ctypes.util.find_library("c")
    return ctypes.CDLL(name) if name else None
