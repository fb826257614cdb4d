"""Edgeway video relay."""
