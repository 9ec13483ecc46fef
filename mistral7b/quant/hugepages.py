"""Packed weights in one arena of transparent huge pages.

A decode step streams every packed matrix once. With 4 KiB pages that is one TLB entry per
4 KiB read, and a page walk (more memory latency) whenever the TLB misses; with 2 MiB pages it
is 512x fewer. Linux gives anonymous memory huge pages when it is 2 MiB-aligned and marked
with madvise(MADV_HUGEPAGE) (needed when /sys/kernel/mm/transparent_hugepage/enabled is
"madvise"; harmless when it is "always"). So after loading, the packed weights of the model
are copied into one anonymous mapping, aligned to 2 MiB and advised, and the modules' buffers
become views of it. Where huge pages cannot be had (no THP, "never", another OS), the advice
fails and the arena is ordinary memory: the same numbers, nothing to configure
(MISTRAL7B_HUGEPAGES=0 skips the move, to measure the difference).
"""

from __future__ import annotations

import logging
import mmap
import os

import torch
from torch import nn

log = logging.getLogger("mistral7b")

HUGE_PAGE = 2 * 2**20
ALIGN = 64           # each matrix starts on a cache line


def arena(nbytes: int) -> tuple[torch.Tensor, bool]:
    """A uint8 tensor of `nbytes` whose start is 2 MiB-aligned, and whether the kernel took the
    huge-page advice. Its memory lives as long as the tensor (or a view of it) does."""
    mapping = mmap.mmap(-1, nbytes + HUGE_PAGE)
    whole = torch.frombuffer(mapping, dtype=torch.uint8)
    start = -whole.data_ptr() % HUGE_PAGE
    advised = _advise(mapping, start, nbytes)
    return whole[start:start + nbytes], advised


def _advise(mapping: mmap.mmap, start: int, nbytes: int) -> bool:
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if advice is None or nbytes < HUGE_PAGE:
        return False
    try:
        mapping.madvise(advice, start, nbytes - nbytes % HUGE_PAGE)
    except (OSError, ValueError):       # THP off or unsupported here: ordinary pages
        return False
    return True


def move_packed_weights(model: nn.Module) -> int:
    """Copy every packed (uint8) weight buffer of `model` on the CPU into one huge-page arena
    and point the modules at it (a buffer shared by two modules stays shared). Call it before
    the model's first forward. Returns the bytes moved (0 when there were none, or when the
    environment sets MISTRAL7B_HUGEPAGES=0: the weights stay where the loader put them)."""
    if os.environ.get("MISTRAL7B_HUGEPAGES") == "0":
        return 0
    owners = [(module, name, buf) for module in model.modules()
              for name, buf in module.named_buffers(recurse=False)
              if buf is not None and buf.dtype == torch.uint8 and buf.device.type == "cpu"
              and buf.numel() > 0]
    offsets: dict[int, int] = {}          # id of a buffer -> its offset in the arena
    total = 0
    for _, _, buf in owners:
        if id(buf) not in offsets:
            offsets[id(buf)] = total
            total += -(-buf.numel() // ALIGN) * ALIGN
    if not total:
        return 0
    memory, advised = arena(total)
    views: dict[int, torch.Tensor] = {}
    for module, name, buf in owners:
        if id(buf) not in views:
            offset = offsets[id(buf)]
            views[id(buf)] = memory[offset:offset + buf.numel()].view(buf.shape)
            views[id(buf)].copy_(buf)
        module._buffers[name] = views[id(buf)]
    log.debug("packed weights: %.1f MiB in one arena (%s)", total / 2**20,
              "huge pages advised" if advised else "ordinary pages")
    return total
