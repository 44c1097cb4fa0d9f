"""A model as two flat vectors: every float tensor in one float32 vector, the rest exact.

The aggregator never needs the user's model class: it works on ``FlatModel``
and a ``ModelSpec`` that says how to cut the vectors back into named tensors.
"""

from __future__ import annotations

import hashlib
import typing
from dataclasses import dataclass
from functools import cached_property
from math import prod

import msgpack
import numpy as np
import torch

from shared.errors import StoreError

FLOAT_DTYPES = frozenset({"float16", "bfloat16", "float32", "float64"})
EXACT_DTYPES = frozenset({"int8", "int16", "int32", "int64", "uint8", "bool"})


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def numel(self) -> int:
        return prod(self.shape)

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOAT_DTYPES


@dataclass(frozen=True)
class ModelSpec:
    """Names, shapes and dtypes of a state dict, in order."""

    tensors: tuple[TensorSpec, ...]

    @cached_property
    def float_sizes(self) -> tuple[int, ...]:
        return tuple(t.numel for t in self.tensors if t.is_float)

    @cached_property
    def n_float(self) -> int:
        return sum(self.float_sizes)

    @cached_property
    def n_exact(self) -> int:
        return sum(t.numel for t in self.tensors if not t.is_float)

    def to_wire(self) -> list[list[object]]:
        return [[t.name, t.dtype, list(t.shape)] for t in self.tensors]

    @classmethod
    def from_wire(cls, raw: object) -> ModelSpec:
        if not isinstance(raw, list):
            raise ValueError("model spec must be a list")
        out = []
        for item in raw:
            if not (isinstance(item, list) and len(item) == 3):
                raise ValueError("model spec entry must be [name, dtype, shape]")
            name, dtype, shape = item
            if not isinstance(name, str) or dtype not in FLOAT_DTYPES | EXACT_DTYPES:
                raise ValueError(f"bad tensor entry {name!r} {dtype!r}")
            if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
                raise ValueError(f"bad shape for {name!r}")
            out.append(TensorSpec(name, tuple(shape), dtype))
        return cls(tuple(out))


def _dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


@dataclass(frozen=True, eq=False)
class FlatModel:
    """A model's state as ``floats`` (float32) and ``exact`` (int64) vectors."""

    spec: ModelSpec
    floats: torch.Tensor
    exact: torch.Tensor

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> FlatModel:
        specs, floats, exact = [], [], []
        for name, tensor in state.items():
            dtype = _dtype_name(tensor)
            if dtype not in FLOAT_DTYPES | EXACT_DTYPES:
                raise ValueError(f"tensor {name!r} has unsupported dtype {dtype}")
            specs.append(TensorSpec(name, tuple(tensor.shape), dtype))
            flat = tensor.detach().reshape(-1)
            if dtype in FLOAT_DTYPES:
                floats.append(flat.to(torch.float32))
            else:
                exact.append(flat.to(torch.int64))
        f = torch.cat(floats) if floats else torch.zeros(0, dtype=torch.float32)
        e = torch.cat(exact) if exact else torch.zeros(0, dtype=torch.int64)
        return cls(ModelSpec(tuple(specs)), f.contiguous(), e.contiguous())

    def to_state_dict(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        fi = ei = 0
        for t in self.spec.tensors:
            n = t.numel
            dtype = getattr(torch, t.dtype)
            if t.is_float:
                out[t.name] = self.floats[fi : fi + n].reshape(t.shape).to(dtype).clone()
                fi += n
            else:
                out[t.name] = self.exact[ei : ei + n].reshape(t.shape).to(dtype).clone()
                ei += n
        return out

    def to_bytes(self) -> bytes:
        """Deterministic serialization: equal models give equal bytes."""
        doc = {
            "v": 1,
            "spec": self.spec.to_wire(),
            "floats": self.floats.numpy().astype("<f4", copy=False).tobytes(),
            "exact": self.exact.numpy().astype("<i8", copy=False).tobytes(),
        }
        return typing.cast(bytes, msgpack.packb(doc))

    @classmethod
    def from_bytes(cls, raw: bytes) -> FlatModel:
        try:
            doc = msgpack.unpackb(raw, raw=False)
            if not isinstance(doc, dict) or doc.get("v") != 1:
                raise ValueError("not a version-1 fedq model")
            spec = ModelSpec.from_wire(doc["spec"])
            fb, eb = doc["floats"], doc["exact"]
            if len(fb) != 4 * spec.n_float or len(eb) != 8 * spec.n_exact:
                raise ValueError("vector lengths do not match the spec")
            floats = torch.from_numpy(np.frombuffer(fb, dtype="<f4").astype(np.float32))
            exact = torch.from_numpy(np.frombuffer(eb, dtype="<i8").astype(np.int64))
        except (ValueError, KeyError, TypeError, msgpack.UnpackException) as exc:
            raise StoreError(f"not a fedq model: {exc}") from exc
        return cls(spec, floats, exact)

    def sha256(self) -> str:
        return hashlib.sha256(self.to_bytes()).hexdigest()

    def with_vectors(self, floats: torch.Tensor, exact: torch.Tensor) -> FlatModel:
        return FlatModel(self.spec, floats, exact)
