"""API-key check for generation routes, as TGI's auth middleware does it.

Owns: the before_request hook that answers a bare 401 (no body, like TGI) when --api-key is set and
the Authorization header is not "Bearer <key>" (compared case-insensitively, as TGI does).
Must not: guard /health, /info, /metrics, /v1/models or /chat_tokenize (TGI leaves them open).
"""

from __future__ import annotations

import hmac

from litestar import Request, Response


async def require_api_key(request: Request) -> Response | None:
    key = request.app.state.services.settings.api_key
    if not key:
        return None
    given = request.headers.get("authorization", "")
    if hmac.compare_digest(given.lower().encode(), f"bearer {key}".lower().encode()):
        return None
    return Response(content=b"", status_code=401, media_type="text/plain")
