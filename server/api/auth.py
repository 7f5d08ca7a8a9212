"""Bearer-key checks of the /v1 and /admin routes."""

from __future__ import annotations

import hmac
import ipaddress

from fastapi import Request

from server.api.errors import APIError


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _matches(given: str | None, expected: str) -> bool:
    return given is not None and hmac.compare_digest(given.encode(), expected.encode())


def _is_loopback(host: str | None) -> bool:
    try:
        return host is not None and ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


async def require_api_key(request: Request) -> None:
    expected = request.app.state.settings.api_key
    if expected and not _matches(_bearer(request), expected):
        raise APIError(401, "a valid API key is required (Authorization: Bearer <key>)",
                       "authentication_error", "invalid_api_key")  # fmt: skip


async def require_admin(request: Request) -> None:
    expected = request.app.state.settings.admin_key
    if expected:
        if not _matches(_bearer(request), expected):
            raise APIError(401, "a valid admin key is required (Authorization: Bearer <admin key>)",
                           "authentication_error", "invalid_admin_key")  # fmt: skip
    elif not _is_loopback(request.client.host if request.client else None):
        raise APIError(403, "no admin key is configured: admin routes accept loopback clients only",
                       "permission_error", "admin_loopback_only")  # fmt: skip
