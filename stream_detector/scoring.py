"""The model runner: one resident model, whole micro-batches per call, on CUDA when there is one.

The model and its preprocessing are moved to the device once. Each call stacks many keys' windows
into one (B, W, F) tensor, copies it to the device in one transfer (from pinned host memory on
CUDA), scores it under ``torch.inference_mode`` and brings back only the scores and per-feature
errors. Calls are made from a worker thread so the asyncio loop keeps heartbeating.
"""

from __future__ import annotations

import logging
import os
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from .artifacts import ModelArtifact

log = logging.getLogger(__name__)


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


def inference_executor(threads: int = 0) -> ThreadPoolExecutor:
    """The single thread the worker scores on, with its intra-op thread count set in that thread.

    Why there: the count torch.set_num_threads sets on the main thread does not carry over to a
    new thread, whose small model calls then run on a team of one thread per core. On the 2-core
    benchmark machine that team's idle member spun a whole core between calls (batch 1, about
    1,000 calls/s: 1.0 core; none with the count set in the thread, at the same call rate).
    """
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference", initializer=worker_threads,
                              initargs=(threads,))


# On CPU a micro-batch is scored in chunks of this many windows: the LSTM's per-step activations
# then stay in cache. Model-only, 1 thread, on the 2-core benchmark machine: 45,392 windows/s at
# batch 256 against 38,598 at 1,024 and 32,947 at 4,096 (benchmarks/results/throughput.md).
CPU_CHUNK = 256


class ModelRunner:
    def __init__(self, artifact: ModelArtifact, device: str = "auto", max_batch: int = 1024,
                 cpu_chunk: int = CPU_CHUNK, trace: bool = True):
        self.artifact = artifact
        self.device = resolve_device(device)
        # On CUDA a batch is one host-to-device copy and one model call, however large.
        self.chunk = cpu_chunk if self.device.type == "cpu" and cpu_chunk > 0 else None
        self.window = artifact.window
        self.n_features = artifact.profile.n_features
        self.preprocess = artifact.preprocessor().to(self.device).eval()
        self.model = artifact.model.to(self.device).eval()
        self.forward: torch.nn.Module = _WindowScorer(self.preprocess, self.model).eval()
        self.traced = False
        if trace:
            self._trace()
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
            if self.chunk is None or batch <= self.chunk:
                out = self.forward(x).cpu().numpy()
            else:
                out = torch.cat([self.forward(x[i:i + self.chunk]) for i in range(0, batch, self.chunk)]).numpy()
        return Scores(out[:, 0].copy(), out[:, 1:].copy())

    def _trace(self) -> None:
        """Swaps the eager model for a traced, frozen TorchScript graph when it gives the same scores.

        Why: eager PyTorch takes the GIL back after every operator, so while the event loop runs
        Python on the other core the inference thread queues for the GIL dozens of times per call.
        A graph takes it once. Measured with a busy Python thread beside it (default model, batches of
        256, 1 thread): 1,596 windows/s eager, 16,313 traced; alone 51,584 and 53,084. A model that
        cannot be traced, or whose traced scores differ on other batch sizes, stays eager.
        """
        generator = torch.Generator().manual_seed(0)
        shape = (self.window, self.n_features)
        try:
            with warnings.catch_warnings(), torch.inference_mode():
                warnings.simplefilter("ignore")  # tracer warnings; the result is checked below
                sample = torch.randn((8,) + shape, generator=generator).to(self.device)
                traced = torch.jit.freeze(torch.jit.trace(self.forward, sample, check_trace=False))
                for batch in (1, 3, 37):
                    check = torch.randn((batch,) + shape, generator=generator).to(self.device)
                    if not torch.allclose(traced(check), self.forward(check), rtol=1e-4, atol=1e-6):
                        raise ValueError(f"traced scores differ from the model's at batch {batch}")
        except Exception as exc:  # any model still serves, eagerly
            log.warning("model %s served eagerly, not traced: %s", self.artifact.version, exc)
            return
        self.forward, self.traced = traced, True


class _WindowScorer(torch.nn.Module):
    """Preprocessing and model in one module: (B, W, F) raw windows -> (B, 1 + F), each window's
    score then its per-feature errors."""

    def __init__(self, preprocess: torch.nn.Module, model: torch.nn.Module):
        super().__init__()
        self.preprocess = preprocess
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores, per_feature = self.model.anomaly_scores(self.preprocess(x))
        return torch.cat([scores.unsqueeze(1), per_feature], dim=1).float()
