"""Offline training: events -> windows (the worker's own code) -> model, scaler and threshold."""

from __future__ import annotations

import inspect
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
from stream_detector.calibration import KeyNormal, KeyNormalConfig, default_blocks
from stream_detector.detector import FeatureWindows
from stream_detector.events import Event
from stream_detector.models import MODEL_KINDS, AnomalyModel, build_model
from stream_detector.drift import standardised_means
from stream_detector.preprocessing import Preprocessor, ScalerParams
from stream_detector.profiles import Profile
from stream_detector.scoring import configure_threads, resolve_device
from stream_detector.thresholds import fit_quantile_threshold

from .metrics import average_precision


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
                        labels: Sequence[int] | None = None, key_normal: KeyNormalConfig | None = None) -> WindowSet:
    """Replays events through the worker's feature windows, in the given (timestamp) order; with
    ``key_normal``, each key's windows are scaled by its own normal as the worker scales them."""
    normal = KeyNormal(profile.n_features, window, key_normal) if key_normal is not None and key_normal.enabled else None
    fw = FeatureWindows(profile, window, max_keys=max(len(events), 1), key_normal=normal)
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
        fw.copy_scaled(event.key, slot, out[n])
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


def windows_between(ws: WindowSet, events: Sequence[Event], since: float | None = None,
                    until: float | None = None) -> WindowSet:
    """The windows whose newest event's time is in [since, until) (either end open when None).
    Events before ``since`` have still been replayed: they warm each key's window and per-key state
    (a customer's mean amount, terminals, pace) up, so the first windows of the dates are as warm as
    the worker's would be, without training on windows that end before them."""
    if since is None and until is None:
        return ws
    t = np.array([events[i].timestamp for i in ws.event_index], dtype=np.float64)
    keep = np.ones(len(t), dtype=bool)
    if since is not None:
        keep &= t >= since
    if until is not None:
        keep &= t < until
    return WindowSet(ws.windows[keep], ws.key_index[keep], ws.event_index[keep], ws.label[keep],
                     ws.contaminated[keep], ws.keys)


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
    threshold_rule: str = "auto"  # auto: quantile (unsupervised) or f1 (supervised); or quantile, f1
    threshold_quantile: float = 0.999
    threshold_margin: float = 1.0
    max_train_windows: int = 200_000
    class_weight: str = "balanced"  # supervised: pos_weight = normal/anomalous ("balanced"), its sqrt, or 1 ("none")
    context_noise: float = 0.1
    model_options: dict[str, Any] = field(default_factory=dict)  # extra constructor arguments of the kind
    seed: int = 0
    device: str = "auto"
    threads: int = 0
    key_normal_blocks: int | None = None  # each key's own normal: warm-up in windows; None: the profile's default
    key_normal_options: dict[str, Any] = field(default_factory=dict)  # other KeyNormalConfig fields

    def key_normal(self, profile: Profile) -> KeyNormalConfig:
        blocks = default_blocks(profile.name) if self.key_normal_blocks is None else self.key_normal_blocks
        return KeyNormalConfig(blocks=blocks, **self.key_normal_options)

    @property
    def model_class(self) -> type[AnomalyModel]:
        try:
            return MODEL_KINDS[self.model]
        except KeyError:
            raise ValueError(f"unknown model {self.model!r}; known: {', '.join(sorted(MODEL_KINDS))}") from None

    def model_config(self, n_features: int, **fitted: Any) -> dict[str, Any]:
        """Constructor arguments: the common sizes the kind accepts, then ``fitted`` values (e.g.
        ``pos_weight`` from the label balance), then ``model_options`` (which win)."""
        params = inspect.signature(self.model_class.__init__).parameters
        common = {"n_features": n_features, "window": self.window, "hidden": self.hidden, "latent": self.latent,
                  "layers": self.layers, "score_steps": self.score_steps, **fitted}
        config = {k: v for k, v in common.items() if k in params}
        unknown = sorted(set(self.model_options) - set(params) - {"self"})
        if unknown:
            raise ValueError(f"{self.model} has no option(s) {', '.join(unknown)}; it takes: "
                             f"{', '.join(k for k in params if k not in ('self', 'n_features', 'window'))}")
        config.update(self.model_options)
        return config


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


def fit_f1_threshold(scores: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """The artifact's threshold record for a supervised model: the score that maximises F1 on
    held-out labelled windows (alerts are raised for scores strictly above it)."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels).astype(bool)
    finite = np.isfinite(scores)
    scores, labels = scores[finite], labels[finite]
    if labels.sum() == 0 or labels.all():
        raise ValueError("an F1 threshold needs held-out windows of both classes")
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], labels[order]
    tp = np.cumsum(y)
    fp = np.cumsum(~y)
    last = np.r_[s[1:] != s[:-1], True]  # the last of each run of equal scores: alert on all of them
    tp, fp, cut = tp[last], fp[last], s[last]
    f1 = 2 * tp / (tp + fp + labels.sum())
    best = int(np.argmax(f1))
    # Halfway to the next lower score, so "score > value" alerts exactly on the chosen set.
    below = cut[best + 1] if best + 1 < len(cut) else cut[best] - 1.0
    value = float((cut[best] + below) / 2.0)
    return {"method": "max_f1", "value": value, "f1": float(f1[best]),
            "precision": float(tp[best] / (tp[best] + fp[best])), "recall": float(tp[best] / labels.sum()),
            "fitted_on": int(len(scores)), "positives": int(labels.sum())}


def _batches(pre: Preprocessor, windows: np.ndarray, device: torch.device, batch: int = 4096):
    for i in range(0, len(windows), batch):
        yield pre(torch.from_numpy(windows[i:i + batch]).to(device))


def train_model(ws: WindowSet, profile: Profile, config: TrainConfig, progress: bool = True) -> TrainResult:
    """Fits scaler, model and threshold. Unsupervised kinds see normal windows only (no labelled
    event inside); supervised kinds see every window with the label of its newest event, the
    anomalies weighted by the class balance (``pos_weight`` = normal / anomalous training windows)."""
    started = time.perf_counter()
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    device = resolve_device(config.device)
    configure_threads(config.threads)
    cls = config.model_class
    supervised = cls.supervised

    normal = ~ws.contaminated
    usable = np.ones(len(ws.windows), bool) if supervised else normal
    train_mask, val_mask = split_by_key_time(ws, config.val_fraction)
    train_idx = np.flatnonzero(train_mask & usable)
    val_idx = np.flatnonzero(val_mask & usable)
    if len(train_idx) == 0:
        raise ValueError("no training windows: need more events per key than the window size")
    if supervised and ws.label[train_idx].sum() == 0:
        raise ValueError(f"{config.model} is supervised: the training data needs labelled anomalies "
                         "(--label-column)")
    if len(train_idx) > config.max_train_windows:
        if supervised:  # keep every anomaly, sub-sample the normal windows
            pos = train_idx[ws.label[train_idx] == 1]
            neg = train_idx[ws.label[train_idx] == 0]
            keep = max(config.max_train_windows - len(pos), 1)
            train_idx = np.sort(np.r_[pos, rng.choice(neg, min(keep, len(neg)), replace=False)])
        else:
            train_idx = np.sort(rng.choice(train_idx, config.max_train_windows, replace=False))
    if len(val_idx) == 0:  # tiny data: judge the threshold on training windows
        val_idx = train_idx
    train_x, val_x = ws.windows[train_idx], ws.windows[val_idx]
    train_y, val_y = ws.label[train_idx], ws.label[val_idx]
    normal_train_x = ws.windows[train_idx[normal[train_idx]]]
    if len(normal_train_x) == 0:
        raise ValueError("no normal training windows")

    fitted: dict[str, Any] = {}
    if supervised:
        n_pos = int(train_y.sum())
        ratio = (len(train_y) - n_pos) / n_pos
        weights = {"balanced": ratio, "sqrt": math.sqrt(ratio), "none": 1.0}
        if config.class_weight not in weights:
            raise ValueError(f"unknown class weight {config.class_weight!r}; known: {', '.join(weights)}")
        fitted["pos_weight"] = round(float(weights[config.class_weight]), 4)
    scaler = ScalerParams.fit(normal_train_x.reshape(-1, profile.n_features))
    model = build_model(config.model, config.model_config(profile.n_features, **fitted)).to(device)
    pre = Preprocessor(scaler).to(device)
    optimizers = model.configure_optimizers(config.learning_rate)
    schedulers = [torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=max(config.patience // 2, 1))
                  for opt in optimizers]
    generator = torch.Generator(device=device).manual_seed(config.seed)
    noise = config.context_noise if model.denoising else 0.0
    rank_val = supervised and 0 < val_y.sum() < len(val_y)

    train_t = torch.from_numpy(train_x)
    val_t = torch.from_numpy(val_x)
    train_labels = torch.from_numpy(train_y.astype(np.float32)) if supervised else None
    val_labels = torch.from_numpy(val_y.astype(np.float32)) if supervised else None
    best_val, best_state, best_epoch, history = math.inf, None, 0, []
    bar = tqdm(range(config.epochs), desc=f"training {config.model}", unit="epoch", disable=not progress)
    for epoch in bar:
        model.train()
        perm = torch.randperm(len(train_t), generator=torch.Generator().manual_seed(config.seed + epoch))
        totals: dict[str, float] = defaultdict(float)
        batches = 0
        for i in range(0, len(perm), config.batch_size):
            idx = perm[i:i + config.batch_size]
            x = pre(train_t[idx].to(device))
            labels = train_labels[idx].to(device) if train_labels is not None else None
            step = model.training_step(_with_context_noise(x, noise, generator), x, labels, optimizers)
            for name, value in step.items():
                totals[name] += value
            batches += 1
        model.eval()
        extra: dict[str, float] = {}
        with torch.inference_mode():
            parts, ranked = [], []
            for i in range(0, len(val_t), 4096):
                x = pre(val_t[i:i + 4096].to(device))
                labels = val_labels[i:i + 4096].to(device) if val_labels is not None else None
                parts.append(float(model.validation_loss(x, labels)))
                if rank_val:
                    ranked.append(model.window_scores(x).float().cpu().numpy())
            val_loss = float(np.mean(parts))
        if rank_val:
            # Supervised: stop on what matters, the ranking of held-out anomalies (average
            # precision), rather than on the class-weighted loss.
            extra = {"val_weighted_loss": val_loss, "val_average_precision": average_precision(val_y, np.concatenate(ranked))}
            val_loss = 1.0 - extra["val_average_precision"]
        for scheduler in schedulers:
            scheduler.step(val_loss)
        train_loss = totals["loss"] / max(batches, 1)
        record = {"epoch": epoch + 1, "train_loss": train_loss, "val_loss": val_loss, **extra}
        record.update({k: v / max(batches, 1) for k, v in totals.items() if k != "loss"})
        history.append(record)
        bar.set_postfix(train=f"{train_loss:.4f}", val=f"{val_loss:.4f}")
        if val_loss < best_val - 1e-6:
            best_val, best_epoch = val_loss, epoch + 1
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        elif epoch + 1 - best_epoch >= config.patience:
            break
    bar.close()
    if best_state is not None:
        model.load_state_dict(best_state)

    # Score units from normal training windows (e.g. each feature's error in units of its typical
    # training error), then the threshold on held-out windows.
    model.eval()
    calibration = model.calibrate(_batches(pre, normal_train_x, device))
    val_scores, _ = score_windows(model, scaler, val_x, device)
    rule = config.threshold_rule
    if rule == "auto":
        rule = "f1" if supervised and 0 < val_y.sum() < len(val_y) else "quantile"
    if rule == "f1":
        threshold = fit_f1_threshold(val_scores, val_y)
    elif rule == "quantile":
        held_out_normal = val_scores[~ws.contaminated[val_idx]] if supervised else val_scores
        threshold = fit_quantile_threshold(held_out_normal if len(held_out_normal) else val_scores,
                                           config.threshold_quantile, config.threshold_margin)
    else:
        raise ValueError(f"unknown threshold rule {config.threshold_rule!r}; known: auto, quantile, f1")
    threshold["fitted_on_split"] = "held-out training windows (the latest val_fraction of each key's windows)"
    model = model.cpu().eval()
    metrics = {
        "model": config.model,
        "supervised": supervised,
        "train_windows": int(len(train_idx)),
        "train_anomalies": int(train_y.sum()) if supervised else 0,
        "val_windows": int(len(val_idx)),
        "excluded_labelled_windows": 0 if supervised else int((~usable).sum()),
        "keys": len(ws.keys),
        "epochs_run": len(history),
        "best_epoch": best_epoch,
        "best_val_loss": best_val,
        "early_stopping": "1 - average precision on held-out windows" if rank_val else "held-out loss",
        "history": history,
        "calibration": calibration,
        "val_score_quantiles": {str(q): float(np.quantile(val_scores, q)) for q in (0.5, 0.9, 0.99, 0.999)},
        # The worker's drift reference: each feature's mean standardised value on the newest row of the
        # normal training windows (stream_detector.drift).
        "standardised_means": [round(float(v), 6) for v in standardised_means(normal_train_x, scaler)],
        "seconds": round(time.perf_counter() - started, 2),
        "device": str(device),
        "config": asdict(config),
    }
    return TrainResult(model, scaler, threshold, metrics)


def train_and_save(events: Sequence[Event], profile: Profile, config: TrainConfig, model_dir: str | Path,
                   labels: Sequence[int] | None = None, progress: bool = True,
                   data_description: dict[str, Any] | None = None,
                   signing_key: bytes | None = None, train_from: float | None = None,
                   train_until: float | None = None) -> tuple[Path, TrainResult]:
    """Windows of ``events`` (in timestamp order) -> trained artifact. With ``train_from`` /
    ``train_until``, only windows whose newest event is in [train_from, train_until) are fitted;
    earlier events only warm windows and per-key state up (:func:`windows_between`)."""
    key_normal = config.key_normal(profile)
    ws = windows_from_events(events, profile, config.window, labels, key_normal)
    ws = windows_between(ws, events, train_from, train_until)
    result = train_model(ws, profile, config, progress=progress)
    training = dict(result.metrics)
    training["key_normal"] = key_normal.to_dict()
    if data_description:
        training["data"] = data_description
    path = save_artifact(model_dir, result.model, profile, result.scaler, result.threshold, training,
                         signing_key=signing_key)
    return path, result
