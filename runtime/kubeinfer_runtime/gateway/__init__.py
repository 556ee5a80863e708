"""The gateway role: SageMaker Runtime API front door for real-time endpoints.

``app.create_app`` is the uvicorn factory. The request path is
``proxy`` (raw ASGI) -> ``routing`` (variant and upstream, pure) ->
``upstream`` (pooled HTTP/1.1 to the model servers); ``routefile`` and
``health`` hold the pure state the background ``loops`` keep up to date.
"""
