"""Storage tiers: device memory, host RAM, a directory on disk. See `tiers.base` for the interface."""

from tiers.base import MemoryTier, PageShape, Tier
from tiers.device import DeviceTier
from tiers.disk import DiskTier
from tiers.host import HostTier

__all__ = ["DeviceTier", "DiskTier", "HostTier", "MemoryTier", "PageShape", "Tier"]
