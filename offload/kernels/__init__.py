"""Device kernels over the paged KV pool. Triton is imported only when a kernel is called, so `import offload`
never needs it."""

from offload.kernels.paged_decode import paged_decode, paged_decode_ragged, paged_decode_reference

__all__ = ["paged_decode", "paged_decode_ragged", "paged_decode_reference"]
