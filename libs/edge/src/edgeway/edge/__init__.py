"""Edgeway on the edge: producers that run on vehicles and devices."""
