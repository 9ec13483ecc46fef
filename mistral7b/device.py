"""Which torch device a user's `--device` / `device=` names, checked before anything loads."""

from __future__ import annotations

import torch

from mistral7b.errors import InvalidArgumentError


def available_devices() -> list[str]:
    """The devices this torch build can use here, e.g. ["cpu", "cuda:0", "cuda:1"]."""
    names = ["cpu"]
    if torch.cuda.is_available():
        names += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        names.append("mps")
    return names


def resolve_device(device: str | torch.device) -> torch.device:
    """`device` as a torch.device, or an InvalidArgumentError that names the devices that
    exist (an unknown name, CUDA on a CPU-only build or machine, a GPU index past the last)."""
    here = ", ".join(available_devices())
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise InvalidArgumentError(f"device {str(device)!r}: not a device name; available "
                                   f"here: {here}") from None
    if resolved.type == "cpu":
        return resolved
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            why = ("this torch build has no CUDA support" if torch.version.cuda is None
                   else "no CUDA GPU is visible")
            raise InvalidArgumentError(f"device {str(device)!r}: {why}; available here: {here}")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise InvalidArgumentError(f"device {str(device)!r}: there is no GPU {resolved.index}"
                                       f"; available here: {here}")
        return resolved
    if resolved.type == "mps" and "mps" in available_devices():
        return resolved
    raise InvalidArgumentError(f"device {str(device)!r}: not available here; available "
                               f"here: {here}")
