"""Multi-container variants: serial pipelines and direct invocation of one step.

``steps`` holds the three kinds of step (an in-process model, a Python
handler, a container on another port of the pod), ``runner`` chains them
(pure orchestration over the ``Step`` interface), ``app`` serves the result.
"""
