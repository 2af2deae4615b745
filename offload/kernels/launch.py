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

# The kernels that copy pages or blocks move their bits through an integer of the element's width: no float
# conversion anywhere.
INT_OF_WIDTH = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def as_bits(t: torch.Tensor) -> torch.Tensor:
    """`t` viewed as the integer type of its element's width; a tensor already of that type (a view a caller keeps
    from step to step) as it is, with no op dispatched."""
    as_int = INT_OF_WIDTH[t.element_size()]
    return t if t.dtype == as_int else t.view(as_int)


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
