"""A memory over the Model Context Protocol: ``nativemem mcp --memory DIR [--user U]`` (stdio, the official SDK).

An agent gets five tools on one user's activation memory: ``add`` (store a text), ``search`` (hits with raw
score and calibrated relevance), ``list`` (the user's chunks, oldest first), ``delete`` (a chunk or source id)
and ``ask`` (answer a question with the model, the memory's relevant chunks injected; the reply says which
chunks went in). Every tool acts for the one user the server was started for; ids of other users' chunks
answer like unknown ones.
"""

from __future__ import annotations

import functools
from typing import Any

__all__ = ["build_server"]


def _clear_errors(fn):
    """Bad input and the library's errors reach the agent as the tool's error text (the SDK hides other errors)."""
    from mcp.server.mcpserver.exceptions import ToolError

    from .errors import NativememError

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (NativememError, ValueError) as e:
            raise ToolError(str(e)) from None

    return wrapper


def build_server(lm, memory, *, user_id: str | None = None, max_new_tokens: int = 128):
    """The MCP server (``mcp.server.mcpserver.MCPServer``) for ``memory`` and ``user_id``; run it with
    ``.run("stdio")``."""
    from mcp.server.mcpserver import MCPServer

    from .prompting import build_messages
    from .text import check_text

    user = user_id or ""
    server = MCPServer("nativemem", instructions=(
        "A long-term memory that lives in a language model's own representations. Store texts with `add`, find "
        "them with `search`, and ask questions answered with the relevant memories injected with `ask`."))

    def record(pid: str, p: dict[str, Any]) -> dict[str, Any]:
        return {"id": pid, "text": p.get("text", ""), "source_id": p.get("source_id"),
                "chunk_index": p.get("chunk_index"), "created": p.get("created")}

    @server.tool(description="Store a text in the memory (split into chunks); returns the chunk ids.")
    @_clear_errors
    def add(text: str) -> dict[str, Any]:
        receipt = memory.add(check_text(text, what="text"), user_id=user_id)
        return {"ids": receipt.ids, "tokens": receipt.tokens}

    @server.tool(description="Search the memory; each hit has a raw score and a calibrated relevance "
                             "(probability, 0-1, that it helps answer the query).")
    @_clear_errors
    def search(query: str, k: int = 4) -> list[dict[str, Any]]:
        hits = memory.search(query, k=k, user_id=user_id)
        return [{**record(h.id, h.payload), "score": h.score, "relevance": h.relevance} for h in hits
                if h.payload.get("user_id") == user]

    @server.tool(name="list", description="The stored chunks, oldest first (limit and offset page through them).")
    @_clear_errors
    def list_chunks(limit: int = 100, offset: int = 0) -> dict[str, Any]:
        if limit < 1 or offset < 0:
            raise ValueError("limit must be >= 1 and offset >= 0")
        page = memory.items(user_id=user_id or None, limit=limit, offset=offset)
        return {"total": memory.count(user_id=user_id or None), "data": [record(item["id"], item) for item in page]}

    @server.tool(description="Delete a chunk (by its id) or every chunk of a source (by its source id).")
    @_clear_errors
    def delete(memory_id: str) -> dict[str, Any]:
        ids = [memory_id] if memory.get(memory_id, user_id=user_id or None) else [
            item["id"] for item in memory.items(user_id=user_id or None, source_id=memory_id, limit=1 << 30)]
        if not ids:
            raise ValueError("no such memory")
        for pid in ids:
            memory.delete(pid)
        return {"deleted": ids}

    @server.tool(description="Answer a question with the model; only memories relevant to it are injected.")
    @_clear_errors
    def ask(question: str) -> dict[str, Any]:
        question = check_text(question, what="question")
        gen = lm.generate(lm.chat_ids(build_messages(question)), max_new_tokens=max_new_tokens, memory=memory,
                          user_id=user_id, query=question)
        hits = memory.last_selection.get("hits", [])
        return {"answer": gen.text, "injected": [h["id"] for h in hits if h["injected"]],
                "hits": [{k: h.get(k) for k in ("id", "relevance", "injected", "reason")} for h in hits]}

    return server
