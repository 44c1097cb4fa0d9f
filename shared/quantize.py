"""Blockwise int8 quantization of a model delta, with stochastic rounding.

Blocks hold ``block`` consecutive values of one tensor (the last block of a
tensor may be shorter); each block has one fp32 scale ``max|x| / 127`` and the
values travel as ``q = floor(x / scale + u)``, ``u ~ U[0, 1)``, so that
``E[scale * q] = x``. Exact (non-float) tensors travel as raw int64.

Payload layout, little endian:
``int8``: scales f32[n_blocks] | q i8[n_float] | exact i64[n_exact]
``none``: values f32[n_float]  | exact i64[n_exact]
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from shared.errors import ScreeningError
from shared.tensors import ModelSpec

SCHEMES = ("int8", "none")
DEFAULT_BLOCK = 256


@dataclass(frozen=True, eq=False)
class BlockLayout:
    """Where blocks start and how long each one is, for a list of tensor sizes."""

    n: int
    counts: torch.Tensor  # int64[n_blocks], length of each block
    block_of: torch.Tensor  # int64[n], block index of each value

    @property
    def n_blocks(self) -> int:
        return int(self.counts.numel())


@lru_cache(maxsize=32)
def block_layout(sizes: tuple[int, ...], block: int) -> BlockLayout:
    if block < 1:
        raise ValueError("block size must be positive")
    counts: list[int] = []
    for size in sizes:
        full, rest = divmod(size, block)
        counts.extend([block] * full)
        if rest:
            counts.append(rest)
    c = torch.tensor(counts, dtype=torch.int64)
    n = sum(sizes)
    block_of = torch.repeat_interleave(torch.arange(len(counts)), c, output_size=n)
    return BlockLayout(n, c, block_of)


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
    """Return (scales f32[n_blocks], q int8[n]) with E[scales[block_of] * q] = x."""
    absmax = torch.zeros(layout.n_blocks, dtype=torch.float32)
    absmax.scatter_reduce_(0, layout.block_of, x.abs(), reduce="amax", include_self=True)
    scales = absmax / 127.0
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    y = x / safe[layout.block_of]
    noise = torch.rand(y.shape, generator=generator, dtype=torch.float32)
    q = torch.floor(y + noise).clamp_(-127, 127).to(torch.int8)
    return scales, q


def dequantize_int8(scales: torch.Tensor, q: torch.Tensor, layout: BlockLayout) -> torch.Tensor:
    expanded = torch.repeat_interleave(scales, layout.counts, output_size=layout.n)
    return q.to(torch.float32).mul_(expanded)


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


def decode_delta(
    payload: bytes, spec: ModelSpec, scheme: str, block: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Parse a delta payload; any length or scheme mismatch is a ``bad_shape`` rejection."""
    if scheme not in SCHEMES:
        raise ScreeningError("bad_shape", f"unknown quantization scheme {scheme!r}")
    if scheme == "int8" and not 1 <= block <= 1 << 20:
        raise ScreeningError("bad_shape", f"block size {block} out of range")
    expected = payload_size(spec, scheme, block)
    if len(payload) != expected:
        raise ScreeningError("bad_shape", f"payload is {len(payload)} bytes, the model needs {expected}")
    buf = memoryview(payload)
    n, m = spec.n_float, spec.n_exact
    if scheme == "none":
        floats = torch.from_numpy(np.frombuffer(buf[: 4 * n], dtype="<f4").astype(np.float32))
        offset = 4 * n
    else:
        layout = block_layout(spec.float_sizes, block)
        nb = layout.n_blocks
        scales = torch.from_numpy(np.frombuffer(buf[: 4 * nb], dtype="<f4").astype(np.float32))
        q = torch.from_numpy(np.frombuffer(buf[4 * nb : 4 * nb + n], dtype=np.int8).copy())
        floats = dequantize_int8(scales, q, layout)
        offset = 4 * nb + n
    exact = torch.from_numpy(np.frombuffer(buf[offset : offset + 8 * m], dtype="<i8").astype(np.int64))
    return floats, exact
