#!/usr/bin/env python
"""The real worker with its scoring step swapped, for ``benchmarks/throughput.py`` only.

    STREAM_DETECTOR_...=... python benchmarks/variant_worker.py hst

Runs :func:`stream_detector.worker.run_worker` unchanged (same Faust app, decoding, windows,
thresholds, alert lifecycle, publishing, changelog and metrics); only ``Detector.score`` is
replaced, so a variant costs exactly what its scoring costs in the product's frame. The product
code has no hook for this: the benchmark substitutes ``DetectorService`` in the worker module.

Variants:

- ``hst``: a River ``MinMaxScaler | HalfSpaceTrees`` pipeline per key (River's defaults: 10
  trees, height 8, window 250), scoring then learning each event's newest feature row, one event
  at a time: what users of online-learning libraries typically run instead of a batched model.
- ``full-decoder``: the default LSTM autoencoder decoding the whole window (32 decoder steps), as
  the model did before the newest-steps-only decoder: the "before" of that change, end to end.
- ``faust-ceiling``: a Faust agent on the same topic that only counts the events it takes (same
  adaptive batches, no decoding, no model, nothing produced): the ceiling Faust itself sets for
  any worker built on it on this machine.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import stream_detector.worker as worker_module  # noqa: E402
from stream_detector.scoring import Scores  # noqa: E402
from stream_detector.settings import Settings  # noqa: E402


def hst_scorer(detector):
    """``Detector.score`` replacement: one River pipeline per key, event by event."""
    from river import anomaly, compose, preprocessing

    names = list(detector.profile.feature_names)
    n_features = len(names)
    models: dict[str, object] = {}

    def new_model():
        return compose.Pipeline(preprocessing.MinMaxScaler(),
                                anomaly.HalfSpaceTrees(n_trees=10, height=8, window_size=250, seed=len(models)))

    def score(batch) -> Scores:
        n = len(batch)
        scores = np.zeros(n, dtype=np.float32)
        newest = batch.windows[:, -1, :].tolist()
        for i, event in enumerate(batch.events):
            model = models.get(event.key)
            if model is None:
                model = models[event.key] = new_model()
            x = dict(zip(names, newest[i]))
            scores[i] = model.score_one(x)
            model.learn_one(x)
        return Scores(scores, np.zeros((n, n_features), dtype=np.float32))

    return score


def full_decoder_scorer(service):
    """``Detector.score`` replacement: the LSTM autoencoder's full-window decoding path."""
    import torch

    from stream_detector.models.base import newest_steps_error

    runner = service.runner
    model, preprocess = runner.model, runner.preprocess

    def score(batch) -> Scores:
        windows = batch.windows
        if len(windows) == 0:
            return runner.score(windows)
        with runner._lock, torch.inference_mode():
            x = preprocess(torch.from_numpy(np.ascontiguousarray(windows, dtype=np.float32)))
            per_feature = newest_steps_error(model(x), x, model.score_steps) / model.error_scale
            out = torch.cat([per_feature.mean(dim=1, keepdim=True), per_feature], dim=1).numpy()
        return Scores(out[:, 0].copy(), out[:, 1:].copy())

    return score


def ceiling_app(settings: Settings, service, input_partitions: int = 1):
    """The worker's Faust app with an agent that takes batches and counts them, nothing else."""
    from stream_detector.batching import adaptive_batches
    from stream_detector.kafka import faust_fastpath
    from stream_detector.kafka.faust_app import DetectorApp

    class CeilingTransport(faust_fastpath.Transport):
        # The fast delivery loop and the fetch wait, but Faust's producer (and, below, its monitor):
        # the ceiling as it has always been measured, Faust's per-event work included.
        Consumer = faust_fastpath.FastConsumer

    class CeilingApp(DetectorApp):
        def _new_transport(self):
            if settings.consumer_fast_path:
                return CeilingTransport(self.conf.broker_consumer, self)
            return super()._new_transport()

    app = CeilingApp(settings.consumer_group, broker=worker_module._broker_url(settings.bootstrap_servers),
                     autodiscover=False, store="memory://", web_enabled=False, value_serializer="raw",
                     key_serializer="raw", consumer_auto_offset_reset=settings.auto_offset_reset,
                     broker_commit_interval=1.0, stream_buffer_maxsize=settings.stream_buffer_max, loghandlers=[],
                     consumer_fast_path=False,  # keeps Faust's monitor and producer buffer
                     consumer_fetch_max_wait_ms=settings.fetch_max_wait_ms)
    # run_worker creates the changelog topic of the worker's window table before the app starts: the
    # table is declared (never written), as the worker declares it.
    app.Table("windows", partitions=input_partitions, key_type=bytes, value_type=bytes)
    source = app.topic(settings.input_topic, key_serializer="raw", value_serializer="raw")
    consumed = service.metrics.events_consumed

    @app.agent(source, concurrency=1)
    async def count(stream):
        async for events in adaptive_batches(stream, settings.batch_max, settings.batch_within_s):
            consumed.inc(len(events))

    return app


VARIANTS = ("hst", "full-decoder", "faust-ceiling")


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0] not in VARIANTS:
        print("usage: variant_worker.py " + "|".join(VARIANTS), file=sys.stderr)
        return 2
    variant = argv[0]
    if variant == "faust-ceiling":
        worker_module.create_app = ceiling_app
        worker_module.run_worker(Settings.load())
        return 0
    class VariantService(worker_module.DetectorService):
        def __init__(self, settings: Settings, metrics=None):
            super().__init__(settings, metrics)
            if variant == "hst":
                self.detector.score = hst_scorer(self.detector)
            else:
                self.detector.score = full_decoder_scorer(self)

    worker_module.DetectorService = VariantService
    worker_module.run_worker(Settings.load())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
