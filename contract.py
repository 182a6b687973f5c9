"""The OpenAPI document: what FastAPI derives from the routes, completed with what it cannot
see, so that a client generated from /openapi.json handles every answer the service gives.

Every operation documents, besides its success and its own errors (`routes.answers`):
- 401 when it needs credentials (and 403 on the dashboard, where roles apply); 503 when it
  uses the database (and for the JWKS on the dashboard); 429 always (every caller has a
  rate limit: its key, its user, or its address);
- 422 when it takes parameters or a body; 400 and 415 when it takes a body; 413 always
  (the body limit applies to every request, whatever its route);
- every error as application/problem+json (`Problem`, and `ValidationProblem` for 422), and
  X-Request-ID on every answer, WWW-Authenticate on 401, Retry-After on 429 and 503, and
  RateLimit / RateLimit-Policy on 429.
"""

from typing import Any

from fastapi import FastAPI
from fastapi.dependencies.models import Dependant
from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute, RouteContext, iter_route_contexts

from auth import BOT_KEY_SCHEME, bot_caller
from db import get_session
from models import Problem, ValidationProblem, VerificationBatch

DESCRIPTIONS = {
    400: "The body is not valid JSON",
    401: "Missing or invalid credentials",
    403: "Authenticated, but not allowed (not staff, or the role is too low)",
    404: "Not found",
    409: "Conflicts with the current state",
    412: "If-Match names a version that is not current",
    413: "The body is too large",
    415: "The body is not application/json",
    422: "Invalid input; `errors` names each one",
    429: "Too many requests; retry after Retry-After",
    503: "The database (or the token signing keys) is unavailable; retry after Retry-After",
}
HEADERS = {
    "X-Request-ID": {
        "description": "the request's id: the one sent if it matched [A-Za-z0-9._:-]{1,64}",
        "schema": {"type": "string"},
    },
    "Retry-After": {"description": "seconds to wait", "schema": {"type": "integer"}},
    "WWW-Authenticate": {"description": "the Bearer scheme", "schema": {"type": "string"}},
    "RateLimit": {
        "description": 'the limit that was hit (IETF draft): `"<kind>";r=0;t=<seconds>`',
        "schema": {"type": "string"},
    },
    "RateLimit-Policy": {
        "description": 'that limit (IETF draft): `"<kind>";q=<requests>;w=<seconds>`',
        "schema": {"type": "string"},
    },
}
PROBLEM_MEDIA = "application/problem+json"


def calls(dependant: Dependant) -> set[Any]:
    """Every callable a route's dependencies run, however deep."""
    found = {dependant.call}
    for sub in dependant.dependencies:
        found |= calls(sub)
    return found


def document(app: FastAPI) -> dict[str, Any]:
    """The whole document, built once per app."""
    if app.openapi_schema is not None:
        return app.openapi_schema
    schema = get_openapi(
        title=app.title, version=app.version, summary=app.summary, routes=app.routes
    )
    components = schema.setdefault("components", {})
    schemes = components.setdefault("securitySchemes", {})
    schemes["BotKey"] = BOT_KEY_SCHEME
    schemas = components.setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):  # FastAPI's 422: not ours
        schemas.pop(name, None)
    for model in (Problem, ValidationProblem, VerificationBatch):
        model_schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(model_schema.pop("$defs", {}))
        schemas[model.__name__] = model_schema
    components["headers"] = HEADERS
    routes = {
        (method.lower(), context.path_format): context
        for context in iter_route_contexts(app.routes)
        if isinstance(context.original_route, APIRoute)
        for method in context.methods or ()
    }
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            complete(path, operation, routes[method, path])
    app.openapi_schema = schema
    return schema


def complete(path: str, operation: dict[str, Any], route: RouteContext) -> None:
    """One operation with every status it can answer, each with its media type and
    headers."""
    ran = calls(route.dependant) if route.dependant else set()
    if path.startswith("/api/v1/bot/"):
        # The bot routes read their key by hand (see auth.bot_caller), with no security
        # dependency for FastAPI to see.
        assert bot_caller in ran
        operation["security"] = [{"BotKey": []}]
    errors = {413, 429}
    if operation.get("security"):
        errors.add(401)
        if operation["security"] != [{"BotKey": []}]:
            errors |= {403, 503}
    if get_session in ran:
        errors.add(503)
    if operation.get("parameters"):
        errors.add(422)
    if "requestBody" in operation:
        errors |= {400, 415, 422}
    responses = operation.setdefault("responses", {})
    page = responses.get("200", {}).get("content", {}).get("application/json", {})
    if "Page_" in page.get("schema", {}).get("$ref", ""):
        responses["200"]["links"] = {
            "next": {
                "operationId": operation["operationId"],
                "parameters": {"cursor": "$response.body#/next_cursor"},
                "description": "the next page (while next_cursor is not null)",
            }
        }
    for status in errors:
        responses.setdefault(str(status), {})
    request_id = {"X-Request-ID": {"$ref": "#/components/headers/X-Request-ID"}}
    for code, response in responses.items():
        status = int(code)
        headers = response.setdefault("headers", {})
        headers.update(request_id)
        if status < 400:
            for media in response.get("content", {}).values():
                # FastAPI describes SSE with OpenAPI 3.2's itemSchema; in 3.1 a stream of
                # events is a string, like any other streamed body.
                media.pop("itemSchema", None)
                media.setdefault("schema", {"type": "string"})
            continue
        response["description"] = DESCRIPTIONS.get(status, response.get("description", ""))
        model = "ValidationProblem" if status == 422 else "Problem"
        response["content"] = {PROBLEM_MEDIA: {"schema": {"$ref": f"#/components/schemas/{model}"}}}
        if status == 401:
            headers["WWW-Authenticate"] = {"$ref": "#/components/headers/WWW-Authenticate"}
        if status in (429, 503):
            headers["Retry-After"] = {"$ref": "#/components/headers/Retry-After"}
        if status == 429:
            for name in ("RateLimit", "RateLimit-Policy"):
                headers[name] = {"$ref": f"#/components/headers/{name}"}
