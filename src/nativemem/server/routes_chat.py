"""Route: OpenAI chat completions with the caller's memory, plain or streamed over server-sent events."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from ..errors import ContextOverflowError
from .calls import acquire_model, engine, in_thread, new_stop, start_model_work, user_of, with_model
from .engine import Engine
from .http import map_error, read_json
from .schemas import ChatRequest

router = APIRouter()


@router.post("/v1/chat/completions")
async def chat_completions(request: Request):
    user = user_of(request)
    req = await read_json(request, ChatRequest)
    eng = engine(request)
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                for m in req.messages]
    max_new = req.new_tokens()
    # token counting of a large body runs in a worker thread, not on the event loop
    prompt_tokens = await in_thread(lambda: sum(eng.lm.count_tokens(m["content"]) for m in messages))
    if prompt_tokens + max_new > eng.lm.max_context:  # cheap early check; the exact one includes the prefix
        raise ContextOverflowError(prompt_tokens + max_new, eng.lm.max_context, what="messages plus max_tokens")
    cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    run = dict(messages=messages, user_id=user, max_new_tokens=max_new, use_memory=req.memory, top_k=req.top_k)
    if req.stream:
        return await _stream(request, eng, req, run, cid, created)
    answer = await with_model(request, lambda stop: eng.generate(**run, stop=stop))
    gen = answer.generation
    return {"id": cid, "object": "chat.completion", "created": created, "model": eng.lm.name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": gen.text},
                         "finish_reason": "length" if gen.new_tokens >= max_new else "stop"}],
            "usage": _usage(gen), "nativemem": _extra(answer)}

async def _stream(request: Request, eng: Engine, req: ChatRequest, run: dict, cid: str, created: int):
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    stop = new_stop(request)

    def push(item):
        loop.call_soon_threadsafe(queue.put_nowait, item)

    def work():
        try:
            push(("done", eng.generate(**run, stop=stop, on_token=lambda ids: push(("token", ids)))))
        except BaseException as e:  # noqa: BLE001 - handed to the event loop
            push(("error", e))

    await acquire_model(eng, stop)
    start_model_work(eng, work)
    first = await queue.get()
    if first[0] == "error":  # nothing sent yet: a plain HTTP error
        raise map_error(first[1])

    tok = eng.lm.tokenizer
    eos = set(eng.lm.eos_token_ids)

    def chunk(delta: dict, finish: str | None = None, **extra) -> str:
        body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": eng.lm.name,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    async def events() -> AsyncIterator[str]:
        ids: list[int] = []
        sent = ""
        item = first
        try:
            yield chunk({"role": "assistant", "content": ""})
            while True:
                if item[0] == "token":
                    ids += [i for i in item[1] if i not in eos]
                    text = tok.decode(ids, skip_special_tokens=True).lstrip()
                    # hold back trailing spaces (the final answer is stripped) and half-decoded characters
                    ready = text.rstrip()
                    if not ready.endswith("\ufffd") and ready.startswith(sent) and len(ready) > len(sent):
                        yield chunk({"content": ready[len(sent):]})
                        sent = ready
                elif item[0] == "done":
                    answer = item[1]
                    gen = answer.generation
                    if gen.text.startswith(sent) and len(gen.text) > len(sent):
                        yield chunk({"content": gen.text[len(sent):]})
                    finish = "length" if gen.new_tokens >= run["max_new_tokens"] else "stop"
                    yield chunk({}, finish, nativemem=_extra(answer))
                    if req.stream_options is not None and req.stream_options.include_usage:
                        body = {"id": cid, "object": "chat.completion.chunk", "created": created,
                                "model": eng.lm.name, "choices": [], "usage": _usage(gen)}
                        yield f"data: {json.dumps(body)}\n\n"
                    yield "data: [DONE]\n\n"
                    return
                else:  # an error after the first token: tell the client in the stream
                    err = map_error(item[1])
                    yield f"data: {json.dumps({'error': {'message': err.message, 'type': err.type}})}\n\n"
                    return
                item = await queue.get()
        finally:
            stop.event.set()  # client gone or stream over: the worker stops at its next token

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _usage(gen) -> dict[str, int]:
    return {"prompt_tokens": gen.prompt_tokens, "completion_tokens": gen.new_tokens,
            "total_tokens": gen.prompt_tokens + gen.new_tokens}


def _extra(answer) -> dict[str, Any]:
    gen = answer.generation
    return {"memory_ids": answer.memory_ids, "prefix_tokens": gen.prefix_tokens, "ttft_s": round(gen.ttft_s, 6),
            "parametric": answer.parametric, "hits": answer.hits, "warnings": answer.warnings}
