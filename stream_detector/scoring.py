"""The model runner: one resident model, whole micro-batches per call, on CUDA when there is one.

The model and its preprocessing are moved to the device once. Each call stacks many keys' windows
into one (B, W, F) tensor, copies it to the device in one transfer (from pinned host memory on
CUDA), scores it under ``torch.inference_mode`` and brings back only the scores and per-feature
errors. Calls are made from a worker thread so the asyncio loop keeps heartbeating.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass

import numpy as np
import torch

from .artifacts import ModelArtifact


@dataclass
class Scores:
    scores: np.ndarray  # (B,) float32
    feature_errors: np.ndarray  # (B, F) float32


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} requested but CUDA is not available")
    return device


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity, e.g. a container's share), else all of them."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def configure_threads(threads: int = 0) -> int:
    """Intra-op threads for CPU inference (training): all cores by default, never more (oversubscription)."""
    n = threads if threads > 0 else available_cores()
    torch.set_num_threads(n)
    return n


def worker_threads(threads: int = 0) -> int:
    """The worker's inference threads: by default one core fewer than available, at least one.

    The model runs on a worker thread while the event loop keeps consuming and publishing (and Faust's
    consumer thread keeps fetching); inference threads on every core would fight them for it. On this
    project's 2-core benchmark machine one thread beats two end to end (benchmarks/results/throughput.md).
    """
    return configure_threads(threads if threads > 0 else max(available_cores() - 1, 1))


class ModelRunner:
    def __init__(self, artifact: ModelArtifact, device: str = "auto", max_batch: int = 1024):
        self.artifact = artifact
        self.device = resolve_device(device)
        self.window = artifact.window
        self.n_features = artifact.profile.n_features
        self.preprocess = artifact.preprocessor().to(self.device).eval()
        self.model = artifact.model.to(self.device).eval()
        self._lock = threading.Lock()
        self._staging: torch.Tensor | None = None
        if self.device.type == "cuda":
            self._staging = torch.empty((max_batch, self.window, self.n_features), dtype=torch.float32,
                                        pin_memory=True)

    @property
    def version(self) -> str:
        return self.artifact.version

    def score(self, windows: np.ndarray) -> Scores:
        """Scores raw (unscaled) windows of shape (B, W, F)."""
        if windows.ndim != 3 or windows.shape[1:] != (self.window, self.n_features):
            raise ValueError(f"expected windows of shape (B, {self.window}, {self.n_features}), got {windows.shape}")
        batch = len(windows)
        if batch == 0:
            return Scores(np.zeros(0, np.float32), np.zeros((0, self.n_features), np.float32))
        with self._lock, torch.inference_mode():
            host = torch.from_numpy(np.ascontiguousarray(windows, dtype=np.float32))
            if self._staging is not None:
                if batch > len(self._staging):
                    self._staging = torch.empty((batch, self.window, self.n_features), dtype=torch.float32,
                                                pin_memory=True)
                staged = self._staging[:batch]
                staged.copy_(host)
                x = staged.to(self.device, non_blocking=True)
            else:
                x = host
            scores, per_feature = self.model.anomaly_scores(self.preprocess(x))
            out = torch.cat([scores.unsqueeze(1), per_feature], dim=1).float().cpu().numpy()
        return Scores(out[:, 0].copy(), out[:, 1:].copy())
