"""Quantized pages for the tiers below the device (`kv_quant`): keys per channel, values per token, scales inside.

A setting "k<X>v<Y>" stores keys in X bits and values in Y bits. Keys carry outlier channels, so they are quantized
per channel over the page's tokens; values are quantized per token, in groups of channels (the KIVI split). Pages
are quantized when they leave the device (written back, or placed below it at prefill) and dequantized on their way
up; the device's pages and every open tail page stay at the model's precision.

A packed page is two rows of bytes, K then V, for H KV heads, P tokens of D channels:
  K row: codes  uint8   [H, P, Dk]     Dk = ceil(D / fk) bytes a token, fk = 8 // X codes a byte
         params float16 [H, 2, D]      per head and channel over the page's tokens: scale, then minimum
  V row: codes  uint8   [H, P, Dv]     Dv = ceil(D / fv), fv = 8 // Y
         params float16 [H, P, G, 2]   per head, token and group of D // G channels: (scale, minimum)
Channel d of a token is code d % f of byte d // f, in bits (d % f) * bits and up (low bits first). Each section
starts on a 16-byte boundary, so the parameters are float16 views of the rows.

Dequantized value: code * scale + minimum, in float32, then the model's dtype. Encoding rounds the minimum down
and the scale up to float16 before it computes the codes, so every value lies within the codes' range and the
error of a value is at most half a scale step plus float16 rounding of the parameters (`error_bound`). Values
beyond float16's range (+-65504) saturate there.

Block ids (sparse mode): block u = (slot * H + h) * R + j is tokens j*B .. j*B+B-1 of head h of a packed slot, with
R = P // B; `decode_blocks` dequantizes such blocks straight from a packed pool.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# The settings `kv_quant` accepts, and their (key bits, value bits); "none" stores pages at full precision.
SETTINGS: dict[str, tuple[int, int] | None] = {"none": None, "k8v8": (8, 8), "k8v4": (8, 4), "k4v2": (4, 2)}
ALIGN = 16
_F16_MAX = 65504.0
_ROUND = 2.0 ** -10  # float16's relative step: how far rounding a parameter may move it


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def value_group(head_dim: int, bits: int) -> int:
    """Channels per value group: 32 at 2 bits (as KIVI), else up to 128 (one group a token and head where D <= 128);
    the largest divisor of `head_dim` not above that. At 4 bits, 32-channel groups lowered NLL a little but not
    top-1 agreement, and cost 4% more bytes (BENCHMARKS.md, "Quantized cold tiers")."""
    most = 32 if bits <= 2 else 128
    return max(g for g in range(1, min(most, head_dim) + 1) if head_dim % g == 0)


@dataclass(frozen=True)
class PageCodec:
    """Encodes full-precision pages [n, H, P, D] to packed rows and back, for one page shape and setting."""

    setting: str
    kv_heads: int
    page_size: int
    head_dim: int
    k_bits: int
    v_bits: int

    @classmethod
    def of(cls, setting: str, kv_heads: int, page_size: int, head_dim: int) -> PageCodec | None:
        """The codec of `setting` (a key of SETTINGS), None for "none"."""
        bits = SETTINGS[setting]
        return None if bits is None else cls(setting, kv_heads, page_size, head_dim, *bits)

    # -- layout --------------------------------------------------------------------------------------------------
    @property
    def k_per_byte(self) -> int:
        return 8 // self.k_bits

    @property
    def v_per_byte(self) -> int:
        return 8 // self.v_bits

    @property
    def k_row(self) -> int:
        """Code bytes of one token of one head, keys."""
        return -(-self.head_dim // self.k_per_byte)

    @property
    def v_row(self) -> int:
        return -(-self.head_dim // self.v_per_byte)

    @property
    def v_group(self) -> int:
        """Channels per value group."""
        return value_group(self.head_dim, self.v_bits)

    @property
    def v_groups(self) -> int:
        return self.head_dim // self.v_group

    @property
    def k_codes(self) -> int:
        """Bytes of the K row's codes (its parameters start there)."""
        return _align(self.kv_heads * self.page_size * self.k_row)

    @property
    def v_codes(self) -> int:
        return _align(self.kv_heads * self.page_size * self.v_row)

    @property
    def k_bytes(self) -> int:
        return self.k_codes + _align(self.kv_heads * 2 * self.head_dim * 2)

    @property
    def v_bytes(self) -> int:
        return self.v_codes + _align(self.kv_heads * self.page_size * self.v_groups * 2 * 2)

    @property
    def page_bytes(self) -> int:
        return self.k_bytes + self.v_bytes

    def ratio(self, dtype: torch.dtype) -> float:
        """Full-precision page bytes in `dtype` over packed page bytes."""
        return 2 * self.kv_heads * self.page_size * self.head_dim * dtype.itemsize / self.page_bytes

    # Views of packed rows [n, bytes] (n may be a pool's capacity): codes and parameters in their logical shapes.
    def k_views(self, kq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """codes uint8 [n, H, P, Dk], params float16 [n, H, 2, D]."""
        n, H, P, D = kq.shape[0], self.kv_heads, self.page_size, self.head_dim
        codes = kq[:, : H * P * self.k_row].view(n, H, P, self.k_row)
        params = kq[:, self.k_codes: self.k_codes + H * 2 * D * 2].view(torch.float16).view(n, H, 2, D)
        return codes, params

    def v_views(self, vq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """codes uint8 [n, H, P, Dv], params float16 [n, H, P, G, 2]."""
        n, H, P, G = vq.shape[0], self.kv_heads, self.page_size, self.v_groups
        codes = vq[:, : H * P * self.v_row].view(n, H, P, self.v_row)
        params = vq[:, self.v_codes: self.v_codes + H * P * G * 4].view(torch.float16).view(n, H, P, G, 2)
        return codes, params

    # -- encode ---------------------------------------------------------------------------------------------------
    def encode(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Full-precision pages k, v [n, H, P, D] -> packed rows uint8 [n, k_bytes] and [n, v_bytes], on their
        device."""
        n = k.shape[0]
        kq = torch.zeros((n, self.k_bytes), dtype=torch.uint8, device=k.device)
        vq = torch.zeros((n, self.v_bytes), dtype=torch.uint8, device=k.device)
        self.encode_into(k, v, kq, vq)
        return kq, vq

    def encode_into(self, k: torch.Tensor, v: torch.Tensor, kq: torch.Tensor, vq: torch.Tensor) -> None:
        """Writes the packed rows of pages k, v [n, H, P, D] into kq [n, k_bytes] and vq [n, v_bytes] (rows of a
        pool, on the same device)."""
        x = k.float()
        scale, low = _params(x.amin(2, keepdim=True), x.amax(2, keepdim=True), self.k_bits)  # [n, H, 1, D]
        codes, params = self.k_views(kq)
        codes.copy_(_pack(_codes(x, scale, low, self.k_bits), self.k_bits, self.k_row))
        params.copy_(torch.cat([scale, low], dim=2).to(torch.float16))
        n, H, P, D = v.shape
        y = v.float().view(n, H, P, self.v_groups, self.v_group)
        scale, low = _params(y.amin(-1, keepdim=True), y.amax(-1, keepdim=True), self.v_bits)  # [n, H, P, G, 1]
        codes, params = self.v_views(vq)
        codes.copy_(_pack(_codes(y, scale, low, self.v_bits).view(n, H, P, D), self.v_bits, self.v_row))
        params.copy_(torch.cat([scale, low], dim=-1).to(torch.float16))

    # -- decode ---------------------------------------------------------------------------------------------------
    def decode(self, kq: torch.Tensor, vq: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Packed rows kq [n, k_bytes], vq [n, v_bytes] -> pages k, v [n, H, P, D] of `dtype`."""
        codes, params = self.k_views(kq)
        p = params.float()
        k = _unpack(codes, self.k_bits, self.head_dim) * p[:, :, :1] + p[:, :, 1:]
        codes, params = self.v_views(vq)
        p = params.float()
        n, H, P, D = codes.shape[0], self.kv_heads, self.page_size, self.head_dim
        y = _unpack(codes, self.v_bits, D).view(n, H, P, self.v_groups, self.v_group)
        v = (y * p[..., :1] + p[..., 1:]).view(n, H, P, D)
        return k.to(dtype), v.to(dtype)

    def decode_blocks(self, kq: torch.Tensor, vq: torch.Tensor, ids: torch.Tensor, block: int,
                      dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Blocks `ids` (int64 [m], block u = (slot * H + h) * R + j of the packed pools kq [S, k_bytes], vq
        [S, v_bytes]) -> k, v [m, B, D] of `dtype`. Device ops only: nothing is read back on the host."""
        S, H, D = kq.shape[0], self.kv_heads, self.head_dim
        R = self.page_size // block
        slot, hr = ids.div(H * R, rounding_mode="floor"), ids.remainder(H * R)
        head = hr.div(R, rounding_mode="floor")
        codes, params = self.k_views(kq)
        c = codes.view(S, H * R, block, self.k_row)[slot, hr]  # [m, B, Dk]
        p = params[slot, head].float()  # [m, 2, D]
        k = _unpack(c, self.k_bits, D) * p[:, :1] + p[:, 1:]
        codes, params = self.v_views(vq)
        c = codes.view(S, H * R, block, self.v_row)[slot, hr]
        p = params.view(S, H * R, block, self.v_groups, 2)[slot, hr].float()  # [m, B, G, 2]
        m = ids.shape[0]
        y = _unpack(c, self.v_bits, D).view(m, block, self.v_groups, self.v_group)
        v = (y * p[..., :1] + p[..., 1:]).view(m, block, D)
        return k.to(dtype), v.to(dtype)

    def error_bound(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per element of k, v [n, H, P, D], the most a value may move through encode and decode: half the
        scale step of its channel (keys) or group (values), plus float16 rounding of the parameters."""
        x, y = k.float(), v.float()
        n, H, P, D = v.shape
        y = y.view(n, H, P, self.v_groups, self.v_group)
        bounds = []
        for t, dim, bits in ((x, 2, self.k_bits), (y, -1, self.v_bits)):
            lo, hi = t.amin(dim, keepdim=True), t.amax(dim, keepdim=True)
            step = (hi - lo) / (2 ** bits - 1)
            mag = torch.maximum(lo.abs(), hi.abs())
            bounds.append((0.5 * step * (1 + 4 * _ROUND) + 4 * _ROUND * mag + 2.0 ** -23).expand_as(t))
        return bounds[0].contiguous(), bounds[1].reshape(n, H, P, D)


def _params(lo: torch.Tensor, hi: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 scale and minimum, exactly representable in float16: the minimum rounded down, the scale up."""
    low = _to_f16(lo.clamp(-_F16_MAX, _F16_MAX), down=True)
    scale = ((hi.clamp(max=_F16_MAX) - low) / (2 ** bits - 1)).clamp(min=0)
    return _to_f16(scale.clamp(max=_F16_MAX), down=False), low


def _to_f16(x: torch.Tensor, down: bool) -> torch.Tensor:
    """x rounded to a float16 value at or below it (`down`) or at or above it, as float32."""
    h = x.to(torch.float16)
    off = h.float() > x if down else h.float() < x
    toward = torch.full_like(h, float("-inf") if down else float("inf"))
    return torch.where(off, torch.nextafter(h, toward), h).float()


def _codes(x: torch.Tensor, scale: torch.Tensor, low: torch.Tensor, bits: int) -> torch.Tensor:
    inv = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
    return ((x - low) * inv).round_().clamp_(0, 2 ** bits - 1).to(torch.uint8)


def _pack(codes: torch.Tensor, bits: int, row: int) -> torch.Tensor:
    """uint8 codes [..., D] -> bytes [..., row], code d in bits (d % f) * bits of byte d // f."""
    f = 8 // bits
    if f == 1:
        return codes
    pad = row * f - codes.shape[-1]
    if pad:
        codes = torch.nn.functional.pad(codes, (0, pad))
    c = codes.view(*codes.shape[:-1], row, f)
    out = c[..., 0].clone()
    for j in range(1, f):
        out |= c[..., j] << (j * bits)
    return out


def _unpack(codes: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """bytes [..., row] -> float32 codes [..., dim]."""
    f = 8 // bits
    if f == 1:
        return codes.float()
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=codes.device)
    c = (codes.unsqueeze(-1) >> shifts) & (2 ** bits - 1)
    c = c.view(*codes.shape[:-1], codes.shape[-1] * f)
    if c.shape[-1] != dim:
        c = c[..., :dim]
    return c.float()
