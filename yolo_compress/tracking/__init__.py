"""MLflow tracking: one run per stage, and a buffer that survives a tracking-server outage."""
