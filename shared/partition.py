"""Split a labelled data set over workers: Dirichlet(alpha) label skew, or a JSON file."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from shared.errors import ConfigError


def parse_partition(text: str) -> tuple[int, int]:
    """``"I/N"`` -> (I, N), with 0 <= I < N."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not m:
        raise ConfigError(f"partition {text!r} must look like I/N, e.g. 3/10")
    index, count = int(m[1]), int(m[2])
    if count < 1 or not 0 <= index < count:
        raise ConfigError(f"partition {text!r}: need 0 <= I < N")
    return index, count


def dirichlet_partition(labels: np.ndarray, count: int, alpha: float, seed: int) -> list[list[int]]:
    """Equal-sized shares whose label mix is drawn from Dir(alpha) per worker (Hsu et al. 2019).

    Worker ``i`` draws class proportions ``q_i ~ Dir(alpha)`` and fills its
    ``len(labels) // count`` samples class by class from those proportions,
    without replacement; when a class runs out the rest of its share goes to the
    classes that remain. Equal sizes keep task durations comparable, so label
    skew is the only heterogeneity unless a delay profile adds more.
    Deterministic for a seed.
    """
    if alpha <= 0:
        raise ConfigError("alpha must be positive")
    if count < 1 or count > len(labels):
        raise ConfigError(f"{len(labels)} samples cannot be split over {count} workers")
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    pools = []
    for c in classes:
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        pools.append(list(idx))
    size = len(labels) // count
    parts: list[list[int]] = []
    for _ in range(count):
        q = rng.dirichlet([alpha] * len(classes))
        part: list[int] = []
        while len(part) < size:
            available = np.array([len(p) > 0 for p in pools], dtype=float)
            weights = q * available
            if weights.sum() <= 0:
                weights = available
            weights = weights / weights.sum()
            c = int(rng.choice(len(classes), p=weights))
            part.append(int(pools[c].pop()))
        parts.append(sorted(part))
    return parts


def load_partition_file(path: Path, count: int, n_samples: int, index: int | None = None) -> list[list[int]]:
    """A JSON list of index lists, one per worker: each list non-empty, each index an integer in
    ``0..n_samples-1``, and no index in two lists (nor twice in one). ``index``, when given, is the
    worker's own list, which must be there. Any fault is a ``ConfigError`` naming the file."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read partition file {path}: {exc}") from exc
    if not isinstance(doc, list) or not all(isinstance(p, list) for p in doc):
        raise ConfigError(f"partition file {path} must hold a JSON list of index lists, one per worker")
    if len(doc) != count:
        raise ConfigError(f"partition file {path} has {len(doc)} partitions, the job has {count} workers")
    if index is not None and not 0 <= index < len(doc):
        raise ConfigError(f"partition file {path} has {len(doc)} partitions: there is no partition {index}")
    owner: dict[int, int] = {}  # index -> the first partition that holds it
    for i, part in enumerate(doc):
        if not part:
            raise ConfigError(f"partition file {path}: partition {i} is empty")
        for j in part:
            if type(j) is not int:  # not bool, float or string
                raise ConfigError(f"partition file {path}: partition {i} holds {j!r}, not an integer index")
            if j < 0:
                raise ConfigError(f"partition file {path}: partition {i} holds the negative index {j}")
            if j >= n_samples:
                raise ConfigError(
                    f"partition file {path}: partition {i} holds index {j}, "
                    f"outside the {n_samples} samples (0..{n_samples - 1})"
                )
            first = owner.get(j)
            if first == i:
                raise ConfigError(f"partition file {path}: partition {i} holds index {j} more than once")
            if first is not None:
                raise ConfigError(f"partition file {path}: index {j} is in partitions {first} and {i}")
            owner[j] = i
    return doc
