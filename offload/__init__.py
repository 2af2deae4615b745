"""offload: a memory-hierarchy runtime for long-context LLM inference.

    from offload import offload
    with offload(model, device_budget="64MiB", host_budget="1GiB", disk_dir="/mnt/nvme/kv") as rt:
        out = model.generate(input_ids, max_new_tokens=128)
    print(rt.stats())
"""

from offload.config import OffloadConfig
from offload.context import offload
from offload.runtime import Runtime

__version__ = "0.1.0"
__all__ = ["OffloadConfig", "Runtime", "offload", "__version__"]
