"""A small schema-registry stub keeping the REST contract cachesync uses.

`POST /subjects/{subject}/versions` registers (or finds) a schema and returns its
global id; `GET /schemas/ids/{id}` returns it; unknown ids answer 404 with the
registry's error code 40403. Calls are counted so tests can see the cache work.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

CONTENT_TYPE = "application/vnd.schemaregistry.v1+json"


class RegistryStub:
    def __init__(self) -> None:
        self.schemas: dict[int, str] = {}
        self.subjects: dict[str, list[int]] = {}
        self.calls: Counter[str] = Counter()
        self.app = Starlette(
            routes=[
                Route("/subjects/{subject}/versions", self.register, methods=["POST"]),
                Route("/schemas/ids/{schema_id:int}", self.get_schema, methods=["GET"]),
            ]
        )

    def add(self, subject: str, schema: dict[str, Any]) -> int:
        """Register directly, as another producer would have done."""
        text = json.dumps(schema, sort_keys=True)
        known = {existing: sid for sid, existing in self.schemas.items()}
        sid = known.get(text) or len(self.schemas) + 1
        self.schemas[sid] = text
        self.subjects.setdefault(subject, [])
        if sid not in self.subjects[subject]:
            self.subjects[subject].append(sid)
        return sid

    async def register(self, request: Request) -> JSONResponse:
        self.calls["register"] += 1
        body = await request.json()
        if "schema" not in body:
            return JSONResponse({"error_code": 42201, "message": "Invalid schema"}, 422)
        sid = self.add(request.path_params["subject"], json.loads(body["schema"]))
        return JSONResponse({"id": sid}, media_type=CONTENT_TYPE)

    async def get_schema(self, request: Request) -> JSONResponse:
        self.calls["get"] += 1
        sid = request.path_params["schema_id"]
        if sid not in self.schemas:
            return JSONResponse({"error_code": 40403, "message": "Schema not found"}, 404)
        return JSONResponse({"schema": self.schemas[sid]}, media_type=CONTENT_TYPE)
