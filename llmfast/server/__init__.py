"""`llmfast serve`: an OpenAI-compatible HTTP server (app.py) over one async engine loop (async_engine.py);
the wire format lives in protocol.py. Needs ``fastapi`` and ``uvicorn``."""
from llmfast.server.app import build_app, serve

__all__ = ["build_app", "serve"]
