"""Policies that decide what lives where: selection, prefetch and eviction. See `policies.base`."""

from policies import eviction, prefetch, selection  # noqa: F401  (registers the built-in policies)
from policies.base import EvictionPolicy, PrefetchContext, PrefetchPolicy, SelectionPolicy
from policies.registry import EVICTION, PREFETCH, SELECTION, Registry

__all__ = [
    "EVICTION", "PREFETCH", "SELECTION", "EvictionPolicy", "PrefetchContext", "PrefetchPolicy", "Registry",
    "SelectionPolicy",
]
