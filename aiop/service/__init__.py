"""The predictor as an HTTP service, and its client."""
