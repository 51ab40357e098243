"""ollama-metrics: a transparent proxy for Ollama with Prometheus metrics."""

__version__ = "0.1.0"
