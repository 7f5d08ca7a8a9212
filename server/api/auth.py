"""Bearer-key checks of the /v1, /admin and /metrics routes, and the loopback rule of /admin."""

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


# Headers a proxy uses to name the client it forwards for.
FORWARDING_HEADERS = ("x-forwarded-for", "forwarded", "x-real-ip")


def _is_local(request: Request) -> bool:
    """The request comes straight from this machine: a loopback peer, through no proxy.

    uvicorn rewrites ``request.client`` from X-Forwarded-For (when its peer is in
    FORWARDED_ALLOW_IPS) and from nothing else, so with no forwarding header it is the socket's
    peer. Any forwarding header means a proxy, perhaps on this very machine, stands between: its
    loopback address says nothing of the client, and the header can be forged. Proxy headers may
    name clients in logs; they never grant access.
    """
    if any(name in request.headers for name in FORWARDING_HEADERS):
        return False
    host = request.client.host if request.client else None
    try:
        return host is not None and ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


async def require_api_key(request: Request) -> None:
    expected = request.app.state.settings.api_key
    if expected and not _matches(_bearer(request), expected):
        raise APIError(
            401,
            "a valid API key is required (Authorization: Bearer <key>)",
            "authentication_error",
            "invalid_api_key",
        )


async def require_admin(request: Request) -> None:
    expected = request.app.state.settings.admin_key
    if expected:
        if not _matches(_bearer(request), expected):
            raise APIError(
                401,
                "a valid admin key is required (Authorization: Bearer <admin key>)",
                "authentication_error",
                "invalid_admin_key",
            )
    elif not _is_local(request):
        raise APIError(
            403,
            "no admin key is configured: admin routes accept only clients on this "
            "machine that come through no proxy (no X-Forwarded-For, Forwarded or X-Real-IP)",
            "permission_error",
            "admin_loopback_only",
        )


async def require_metrics_key(request: Request) -> None:
    expected = request.app.state.settings.metrics_key
    if expected and not _matches(_bearer(request), expected):
        raise APIError(
            401,
            "a valid metrics key is required (Authorization: Bearer <metrics key>)",
            "authentication_error",
            "invalid_metrics_key",
        )
