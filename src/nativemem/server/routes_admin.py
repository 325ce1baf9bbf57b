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


MODEL_ALIAS = "nativemem"  # every server also answers to this name, whatever model it serves


def model_ids(eng: Engine) -> list[str]:
    """Names a request's ``model`` may use: the served model's and the alias."""
    return [eng.lm.name] + ([MODEL_ALIAS] if eng.lm.name != MODEL_ALIAS else [])


def check_model(eng: Engine, model_id: str) -> None:
    """404 (as vLLM answers) for a model this server does not serve."""
    if model_id not in model_ids(eng):
        raise ApiError(404, f"the model {model_id[:200]!r} does not exist; this server serves "
                       + " or ".join(repr(m) for m in model_ids(eng)), type="not_found", code="model_not_found",
                       param="model")


def model_card(eng: Engine, model_id: str) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": 0, "owned_by": "nativemem", "root": eng.lm.name}


@router.get("/v1/models")
async def models(request: Request):
    user_of(request)
    eng = engine(request)
    return {"object": "list", "data": [model_card(eng, m) for m in model_ids(eng)]}


@router.get("/v1/models/{model_id:path}")
async def model_info(model_id: str, request: Request):
    user_of(request)
    eng = engine(request)
    check_model(eng, model_id)
    return model_card(eng, model_id)
