"""Edgeway tracker: detects, tracks and re-identifies people across cameras (replaces SpotOn).

The computer-vision core is ``edgeway.tracker.vision`` (pure, no I/O); the service around it
(task lifecycle, storage, messaging) calls it from a worker thread.
"""
