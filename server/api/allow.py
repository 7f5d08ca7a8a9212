"""The Allow header of a 405 answer: every method the path serves.

Starlette's router answers a method no route of the path takes with the methods of the first route
whose path matched, so `POST /admin/personas/x` listed only `PUT` where `GET` and `DELETE` serve
the path too. RFC 9110 (15.5.6) asks for the target resource's whole list.
"""

from __future__ import annotations

from fastapi import Request
from starlette.routing import Match, Route


def allowed_methods(request: Request) -> list[str]:
    """The methods the routes of this request's path serve, sorted (empty when no route's path matches)."""
    methods: set[str] = set()
    for route in request.app.router.routes:
        if isinstance(route, Route) and route.methods:
            match, _ = route.matches(request.scope)
            if match is not Match.NONE:
                methods |= route.methods
    return sorted(methods)


def allow_header(request: Request, headers: dict[str, str] | None) -> dict[str, str] | None:
    """``headers`` of a 405 with Allow naming every method of the path (a mounted app's own Allow,
    as the static files give, is kept when no route of ours serves the path)."""
    methods = allowed_methods(request)
    if not methods:
        return headers
    return {**(headers or {}), "Allow": ", ".join(methods)}
