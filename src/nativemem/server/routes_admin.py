"""Routes: liveness and the served model."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from .calls import engine, user_of
from .engine import Engine
from .http import ApiError

router = APIRouter()


@router.get("/health")
async def health(request: Request):
    eng = getattr(request.app.state, "engine", None)
    return {"status": "ok" if eng is not None else "starting", "model": eng.lm.name if eng else None}

def model_card(eng: Engine) -> dict[str, Any]:
    return {"id": eng.lm.name, "object": "model", "created": 0, "owned_by": "nativemem"}

@router.get("/v1/models")
async def models(request: Request):
    user_of(request)
    return {"object": "list", "data": [model_card(engine(request))]}

@router.get("/v1/models/{model_id:path}")
async def model_info(model_id: str, request: Request):
    user_of(request)
    eng = engine(request)
    if model_id != eng.lm.name:
        raise ApiError(404, f"no such model; this server serves {eng.lm.name!r}", type="not_found",
                       code="model_not_found")
    return model_card(eng)
