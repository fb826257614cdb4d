"""The system's readiness: each service instance's, from the reports it publishes
(`edgeway.common.readiness`), and this gateway's own."""
