"""Edgeway's gateway: the only public surface (HTTP and WebSocket).

It authenticates, checks size and shape at the edge, publishes to the ingress exchanges and fans
results out to clients. It holds no business logic and never reads a service's database.
"""
