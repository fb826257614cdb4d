"""Telemetry (the vehicle loggers' wire): uploads in, dashboards out, logger control and the
vehicle registry."""
