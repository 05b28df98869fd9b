"""The Cloudflare stand-in's token can be revoked, restored and rotated while it runs, also
over HTTP (for the local stack's stand-in in another process); its ledger reads over HTTP."""

from __future__ import annotations

import httpx

from deploy.local.standins.cloudflare import CloudflareStub

PURGE = "/client/v4/zones/z1/purge_cache"


def client(stub: CloudflareStub, token: str = "t1") -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=stub.app),
        base_url="http://cf.test",
        headers={"Authorization": f"Bearer {token}"},
    )


async def test_a_revoked_token_is_refused_as_the_api_does_until_restored() -> None:
    """Revoked: 403 (or 401) with code 10000 "Authentication error", nothing in the ledger;
    restored: accepted again."""
    stub = CloudflareStub(token="t1")
    async with client(stub) as http:
        assert (await http.post(PURGE, json={"tags": ["a"]})).status_code == 200
        assert (await http.post("/_stub/token/revoke")).status_code == 200
        refused = await http.post(PURGE, json={"tags": ["b"]})
        assert refused.status_code == 403
        assert refused.json()["errors"] == [{"code": 10000, "message": "Authentication error"}]
        await http.post("/_stub/token/revoke", params={"status": "401"})
        assert (await http.post(PURGE, json={"tags": ["b"]})).status_code == 401
        assert (await http.post("/_stub/token/revoke", params={"status": "500"})).status_code == 400
        await http.post("/_stub/token/restore")
        assert (await http.post(PURGE, json={"tags": ["c"]})).status_code == 200
        ledger = await http.get("/_stub/purged", params={"kind": "tags", "zone": "z1"})
        assert ledger.json() == {"kind": "tags", "items": ["a", "c"]}
    assert stub.purged("tags") == {"a", "c"} and stub.count(403) == 1 and stub.count(401) == 1


async def test_a_rotated_token_refuses_the_old_one() -> None:
    stub = CloudflareStub(token="t1")
    async with client(stub) as old, client(stub, "t2") as new:
        assert (await old.post("/_stub/token/rotate", json={"token": "t2"})).status_code == 200
        assert (await old.post(PURGE, json={"tags": ["a"]})).status_code == 403
        assert (await new.post(PURGE, json={"tags": ["a"]})).status_code == 200
