"""Tracking (SpotOn's wire): environments and processing tasks, their live tracks, and edge
devices' detections."""
