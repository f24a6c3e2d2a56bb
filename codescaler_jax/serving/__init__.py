"""HTTP reward serving: request protocol (OpenRLHF remote RM and native), dynamic batching,
the reward service and its standard-library HTTP server. Entry point: ``codescaler_jax.serve``."""
