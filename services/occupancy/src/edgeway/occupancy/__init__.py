"""Edgeway occupancy: camera-model frame results to per-location occupancy, stored and broadcast."""
