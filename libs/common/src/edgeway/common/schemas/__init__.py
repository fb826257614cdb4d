"""Message schemas shared by the gateway (edge checks) and the services (processing)."""
