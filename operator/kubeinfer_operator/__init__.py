"""kubeinfer control plane: the Endpoint API, renderers, the kopf operator and local mode."""

__version__ = "0.1.0"
