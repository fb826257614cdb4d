"""Root conftest: the shared fixtures for real brokers and databases."""

pytest_plugins = ["edgeway.common.testing.plugin"]
