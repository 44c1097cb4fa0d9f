"""The built-in app: MNIST-1D, generated locally, and a small 1-D CNN.

Data: ``mnist1d.make_dataset`` with ``num_samples=20000`` and ``seed=42``
(16,000 train / 4,000 test, 40 values each), standardized with the training
mean and std. Generated once and cached under ``$FEDQ_DATA_DIR`` (default
``~/.cache/fedq``), since every worker process would otherwise spend seconds
making the same set. Nothing is downloaded.
"""

from __future__ import annotations

import os
import tempfile
from functools import cache
from pathlib import Path

import numpy as np
import torch
from torch import nn

from shared.app import ClassificationApp

NUM_SAMPLES = 20000
SEED = 42


def data_dir() -> Path:
    return Path(os.environ.get("FEDQ_DATA_DIR", Path.home() / ".cache" / "fedq"))


def _generate() -> dict[str, np.ndarray]:
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = NUM_SAMPLES
    args.seed = SEED
    d = make_dataset(args)
    return {k: np.asarray(d[k]) for k in ("x", "y", "x_test", "y_test")}


@cache
def load_arrays() -> dict[str, np.ndarray]:
    """The raw arrays, from the cache file or freshly generated (and then cached atomically)."""
    path = data_dir() / f"mnist1d-{NUM_SAMPLES}-{SEED}.npz"
    if path.exists():
        with np.load(path) as z:
            return {k: z[k] for k in z.files}
    arrays = _generate()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npz")
    with os.fdopen(fd, "wb") as fh:
        np.savez(fh, **arrays)  # type: ignore[arg-type]
    os.replace(tmp, path)
    return arrays


@cache
def _standardized() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    a = load_arrays()
    x = torch.tensor(a["x"], dtype=torch.float32)
    xt = torch.tensor(a["x_test"], dtype=torch.float32)
    mean, std = x.mean(), x.std()
    x, xt = (x - mean) / std, (xt - mean) / std
    return (
        x.unsqueeze(1),
        torch.tensor(a["y"], dtype=torch.int64),
        xt.unsqueeze(1),
        torch.tensor(a["y_test"], dtype=torch.int64),
    )


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv1d(1, 32, 5, stride=2, padding=2),
        nn.ReLU(),
        nn.Conv1d(32, 32, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv1d(32, 32, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(160, 10),
    )


class Mnist1dApp(ClassificationApp):
    name = "mnist1d"

    def build_model(self, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return cnn()

    def train_data(self) -> tuple[torch.Tensor, torch.Tensor]:
        x, y, _, _ = _standardized()
        return x, y

    def test_data(self) -> tuple[torch.Tensor, torch.Tensor]:
        _, _, xt, yt = _standardized()
        return xt, yt


app = Mnist1dApp()
