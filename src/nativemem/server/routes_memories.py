"""Routes: the caller's memories (add, list, search, get, delete, reset, export, import, consolidate); another user's
ids answer 404."""

from __future__ import annotations

import json

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse

from .calls import engine, in_thread, model_turn, user_of, with_model, with_steps, with_turns
from .http import MAX_ID_CHARS, ApiError, int_param, json_body, read_json
from .schemas import (MAX_LIST_LIMIT, MAX_METADATA_CHARS, AddRequest, ConsolidateRequest, ResetRequest,
                      SearchRequest, UpdateRequest)

router = APIRouter()


@router.post("/v1/memories", openapi_extra=json_body(AddRequest))
async def add_memories(request: Request):
    user = user_of(request)
    req = await read_json(request, AddRequest)
    try:
        texts = req.all_texts()
    except ValueError as e:
        raise ApiError(400, str(e)) from None
    if len(json.dumps(req.metadata)) > MAX_METADATA_CHARS:
        raise ApiError(400, f"metadata is larger than {MAX_METADATA_CHARS:,} characters of JSON",
                       param="metadata")
    eng = engine(request)
    return await with_turns(request, lambda stop, turns: eng.add(texts, user_id=user, metadata=req.metadata,
                                                                 stop=stop, turns=turns))


@router.get("/v1/memories")
async def list_memories(request: Request):
    user = user_of(request)
    limit = int_param(request, "limit", 100, 1, MAX_LIST_LIMIT)
    offset = int_param(request, "offset", 0, 0, 1 << 40)
    eng = engine(request)
    return await in_thread(lambda: eng.list(user_id=user, limit=limit, offset=offset))


@router.delete("/v1/memories", openapi_extra=json_body(ResetRequest))
async def reset_memories(request: Request):
    """Delete every memory of the caller; the body must say ``{"confirm": true}``."""
    user = user_of(request)
    req = await read_json(request, ResetRequest)
    if not req.confirm:
        raise ApiError(400, "deleting all your memories needs {\"confirm\": true} in the body", param="confirm")
    eng = engine(request)
    return await in_thread(lambda: eng.reset(user_id=user))


@router.get("/v1/memories/export")
async def export_memories(request: Request):
    """The caller's memories as a portable JSON Lines file (``nativemem import`` or ``POST /v1/memories/import``)."""
    user = user_of(request)
    eng = engine(request)
    text = await in_thread(lambda: eng.export(user_id=user))
    return PlainTextResponse(text, media_type="application/x-ndjson",
                             headers={"Content-Disposition": 'attachment; filename="memories.jsonl"'})


@router.post("/v1/memories/import")
async def import_memories(request: Request):
    """Encode an export file (the raw body, JSON Lines) into the caller's memories, all or nothing."""
    user = user_of(request)
    try:
        text = (await request.body()).decode("utf-8")
    except UnicodeDecodeError:
        raise ApiError(400, "the body is not UTF-8 text") from None
    eng = engine(request)
    return await with_turns(request, lambda stop, turns: eng.import_(text, user_id=user, stop=stop, turns=turns))


@router.post("/v1/memories/search", openapi_extra=json_body(SearchRequest))
async def search_memories(request: Request):
    user = user_of(request)
    req = await read_json(request, SearchRequest)
    eng = engine(request)
    hits = await with_model(request, lambda stop: eng.search(req.query, user_id=user, k=req.k))
    return {"object": "list", "data": hits}


@router.post("/v1/memories/consolidate", openapi_extra=json_body(ConsolidateRequest))
async def consolidate_memories(request: Request):
    user = user_of(request)
    req = await read_json(request, ConsolidateRequest)
    eng = engine(request)
    if req.background:  # 202 with the job; GET /v1/jobs/{id} for its receipt
        job = request.app.state.jobs.start(
            user, "consolidate", lambda stop: eng.consolidate(req.into, user_id=user, stop=stop,
                                                              turn=model_turn(eng, stop)))
        return JSONResponse(job.public(), status_code=202, headers={"Location": f"/v1/jobs/{job.id}"})
    return await with_steps(request, lambda stop, turn: eng.consolidate(req.into, user_id=user, stop=stop, turn=turn))


@router.delete("/v1/memories/consolidated")
async def delete_consolidated(request: Request):
    user = user_of(request)
    into = request.query_params.get("into")
    eng = engine(request)
    return await with_model(request, lambda stop: eng.delete_consolidated(user_id=user, into=into))


def _not_found(memory_id: str) -> ApiError:
    # the id is not echoed: a response must never carry a memory id its caller does not own
    return ApiError(404, "no such memory", type="not_found", code="memory_not_found")


async def _for_owner(request: Request, memory_id: str, fn):
    """``fn(engine, memory_id, user)`` in a worker thread; 404 for an over-long id or when it finds nothing."""
    user = user_of(request)
    if len(memory_id) > MAX_ID_CHARS:
        raise _not_found(memory_id)
    eng = engine(request)
    out = await in_thread(lambda: fn(eng, memory_id, user))
    if out is None:
        raise _not_found(memory_id)
    return out


@router.get("/v1/memories/{memory_id}")
async def get_memory(memory_id: str, request: Request):
    return await _for_owner(request, memory_id, lambda eng, mid, user: eng.get(mid, user_id=user))


@router.delete("/v1/memories/{memory_id}")
async def delete_memory(memory_id: str, request: Request):
    deleted = await _for_owner(request, memory_id, lambda eng, mid, user: eng.delete(mid, user_id=user))
    return {"object": "memory.deleted", "id": memory_id, "deleted": True, "ids": deleted}


@router.put("/v1/memories/{memory_id}", openapi_extra=json_body(UpdateRequest))
async def update_memory(memory_id: str, request: Request):
    """Replace one of the caller's chunks: a new text (encoded again, same id) and/or new metadata."""
    user = user_of(request)
    req = await read_json(request, UpdateRequest)
    if req.metadata is not None and len(json.dumps(req.metadata)) > MAX_METADATA_CHARS:
        raise ApiError(400, f"metadata is larger than {MAX_METADATA_CHARS:,} characters of JSON", param="metadata")
    if len(memory_id) > MAX_ID_CHARS:
        raise _not_found(memory_id)
    eng = engine(request)
    out = await with_model(request, lambda stop: eng.update(memory_id, user_id=user, text=req.text,
                                                            metadata=req.metadata, stop=stop))
    if out is None:
        raise _not_found(memory_id)
    return out


@router.get("/v1/memories/{memory_id}/history")
async def memory_history(memory_id: str, request: Request):
    """Versions of one of the caller's chunks (add, update, delete, with times), oldest first."""
    return await _for_owner(request, memory_id, lambda eng, mid, user: eng.history(mid, user_id=user))
