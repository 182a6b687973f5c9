"""The framework ceiling for the policy benchmark: a bare Starlette endpoint that returns a
constant JSON body of the same size as the policy, under the same uvicorn settings."""

import os
from pathlib import Path

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

BODY = Path(os.environ.get("CEILING_BODY_FILE", "bench/results/policy.json")).read_bytes()


async def constant(_: Request) -> Response:
    return Response(BODY, media_type="application/json", headers={"ETag": '"1.1"'})


app = Starlette(routes=[Route("/api/v1/bot/groups/{chat_id}/policy", constant)])
