"""Occupancy (Project Omega's wire): camera models in, occupancy clients out."""
