"""`vlbridge serve`: any saved vlbridge model behind OpenAI's chat completions API (FastAPI + uvicorn, the
`serve` extra). schemas: the request body and errors; engine: request -> prompt -> generate, batched or
streamed; app: the routes and the dynamic batcher."""

from vlbridge.serving.app import create_app, serve

__all__ = ["create_app", "serve"]
