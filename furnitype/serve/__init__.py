"""``furnitype serve``: the HTTP API and web page over a run's model and a catalogue of feature rows.

``create_app`` (``app.py``) makes the Starlette application (any ASGI server can mount it); ``serve``
(``server.py``) runs it with uvicorn on a socket it binds itself. Photos of concurrent requests go through the
network together (``batcher.py``); the catalogue follows its feature store (``catalogue.py``).
"""

from furnitype.serve.app import create_app
from furnitype.serve.server import serve

__all__ = ["create_app", "serve"]
