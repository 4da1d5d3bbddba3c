"""Small reference architectures used by tests, examples and benchmarks (torch, host side)."""

from __future__ import annotations

import itertools

import torch
from torch import nn


class MLP(nn.Module):
    """Fully connected classifier: Linear-ReLU stacks and a linear head."""

    def __init__(self, in_features: int = 64, hidden: tuple[int, ...] = (64,), classes: int = 10):
        super().__init__()
        dims = (in_features, *hidden)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(dims))
        self.head = nn.Linear(dims[-1], classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.relu(layer(x))
        return self.head(x)


class CNN(nn.Module):
    """Conv-BN-ReLU-pool x2 and a linear head, for [batch, ch, size, size] images."""

    def __init__(self, in_ch: int = 1, size: int = 8, width: int = 16, classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, width, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(2 * width)
        self.pool = nn.MaxPool2d(2)
        self.head = nn.Linear(2 * width * (size // 4) ** 2, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.bn1(self.conv1(x))))
        x = self.pool(torch.relu(self.bn2(self.conv2(x))))
        return self.head(torch.flatten(x, 1))


class GRUClassifier(nn.Module):
    """GRU over [batch, time, features], linear head on the last hidden state."""

    def __init__(self, in_features: int = 6, hidden: int = 32, classes: int = 6):
        super().__init__()
        self.gru = nn.GRU(in_features, hidden, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.gru(x)
        return self.head(out[:, -1])


class Conv1dClassifier(nn.Module):
    """Two strided Conv1d-ReLU layers over [batch, time, features], mean over time, linear head.

    Sized for windows of inertial data (e.g. [batch, 100, 6] = 2 s of a 6-axis IMU at 50 Hz).
    """

    def __init__(self, in_features: int = 6, width: int = 16, classes: int = 7,
                 kernel: int = 5):
        super().__init__()
        self.conv1 = nn.Conv1d(in_features, width, kernel, stride=2)
        self.conv2 = nn.Conv1d(width, 2 * width, kernel, stride=2)
        self.head = nn.Linear(2 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x.transpose(1, 2)))
        x = torch.relu(self.conv2(x))
        return self.head(x.mean(dim=2))


class TinyTransformer(nn.Module):
    """Embedding, TransformerEncoder (post-norm, no dropout), mean-pool, linear head."""

    def __init__(self, in_features: int = 8, d_model: int = 32, heads: int = 4, layers: int = 2,
                 classes: int = 4):
        super().__init__()
        self.embed = nn.Linear(in_features, d_model)
        layer = nn.TransformerEncoderLayer(d_model, heads, 2 * d_model, dropout=0.0,
                                           batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(x)).mean(dim=1))


class TwoNorms(nn.Module):
    """Two freshly initialised LayerNorms: equal values that an exporter must not merge."""

    def __init__(self, dim: int = 16, classes: int = 4):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm2(torch.relu(self.fc(self.norm1(x)))))


def _heaviside(v: torch.Tensor, *, at_zero: bool = False) -> torch.Tensor:
    """1.0 where v > 0 (v >= 0 with at_zero), else 0.0 (torch.where exports under vmap too)."""
    return torch.where(v >= 0 if at_zero else v > 0, 1.0, 0.0)


class HardThresholdMLP(nn.Module):
    """Non-differentiable: Heaviside hidden units and a staircase (round to 1/4) layer."""

    def __init__(self, in_features: int = 64, hidden: int = 32, classes: int = 10):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = _heaviside(self.fc1(x))  # zero gradient almost everywhere
        h = torch.clamp(torch.round(4.0 * self.fc2(h)) / 4.0, -2.0, 2.0)  # staircase
        return self.head(h)


class ArgmaxRouter(nn.Module):
    """Non-differentiable routing: a gate picks one expert per example (one-hot of argmax)."""

    def __init__(self, in_features: int = 64, experts: int = 4, classes: int = 10):
        super().__init__()
        self.gate = nn.Linear(in_features, experts)
        self.experts = nn.ModuleList(nn.Linear(in_features, classes) for _ in range(experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.gate(x)
        pick = _heaviside(g - g.max(dim=1, keepdim=True).values, at_zero=True)  # one_hot(argmax)
        outs = torch.stack([e(x) for e in self.experts], dim=1)  # [batch, experts, classes]
        return (pick.unsqueeze(-1) * outs).sum(dim=1)


class FakeQuantMLP(nn.Module):
    """int8 fake-quant layers in the graph: weights per-channel and activations per-tensor
    rounded to an int8 grid (round/clamp, no straight-through estimator)."""

    def __init__(self, in_features: int = 64, hidden: int = 32, classes: int = 10,
                 act_scale: float = 1.0 / 32):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden)
        self.head = nn.Linear(hidden, classes)
        self.act_scale = act_scale

    @staticmethod
    def _wq(w: torch.Tensor) -> torch.Tensor:
        s = w.abs().amax(dim=1, keepdim=True).clamp_min(1e-8) / 127.0
        return torch.clamp(torch.round(w / s), -127.0, 127.0) * s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(nn.functional.linear(x, self._wq(self.fc1.weight), self.fc1.bias))
        h = torch.clamp(torch.round(h / self.act_scale), -127.0, 127.0) * self.act_scale
        return nn.functional.linear(h, self._wq(self.head.weight), self.head.bias)


class SpikingMLP(nn.Module):
    """Hard leaky integrate-and-fire MLP, unrolled over `steps` time steps: membrane
    v <- beta v + I, spike s = H(v - threshold), reset by subtraction; head on spike rates."""

    def __init__(self, in_features: int = 64, hidden: int = 64, classes: int = 10,
                 steps: int = 4, beta: float = 0.9, threshold: float = 1.0):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden)
        self.head = nn.Linear(hidden, classes)
        self.steps, self.beta, self.threshold = steps, beta, threshold

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        current = self.fc1(x)
        v = torch.zeros_like(current)
        rate = torch.zeros_like(current)
        for _ in range(self.steps):
            v = self.beta * v + current
            s = _heaviside(v - self.threshold)
            v = v - s * self.threshold
            rate = rate + s
        return self.head(rate / self.steps)


def mlp(**kw: object) -> nn.Module:
    """MLP factory (CLI spec `edgelearn.export.zoo:mlp`)."""
    return MLP(**kw)  # type: ignore[arg-type]


def cnn(**kw: object) -> nn.Module:
    """CNN factory."""
    return CNN(**kw)  # type: ignore[arg-type]


def gru(**kw: object) -> nn.Module:
    """GRU classifier factory."""
    return GRUClassifier(**kw)  # type: ignore[arg-type]


def conv1d(**kw: object) -> nn.Module:
    """1-D conv classifier factory (time series windows)."""
    return Conv1dClassifier(**kw)  # type: ignore[arg-type]


def transformer(**kw: object) -> nn.Module:
    """Small transformer encoder factory."""
    return TinyTransformer(**kw)  # type: ignore[arg-type]


#: name -> (factory, example input shape without batch)
ZOO = {
    "mlp": (mlp, (64,)),
    "cnn": (cnn, (1, 8, 8)),
    "gru": (gru, (12, 6)),
    "transformer": (transformer, (10, 8)),
    "conv1d": (conv1d, (100, 6)),
    "two_norms": (TwoNorms, (16,)),
    "hard_threshold": (HardThresholdMLP, (64,)),
    "argmax_router": (ArgmaxRouter, (64,)),
    "fake_quant": (FakeQuantMLP, (64,)),
    "spiking": (SpikingMLP, (64,)),
}
