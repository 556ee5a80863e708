"""kubeinfer data plane: one runtime image playing the model-server and gateway roles."""

__version__ = "0.1.0"
