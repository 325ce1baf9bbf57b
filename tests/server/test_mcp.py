"""`nativemem mcp`: the memory served over the Model Context Protocol, driven by the official SDK's client."""

from __future__ import annotations

import asyncio
import json
import os
import sys


def _data(result):
    assert not result.is_error, result.content
    if result.structured_content is not None:
        data = result.structured_content
        return data.get("result", data) if set(data) == {"result"} else data
    return json.loads(result.content[0].text)


def test_an_agent_adds_searches_lists_asks_and_deletes_over_stdio(model_dir, tmp_path):
    from mcp.client.session import ClientSession
    from mcp.client.stdio import StdioServerParameters, stdio_client

    def server(user):
        return StdioServerParameters(command=sys.executable, env={**os.environ, "OMP_NUM_THREADS": "1"}, args=[
            "-m", "nativemem.cli.main", "mcp", "--memory", str(tmp_path / "m"), "--user", user, "--model",
            str(model_dir), "--max-new-tokens", "4"])

    async def alice():
        async with stdio_client(server("alice")) as (read, write), ClientSession(read, write) as session:
            await session.initialize()
            assert {t.name for t in (await session.list_tools()).tools} == {"add", "search", "list", "delete", "ask"}
            added = _data(await session.call_tool("add", {"text": "Alice's locker code is 4312."}))
            assert len(added["ids"]) == 1
            other = _data(await session.call_tool("add", {"text": "Alice's cat is named Pixel."}))["ids"][0]
            hits = _data(await session.call_tool("search", {"query": "What is the locker code?", "k": 2}))
            assert {h["id"] for h in hits} == {added["ids"][0], other}
            assert all(0.0 <= h["relevance"] <= 1.0 and h["text"] for h in hits)
            listed = _data(await session.call_tool("list", {}))
            assert listed["total"] == 2 and [r["text"] for r in listed["data"]][0].startswith("Alice's locker")
            answer = _data(await session.call_tool("ask", {"question": "What is my locker code?"}))
            assert isinstance(answer["answer"], str) and len(answer["hits"]) >= 1
            assert set(answer["injected"]) <= {added["ids"][0], other}
            assert _data(await session.call_tool("delete", {"memory_id": other}))["deleted"] == [other]
            assert _data(await session.call_tool("list", {}))["total"] == 1
            bad = await session.call_tool("search", {"query": "   "})
            assert bad.is_error and "query" in bad.content[0].text
            return added["ids"][0]

    async def bob(alice_id):
        async with stdio_client(server("bob")) as (read, write), ClientSession(read, write) as session:
            await session.initialize()
            assert _data(await session.call_tool("list", {}))["total"] == 0
            assert _data(await session.call_tool("search", {"query": "locker code", "k": 4})) == []
            gone = await session.call_tool("delete", {"memory_id": alice_id})  # another user's id: unknown
            assert gone.is_error and "no such memory" in gone.content[0].text

    alice_id = asyncio.run(alice())
    asyncio.run(bob(alice_id))
