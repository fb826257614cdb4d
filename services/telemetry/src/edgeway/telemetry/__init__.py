"""Edgeway telemetry: vehicle records reconstructed per vehicle, stored with COPY and broadcast."""
