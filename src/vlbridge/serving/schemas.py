"""The request bodies of POST /v1/chat/completions (OpenAI's schema plus vLLM's sampling extras) and
/v1/embeddings, and OpenAI-style errors. Responses are plain dicts in OpenAI's shapes (the `openai` client
parses them)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field


class ImageURL(BaseModel):
    url: str
    detail: str | None = None


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: ImageURL


Part = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[Part] | None = None


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatRequest(BaseModel):
    """Fields the server reads; others that clients send (logprobs, user, ...) are ignored, as vLLM does."""

    model_config = ConfigDict(extra="ignore")
    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)  # the older name of max_completion_tokens
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)  # 0: greedy; default 1 (sampling), as OpenAI
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, le=16)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    # vLLM's extras (the openai client sends them through extra_body)
    top_k: int | None = Field(None, ge=0)
    repetition_penalty: float | None = Field(None, gt=0)
    length_penalty: float | None = None
    use_beam_search: bool = False
    min_tokens: int = Field(0, ge=0)


class EmbeddingRequest(BaseModel):
    """POST /v1/embeddings: `input` is a string or a list of strings; a string that is a data: URL (or an
    http(s):// or file:// URL the server may read) is an image. dimensions and user are ignored."""

    model_config = ConfigDict(extra="ignore")
    model: str
    input: str | list[str] = Field(min_length=1)
    encoding_format: Literal["float", "base64"] = "float"


class RetrieveRequest(BaseModel):
    """POST /v1/retrieve: the images of the server's --index that best match `query`. rerank: how many ITC
    candidates ITM re-scores (0: ITC alone; default max(top_k, 16)); rule: how ITM and ITC combine
    (Blip2.retrieval_scores)."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    query: str = Field(min_length=1)
    top_k: int = Field(5, ge=1, le=100)
    rerank: int | None = Field(None, ge=0, le=256)
    rule: Literal["log_odds", "lavis"] = "log_odds"


class APIError(Exception):
    """An error answered as {"error": {"message", "type", "param", "code"}} with an HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        type: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.type = status, message, param, type
        self.headers = headers  # e.g. Retry-After on a 429

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.status}}
