"""The web page at `/`: plain HTML, CSS and JavaScript from static/, no build step and no outside request.
The page talks to the same server through /v1/models and a streamed /v1/chat/completions, as any client."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC = Path(__file__).parent / "static"


def add_page(app: FastAPI) -> None:
    """Serve static/index.html at `/` and its script and style under /static/."""

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
