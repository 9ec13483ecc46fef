"""Copies between the host and a CUDA device that do not wait for the device.

A plain copy of a host tensor to a CUDA device returns only once every kernel queued before it
has run. The engine queues decode step N+1 before it reads step N's tokens, so that the host's
part of step N (detokenizing, stop strings, callbacks) runs while the device computes step N+1
(engine.py). A plain copy made while queueing step N+1's inputs or its sampling would wait for
the queue to drain and undo that overlap. So small host tensors go through pinned memory with an
asynchronous copy (`upload`), and results come back with an asynchronous copy that the host
waits for only when it reads them (`HostCopy`). On the CPU both are plain tensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def upload(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`tensor` (on the host) on `device`, copied without waiting for queued kernels."""
    if device.type != "cuda":
        return tensor.to(device)
    # Pinned blocks are reused only once the copies that read them are done (torch's caching
    # host allocator records the copy's stream), so the buffer may be dropped right away.
    return tensor.pin_memory().to(device, non_blocking=True)


def to_device(values: Sequence[Any], device: torch.device,
              dtype: torch.dtype | None = None) -> torch.Tensor:
    """torch.tensor(values, dtype, device) without waiting for queued kernels."""
    return upload(torch.tensor(values, dtype=dtype), device)


class HostCopy:
    """A device tensor's copy to the host, started when made and waited for when read."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self._event: torch.cuda.Event | None = None
        if tensor.device.type == "cuda":
            self._host = tensor.to("cpu", non_blocking=True)      # into pinned memory
            self._event = torch.cuda.Event()
            self._event.record(torch.cuda.current_stream(tensor.device))
        else:
            self._host = tensor

    def tolist(self) -> Any:
        if self._event is not None:
            self._event.synchronize()      # this copy only, not the kernels queued after it
        return self._host.tolist()
