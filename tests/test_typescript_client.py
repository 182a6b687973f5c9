"""A TypeScript client generated from /openapi.json (openapi-typescript, pinned in
dashboard/package.json) type-checks a small dashboard module under `tsc --strict`: lists are
typed down to their items, always-sent fields are required, a 422 reads `errors[0].loc` and
`request_id`. Needs `npm ci` in dashboard/ (.ci/run does it)."""

import json
import os
import subprocess

import pytest

from app import create_app
from tests.conftest import ROOT, make_settings

DASHBOARD = ROOT / "dashboard"


def npx(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # noqa: S603 - our own pinned tools
        ["npx", "--no-install", *args],  # noqa: S607
        cwd=DASHBOARD,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_generated_client_type_checks_the_dashboard_module() -> None:
    if not (DASHBOARD / "node_modules").exists():
        if os.environ.get("CI"):
            pytest.fail("dashboard/node_modules is missing: run `npm ci` in dashboard/")
        pytest.skip("run `npm ci` in dashboard/ to check the generated TypeScript client")
    document = create_app(make_settings("sqlite+aiosqlite:///never-opened.db", "")).openapi()
    (DASHBOARD / "openapi.json").write_text(json.dumps(document))
    generated = npx("openapi-typescript", "openapi.json", "--default-non-nullable", "false",
                    "-o", "schema.d.ts")  # fmt: skip
    assert generated.returncode == 0, generated.stdout + generated.stderr
    checked = npx("tsc", "--noEmit", "--strict", "-p", ".")
    assert checked.returncode == 0, checked.stdout + checked.stderr
