"""Blockwise int8 quantization of a model delta, with stochastic rounding.

Blocks hold ``block`` consecutive values of one tensor (the last block of a
tensor may be shorter); each block has one fp32 scale ``max|x| / 127`` and the
values travel as ``q = floor(x / scale + u)``, ``u ~ U[0, 1)``, so that
``E[scale * q] = x``. Exact (non-float) tensors travel as raw int64.

On the wire, int8 values are in *block order*: first the full blocks of every
tensor (tensor by tensor), then the short tail blocks. The full blocks then
form one ``(n_full, block)`` matrix, so dequantizing is one broadcast multiply
with no per-value index: that is what keeps the aggregator's per-update work
at memory speed. ``to_flat``/``to_wire`` move between this order and the
model's flat order (the identity when no tail sits before a full block).

Payload layout, little endian:
``int8``: scales f32[n_blocks] | q i8[n_float] (block order) | exact i64[n_exact]
``none``: values f32[n_float] (flat order) | exact i64[n_exact]
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property, lru_cache

import numpy as np
import torch

from shared.errors import ScreeningError
from shared.reasons import Reason
from shared.tensors import ModelSpec

SCHEMES = ("int8", "none")
DEFAULT_BLOCK = 256
_SLAB_VALUES = 1 << 20  # values dequantized per pass: 5 MB of int8 and float32, cache-sized


@dataclass(frozen=True, eq=False)
class BlockLayout:
    """The blocks of a list of tensor sizes, and the permutation between flat and block order."""

    n: int
    block: int
    sizes: tuple[int, ...]
    n_full: int  # full blocks, all tensors together
    tail_counts: torch.Tensor  # int64: length of each tail block, in tensor order
    perm: torch.Tensor | None  # block-order position i holds flat position perm[i]; None: identity

    @property
    def n_blocks(self) -> int:
        return self.n_full + int(self.tail_counts.numel())

    @property
    def full_len(self) -> int:
        return self.n_full * self.block

    @cached_property
    def tail_block_of(self) -> torch.Tensor:
        """For each tail value (block order), the index of its tail block."""
        counts = self.tail_counts
        return torch.repeat_interleave(
            torch.arange(counts.numel()), counts, output_size=self.n - self.full_len
        )

    @cached_property
    def counts(self) -> torch.Tensor:
        """Length of each block in flat order (tensor by tensor, tail last)."""
        out: list[int] = []
        for size in self.sizes:
            full, rest = divmod(size, self.block)
            out.extend([self.block] * full + ([rest] if rest else []))
        return torch.tensor(out, dtype=torch.int64)

    @cached_property
    def block_of(self) -> torch.Tensor:
        """Flat-order block index of each value (flat order)."""
        c = self.counts
        return torch.repeat_interleave(torch.arange(c.numel()), c, output_size=self.n)

    @cached_property
    def wire_blocks(self) -> torch.Tensor:
        """For each block in wire order, its index in flat order."""
        full: list[int] = []
        tails: list[int] = []
        i = 0
        for size in self.sizes:
            f, rest = divmod(size, self.block)
            full.extend(range(i, i + f))
            i += f
            if rest:
                tails.append(i)
                i += 1
        return torch.tensor(full + tails, dtype=torch.int64)


@lru_cache(maxsize=32)
def block_layout(sizes: tuple[int, ...], block: int) -> BlockLayout:
    """Built once per model spec and block size (a loop over tensors, never per update)."""
    if block < 1:
        raise ValueError("block size must be positive")
    full_ranges, tail_ranges, tail_counts, start, n_full = [], [], [], 0, 0
    for size in sizes:
        full, rest = divmod(size, block)
        n_full += full
        full_ranges.append(torch.arange(start, start + full * block))
        if rest:
            tail_ranges.append(torch.arange(start + full * block, start + size))
            tail_counts.append(rest)
        start += size
    perm = torch.cat([*full_ranges, *tail_ranges]) if sizes else torch.zeros(0, dtype=torch.int64)
    identity = bool(torch.equal(perm, torch.arange(start)))
    return BlockLayout(
        start,
        block,
        tuple(sizes),
        n_full,
        torch.tensor(tail_counts, dtype=torch.int64),
        None if identity else perm,
    )


def to_wire(flat: torch.Tensor, layout: BlockLayout) -> torch.Tensor:
    return flat if layout.perm is None else flat[layout.perm]


def to_flat(wire: torch.Tensor, layout: BlockLayout) -> torch.Tensor:
    if layout.perm is None:
        return wire
    out = torch.empty_like(wire)
    out[layout.perm] = wire
    return out


def payload_size(spec: ModelSpec, scheme: str, block: int) -> int:
    if scheme == "int8":
        nb = block_layout(spec.float_sizes, block).n_blocks
        return 4 * nb + spec.n_float + 8 * spec.n_exact
    if scheme == "none":
        return 4 * spec.n_float + 8 * spec.n_exact
    raise ValueError(f"unknown quantization scheme {scheme!r}")


def quantize_int8(
    x: torch.Tensor, layout: BlockLayout, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize flat ``x``: (scales f32[n_blocks], q int8[n]), both in block (wire) order."""
    xw = to_wire(x, layout)
    f, nf, b = layout.full_len, layout.n_full, layout.block
    full, tail = xw[:f].view(nf, b), xw[f:]
    tail_max = torch.zeros(layout.tail_counts.numel(), dtype=torch.float32)
    tail_max.scatter_reduce_(0, layout.tail_block_of, tail.abs(), reduce="amax", include_self=True)
    full_max = full.abs().amax(dim=1) if nf else torch.zeros(0, dtype=torch.float32)
    scales = torch.cat([full_max, tail_max]) / 127.0
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    y = torch.empty(layout.n, dtype=torch.float32)
    torch.div(full, safe[:nf, None], out=y[:f].view(nf, b))
    y[f:] = tail / safe[nf:][layout.tail_block_of]
    noise = torch.rand(y.shape, generator=generator, dtype=torch.float32)
    q = torch.floor(y.add_(noise)).clamp_(-127, 127).to(torch.int8)
    return scales, q


def dequantize_wire(
    scales: torch.Tensor, q: torch.Tensor, layout: BlockLayout, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Scales and values in block order -> float32 values in block order.

    ``out``, a float32 vector of ``layout.n`` values, is written over and returned: a caller
    that dequantizes update after update reuses one, since mapping a fresh output costs more
    than the arithmetic."""
    return _dequantize(scales, q.numpy(), layout, _output(out, layout.n))


def _dequantize(scales: torch.Tensor, q: np.ndarray, layout: BlockLayout, out: torch.Tensor) -> torch.Tensor:
    f, nf, b = layout.full_len, layout.n_full, layout.block
    if nf:
        # Convert, then scale in place, a cache-sized slab at a time. A mixed int8 x float32
        # multiply would be one pass, but torch runs it unvectorized: about 7x slower.
        q_full, out_full, s_full = q[:f].reshape(nf, b), out[:f].view(nf, b), scales[:nf, None]
        step = max(1, _SLAB_VALUES // b)
        for i in range(0, nf, step):
            slab = out_full[i : i + step]
            slab.numpy()[:] = q_full[i : i + step]
            slab.mul_(s_full[i : i + step])
    if f < layout.n:
        out[f:] = torch.from_numpy(q[f:].astype(np.float32)) * scales[nf:][layout.tail_block_of]
    return out


def _output(out: torch.Tensor | None, n: int) -> torch.Tensor:
    if out is None:
        return torch.empty(n, dtype=torch.float32)
    if out.dtype != torch.float32 or out.shape != (n,) or not out.is_contiguous():
        raise ValueError(f"output buffer must be a contiguous float32 vector of {n} values")
    return out


def dequantize_int8(scales: torch.Tensor, q: torch.Tensor, layout: BlockLayout) -> torch.Tensor:
    """Scales and values in block order -> float32 values in flat order."""
    return to_flat(dequantize_wire(scales, q, layout), layout)


def encode_delta(
    floats: torch.Tensor,
    exact: torch.Tensor,
    spec: ModelSpec,
    scheme: str,
    block: int = DEFAULT_BLOCK,
    generator: torch.Generator | None = None,
) -> bytes:
    """Serialize a delta (float part and exact part) under ``scheme``."""
    tail = exact.to(torch.int64).numpy().astype("<i8", copy=False).tobytes()
    if scheme == "none":
        return floats.to(torch.float32).numpy().astype("<f4", copy=False).tobytes() + tail
    if scheme == "int8":
        layout = block_layout(spec.float_sizes, block)
        scales, q = quantize_int8(floats.to(torch.float32), layout, generator)
        return scales.numpy().astype("<f4", copy=False).tobytes() + q.numpy().tobytes() + tail
    raise ValueError(f"unknown quantization scheme {scheme!r}")


def decode_delta_wire(
    payload: bytes, spec: ModelSpec, scheme: str, block: int, out: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, BlockLayout | None]:
    """Parse a delta payload without reordering: int8 floats come back in block order with
    their layout, ``none`` floats in flat order (layout ``None``). Any length or scheme
    mismatch is a ``bad_shape`` rejection. The floats are written into ``out`` when given
    (float32, ``spec.n_float`` values): the returned tensor is then ``out`` itself."""
    if scheme not in SCHEMES:
        raise ScreeningError(Reason.BAD_SHAPE, f"unknown quantization scheme {scheme!r}")
    if scheme == "int8" and not 1 <= block <= 1 << 20:
        raise ScreeningError(Reason.BAD_SHAPE, f"block size {block} out of range")
    expected = payload_size(spec, scheme, block)
    if len(payload) != expected:
        raise ScreeningError(Reason.BAD_SHAPE, f"payload is {len(payload)} bytes, the model needs {expected}")
    buf = memoryview(payload)
    n, m = spec.n_float, spec.n_exact
    layout: BlockLayout | None = None
    if scheme == "none":
        floats = _output(out, n)
        floats.numpy()[:] = np.frombuffer(buf[: 4 * n], dtype="<f4")
        offset = 4 * n
    else:
        layout = block_layout(spec.float_sizes, block)
        nb = layout.n_blocks
        scales = torch.from_numpy(np.frombuffer(buf[: 4 * nb], dtype="<f4").astype(np.float32))
        q = np.frombuffer(buf[4 * nb : 4 * nb + n], dtype=np.int8)  # read in place, no copy
        floats = _dequantize(scales, q, layout, _output(out, n))
        offset = 4 * nb + n
    exact = torch.from_numpy(np.frombuffer(buf[offset : offset + 8 * m], dtype="<i8").astype(np.int64))
    return floats, exact, layout


def decode_delta(
    payload: bytes, spec: ModelSpec, scheme: str, block: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Parse a delta payload into flat-order floats and the exact part."""
    floats, exact, layout = decode_delta_wire(payload, spec, scheme, block)
    return (floats if layout is None else to_flat(floats, layout)), exact
