"""Offline training: events -> windows (the worker's own code) -> model, scaler and threshold."""

from __future__ import annotations

import math
import time
from collections import defaultdict, deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from tqdm import tqdm

from stream_detector.artifacts import save_artifact
from stream_detector.detector import FeatureWindows
from stream_detector.events import Event
from stream_detector.models import AnomalyModel, build_model
from stream_detector.preprocessing import Preprocessor, ScalerParams
from stream_detector.profiles import Profile
from stream_detector.scoring import configure_threads, resolve_device
from stream_detector.thresholds import fit_quantile_threshold


@dataclass
class WindowSet:
    """Every full window of a replay, one per event that completed it."""

    windows: np.ndarray  # (N, W, F) raw features
    key_index: np.ndarray  # (N,) index into keys
    event_index: np.ndarray  # (N,) index of the window's last event in the input order
    label: np.ndarray  # (N,) label of the window's last event (0 when unlabelled)
    contaminated: np.ndarray  # (N,) any labelled event inside the window
    keys: list[str]


def windows_from_events(events: Sequence[Event], profile: Profile, window: int,
                        labels: Sequence[int] | None = None) -> WindowSet:
    """Replays events through the worker's feature windows, in the given (timestamp) order."""
    fw = FeatureWindows(profile, window, max_keys=max(len(events), 1))
    out = np.zeros((len(events), window, profile.n_features), dtype=np.float32)
    key_ids: dict[str, int] = {}
    recent_labels: dict[str, deque[int]] = defaultdict(lambda: deque(maxlen=window))
    key_index, event_index, label, contaminated = [], [], [], []
    n = 0
    for i, event in enumerate(events):
        lab = int(labels[i]) if labels is not None else 0
        history = recent_labels[event.key]
        history.append(lab)
        slot = fw.add(event, 0.0)
        if slot is None:
            continue
        fw.store.copy_window(slot, out[n])
        key_index.append(key_ids.setdefault(event.key, len(key_ids)))
        event_index.append(i)
        label.append(lab)
        contaminated.append(any(history))
        n += 1
    keys = [None] * len(key_ids)
    for k, v in key_ids.items():
        keys[v] = k
    return WindowSet(out[:n], np.asarray(key_index, np.int64), np.asarray(event_index, np.int64),
                     np.asarray(label, np.int64), np.asarray(contaminated, bool), keys)


@dataclass
class TrainConfig:
    model: str = "lstm_ae"
    window: int = 32
    hidden: int = 64
    latent: int = 32
    layers: int = 1
    score_steps: int = 1
    epochs: int = 40
    batch_size: int = 128
    learning_rate: float = 2e-3
    patience: int = 4
    val_fraction: float = 0.2
    threshold_quantile: float = 0.999
    threshold_margin: float = 1.0
    max_train_windows: int = 200_000
    context_noise: float = 0.1
    seed: int = 0
    device: str = "auto"
    threads: int = 0

    def model_config(self, n_features: int) -> dict[str, Any]:
        if self.model == "lstm_ae":
            return {"n_features": n_features, "window": self.window, "hidden": self.hidden, "latent": self.latent,
                    "layers": self.layers, "score_steps": self.score_steps}
        raise ValueError(f"unknown model {self.model!r}")


@dataclass
class TrainResult:
    model: AnomalyModel
    scaler: ScalerParams
    threshold: dict[str, Any]
    metrics: dict[str, Any] = field(default_factory=dict)


def split_by_key_time(ws: WindowSet, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Per key, the latest ``val_fraction`` of its windows are held out: no look-ahead."""
    train_mask = np.ones(len(ws.windows), dtype=bool)
    if val_fraction <= 0:
        return train_mask, ~train_mask
    order = np.argsort(ws.key_index, kind="stable")  # windows are already in time order per key
    keys, starts, counts = np.unique(ws.key_index[order], return_index=True, return_counts=True)
    for start, count in zip(starts, counts):
        n_val = int(math.floor(count * val_fraction))
        if n_val and count - n_val >= 1:
            train_mask[order[start + count - n_val: start + count]] = False
    return train_mask, ~train_mask


def score_windows(model: AnomalyModel, scaler: ScalerParams, windows: np.ndarray, device: torch.device,
                  batch: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    pre = Preprocessor(scaler).to(device)
    model.eval()
    scores, features = [], []
    with torch.inference_mode():
        for i in range(0, len(windows), batch):
            x = pre(torch.from_numpy(windows[i:i + batch]).to(device))
            s, f = model.anomaly_scores(x)
            scores.append(s.cpu().numpy())
            features.append(f.cpu().numpy())
    if not scores:
        return np.zeros(0, np.float32), np.zeros((0, model.n_features), np.float32)
    return np.concatenate(scores), np.concatenate(features)


def raw_feature_errors(model: AnomalyModel, scaler: ScalerParams, windows: np.ndarray, device: torch.device,
                       batch: int = 4096) -> np.ndarray:
    pre = Preprocessor(scaler).to(device)
    model.eval()
    out = []
    with torch.inference_mode():
        for i in range(0, len(windows), batch):
            out.append(model.raw_feature_errors(pre(torch.from_numpy(windows[i:i + batch]).to(device))).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, model.n_features), np.float32)


def _with_context_noise(x: torch.Tensor, rate: float, generator: torch.Generator) -> torch.Tensor:
    """Corrupts a random segment of some windows; the model is trained to give back the clean window.

    A denoising autoencoder learns what normal looks like rather than an identity map: it does not
    reproduce an anomalous newest event (so the anomaly scores high), and a corrupted context does
    not spoil its reconstruction of a normal newest event (so one incident does not keep alerting
    on the normal events after it). Corruptions look like real faults: a run of 1 to W/4 steps in
    which a few features are offset by 2 to 6 (scaled units).
    """
    if rate <= 0:
        return x
    batch, window, features = x.shape
    dev = x.device
    hit = torch.rand(batch, generator=generator, device=dev) < min(rate * 5.0, 1.0)
    max_len = max(window // 4, 1)
    length = torch.randint(1, max_len + 1, (batch,), generator=generator, device=dev)
    # Half the segments end in the last few steps: the cases that matter most are an anomaly that
    # covers the newest event (must score high) and one that has just ended (must not).
    end_anywhere = length + (torch.rand(batch, generator=generator, device=dev) * (window - length + 1)).long()
    end_late = window - torch.randint(0, min(4, window), (batch,), generator=generator, device=dev)
    late = torch.rand(batch, generator=generator, device=dev) < 0.5
    end = torch.where(late, torch.maximum(end_late, length), end_anywhere)
    start = end - length
    steps = torch.arange(window, device=dev).unsqueeze(0)
    in_segment = (steps >= start.unsqueeze(1)) & (steps < (start + length).unsqueeze(1)) & hit.unsqueeze(1)
    channels = torch.rand(batch, features, generator=generator, device=dev) < 0.3
    magnitude = (torch.rand(batch, features, generator=generator, device=dev) * 4.0 + 2.0) \
        * torch.where(torch.rand(batch, features, generator=generator, device=dev) < 0.5, -1.0, 1.0)
    offset = (channels * magnitude).unsqueeze(1) * in_segment.unsqueeze(2)
    return x + offset


def train_model(ws: WindowSet, profile: Profile, config: TrainConfig, progress: bool = True) -> TrainResult:
    started = time.perf_counter()
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    device = resolve_device(config.device)
    configure_threads(config.threads)

    usable = ~ws.contaminated  # unsupervised: fit normal behaviour only
    train_mask, val_mask = split_by_key_time(ws, config.val_fraction)
    train_idx = np.flatnonzero(train_mask & usable)
    val_idx = np.flatnonzero(val_mask & usable)
    if len(train_idx) == 0:
        raise ValueError("no training windows: need more events per key than the window size")
    if len(train_idx) > config.max_train_windows:
        train_idx = np.sort(rng.choice(train_idx, config.max_train_windows, replace=False))
    if len(val_idx) == 0:  # tiny data: judge the threshold on training windows
        val_idx = train_idx
    train_x, val_x = ws.windows[train_idx], ws.windows[val_idx]

    scaler = ScalerParams.fit(train_x.reshape(-1, profile.n_features))
    model = build_model(config.model, config.model_config(profile.n_features)).to(device)
    pre = Preprocessor(scaler).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.5, patience=max(config.patience // 2, 1))
    generator = torch.Generator(device=device).manual_seed(config.seed)

    train_t = torch.from_numpy(train_x)
    val_t = torch.from_numpy(val_x)
    best_val, best_state, best_epoch, history = math.inf, None, 0, []
    bar = tqdm(range(config.epochs), desc=f"training {config.model}", unit="epoch", disable=not progress)
    for epoch in bar:
        model.train()
        perm = torch.randperm(len(train_t), generator=torch.Generator().manual_seed(config.seed + epoch))
        total, batches = 0.0, 0
        for i in range(0, len(perm), config.batch_size):
            x = pre(train_t[perm[i:i + config.batch_size]].to(device))
            loss = model.training_loss(_with_context_noise(x, config.context_noise, generator), x)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            optimizer.step()
            total += float(loss.detach())
            batches += 1
        model.eval()
        with torch.inference_mode():
            val_loss = float(np.mean([float(model.training_loss(pre(val_t[i:i + 4096].to(device))))
                                      for i in range(0, len(val_t), 4096)]))
        scheduler.step(val_loss)
        history.append({"epoch": epoch + 1, "train_loss": total / max(batches, 1), "val_loss": val_loss})
        bar.set_postfix(train=f"{total / max(batches, 1):.4f}", val=f"{val_loss:.4f}")
        if val_loss < best_val - 1e-6:
            best_val, best_epoch = val_loss, epoch + 1
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        elif epoch + 1 - best_epoch >= config.patience:
            break
    bar.close()
    if best_state is not None:
        model.load_state_dict(best_state)

    # Feature errors in units of their typical training error, then the threshold on held-out windows.
    raw = raw_feature_errors(model, scaler, train_x, device)
    model.error_scale.copy_(torch.from_numpy(np.maximum(raw.mean(axis=0), 1e-6)).to(device))
    val_scores, _ = score_windows(model, scaler, val_x, device)
    threshold = fit_quantile_threshold(val_scores, config.threshold_quantile, config.threshold_margin)
    model = model.cpu().eval()
    metrics = {
        "train_windows": int(len(train_idx)),
        "val_windows": int(len(val_idx)),
        "excluded_labelled_windows": int((~usable).sum()),
        "keys": len(ws.keys),
        "epochs_run": len(history),
        "best_epoch": best_epoch,
        "best_val_loss": best_val,
        "history": history,
        "val_score_quantiles": {str(q): float(np.quantile(val_scores, q)) for q in (0.5, 0.9, 0.99, 0.999)},
        "seconds": round(time.perf_counter() - started, 2),
        "device": str(device),
        "config": asdict(config),
    }
    return TrainResult(model, scaler, threshold, metrics)


def train_and_save(events: Sequence[Event], profile: Profile, config: TrainConfig, model_dir: str | Path,
                   labels: Sequence[int] | None = None, progress: bool = True,
                   data_description: dict[str, Any] | None = None) -> tuple[Path, TrainResult]:
    ws = windows_from_events(events, profile, config.window, labels)
    result = train_model(ws, profile, config, progress=progress)
    training = dict(result.metrics)
    if data_description:
        training["data"] = data_description
    path = save_artifact(model_dir, result.model, profile, result.scaler, result.threshold, training)
    return path, result
