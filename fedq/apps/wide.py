"""A deliberately large app: MNIST-1D with a 5.1-million-parameter MLP.

Its model (~20 MB) and its int8 updates (~5 MB) are above the default 1 MiB
inline limit, so tasks and updates travel by claim check through the store.
Use it to try fedq with big payloads: ``fedq run --app fedq.apps.wide:app``.
"""

from __future__ import annotations

import torch
from torch import nn

from fedq.apps.mnist1d import Mnist1dApp


class WideApp(Mnist1dApp):
    name = "mnist1d-wide"

    def build_model(self, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return nn.Sequential(
            nn.Flatten(),
            nn.Linear(40, 2500),
            nn.ReLU(),
            nn.Linear(2500, 2000),
            nn.ReLU(),
            nn.Linear(2000, 10),
        )


app = WideApp()
