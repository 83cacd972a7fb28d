"""`vlbridge serve`: any saved vlbridge model behind OpenAI's chat completions API (FastAPI + uvicorn, the
`serve` extra). schemas: the request bodies and errors; images: where a request's images may come from;
chat: messages -> prompt (a whole conversation for in-context models); engine: batched generation,
streamed or not; batcher: the dynamic batcher; index: search over an image folder (--index); metrics:
/metrics; app: the routes; page: the web page at /."""

from vlbridge.serving.app import create_app, serve

__all__ = ["create_app", "serve"]
