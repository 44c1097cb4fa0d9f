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


def dirichlet_partition(
    labels: np.ndarray, count: int, alpha: float, seed: int, min_size: int = 10
) -> list[list[int]]:
    """Per class, share its samples over ``count`` workers with proportions ~ Dir(alpha).

    Deterministic for a seed; redraws until every worker has ``min_size`` samples.
    """
    if alpha <= 0:
        raise ConfigError("alpha must be positive")
    if count * min_size > len(labels):
        raise ConfigError(f"{len(labels)} samples cannot be split over {count} workers")
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    for _ in range(1000):
        parts: list[list[int]] = [[] for _ in range(count)]
        for c in classes:
            idx = np.flatnonzero(labels == c)
            rng.shuffle(idx)
            cuts = (np.cumsum(rng.dirichlet([alpha] * count)) * len(idx)).astype(int)[:-1]
            for worker, chunk in enumerate(np.split(idx, cuts)):
                parts[worker].extend(int(i) for i in chunk)
        if min(len(p) for p in parts) >= min_size:
            return [sorted(p) for p in parts]
    raise ConfigError(f"could not give every worker {min_size} samples with alpha={alpha}")


def load_partition_file(path: Path, count: int, n_samples: int) -> list[list[int]]:
    """A JSON list of index lists, one per worker."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read partition file {path}: {exc}") from exc
    if not isinstance(doc, list) or not all(isinstance(p, list) for p in doc):
        raise ConfigError(f"{path} must hold a JSON list of index lists, one per worker")
    if len(doc) != count:
        raise ConfigError(f"{path} has {len(doc)} partitions, the job has {count} workers")
    for i, part in enumerate(doc):
        if not part or not all(isinstance(j, int) and 0 <= j < n_samples for j in part):
            raise ConfigError(f"{path}: partition {i} is empty or has indices outside 0..{n_samples - 1}")
    return doc
