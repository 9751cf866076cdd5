"""The worker's batch lifecycle, free of Faust: pipeline, checkpoint (settler), state and failures.

:mod:`stream_detector.worker` only wires these to Faust's stream, consumer and table.
"""
