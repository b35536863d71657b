"""Memory estimator, per-step timing report, collective-divergence detector, environment report."""
