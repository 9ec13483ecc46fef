"""The OpenAI-compatible HTTP server: schemas, response shapes, routes, metrics, runner."""
