"""OpenAI-shaped errors: one exception type the whole frontend raises, one body shape it returns.

Body: ``{"error": {"message": str, "type": str, "param": str | None, "code": int | str | None}}``.
"""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse

# HTTP status -> OpenAI error type (what official clients map to exception classes).
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    408: "timeout_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable_error",
    504: "timeout_error",
}


class APIError(Exception):
    """An error to answer the HTTP client with; ``status`` is the HTTP status."""

    def __init__(self, status: int, message: str, type: str | None = None, param: str | None = None,
                 code: int | str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or _TYPES.get(status, "internal_error" if status >= 500 else "invalid_request_error")
        self.param = param
        self.code = code if code is not None else status

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param)


def unavailable(message: str) -> APIError:
    return APIError(503, message)


def from_worker(code: int, type: str, message: str, param: str | None = None) -> APIError:
    """Pass a worker's ErrorReply through: its code is already the HTTP status to answer with."""
    status = code if 400 <= code <= 599 else 500
    return APIError(status, message, type=type or None, param=param)
