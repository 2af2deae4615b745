"""Every Triton launch of the package goes through `launch`.

On CUDA the launcher uses the current device's context and stream, so the launch runs with the tensors' device
made current. `offload.opcount` counts host work per decode step: it sets `hook` while counting, and counts a
launch as one op (what the host does for it on a GPU) rather than the torch calls Triton's CPU interpreter makes
to run it.
"""

from __future__ import annotations

from typing import Callable

import torch

# Set by offload.opcount while it counts: called with a function that performs the launch.
hook: Callable[[Callable[[], None]], None] | None = None


def launch(kernel, grid: tuple, device: torch.device, *args, **meta) -> None:
    """`kernel[grid](*args, **meta)` on `device`."""
    def go() -> None:
        if device.type == "cuda":
            with torch.cuda.device(device):
                kernel[grid](*args, **meta)
        else:
            kernel[grid](*args, **meta)

    if hook is None:
        go()
    else:
        hook(go)
