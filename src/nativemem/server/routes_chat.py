"""Route: OpenAI chat completions with the caller's memory, plain or streamed over server-sent events."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from sse_starlette import EventSourceResponse

from ..errors import ContextOverflowError, InputError
from ..model import Sampling
from .calls import acquire_model, engine, in_thread, new_stop, start_model_work, until_done, user_of, with_model
from .engine import Engine
from .http import ApiError, json_body, map_error, read_json
from .routes_admin import check_model
from .schemas import ChatRequest

router = APIRouter()


@router.post("/v1/chat/completions", openapi_extra=json_body(ChatRequest))
async def chat_completions(request: Request):
    user = user_of(request)
    req = await read_json(request, ChatRequest)
    eng = engine(request)
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                for m in req.messages]
    check_model(eng, req.model)
    bad = req.unsupported()
    if bad:
        raise ApiError(400, f"{bad} is not supported by this server (a local model: greedy or sampled text only)",
                       param=bad, code="unsupported_parameter")
    max_new = req.new_tokens()
    # token counting of a large body runs in a worker thread, not on the event loop
    prompt_tokens = await in_thread(lambda: sum(eng.lm.count_tokens(m["content"]) for m in messages))
    if prompt_tokens + max_new > eng.lm.max_context:  # cheap early check; the exact one includes the prefix
        raise ContextOverflowError(prompt_tokens + max_new, eng.lm.max_context, what="messages plus max_tokens")
    cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    try:
        sampling = Sampling(temperature=req.temperature or 0.0, top_p=1.0 if req.top_p is None else req.top_p,
                            seed=req.seed, stop=req.stop_strings())
    except InputError as e:
        raise ApiError(400, str(e)) from None
    run = dict(messages=messages, user_id=user, max_new_tokens=max_new, use_memory=req.memory, top_k=req.top_k,
               sampling=sampling, keep=bool(req.memory_write))
    batched = eng.batchable(user, use_memory=req.memory, keep=bool(req.memory_write))
    if req.stream:
        return await _stream(request, eng, req, run, cid, created, batched)
    if batched:  # decoded together with other users' chats, one forward per step
        stop = new_stop(request)
        future = eng.batcher.submit(await in_thread(lambda: eng.prepare(**run)), stop=stop)
        answer = await until_done(request, stop, asyncio.wrap_future(future))
    else:
        def answer_and_remember(stop):
            answer = eng.generate(**run, stop=stop)
            if req.memory_write:
                eng.remember(answer, messages, user_id=user)
            return answer

        answer = await with_model(request, answer_and_remember)
    gen = answer.generation
    return {"id": cid, "object": "chat.completion", "created": created, "model": eng.lm.name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": gen.text},
                         "finish_reason": _finish(gen, max_new)}],
            "usage": _usage(gen), "nativemem": _extra(answer)}


async def _stream(request: Request, eng: Engine, req: ChatRequest, run: dict, cid: str, created: int,
                  batched: bool):
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    stop = new_stop(request)

    def push(item):
        loop.call_soon_threadsafe(queue.put_nowait, item)

    def work():
        try:
            answer = eng.generate(**run, stop=stop, on_token=lambda ids: push(("token", ids)))
            if req.memory_write:
                eng.remember(answer, run["messages"], user_id=run["user_id"])
            push(("done", answer))
        except BaseException as e:  # noqa: BLE001 - handed to the event loop
            push(("error", e))

    def settled(future):
        error = None if future.cancelled() else future.exception()
        push(("error", error) if error is not None else ("done", future.result()))

    if batched:
        chat = await in_thread(lambda: eng.prepare(**run))
        eng.batcher.submit(chat, stop=stop, on_token=lambda ids: push(("token", ids))).add_done_callback(settled)
    else:
        await acquire_model(eng, stop)
        start_model_work(eng, work)
    first = await queue.get()
    if first[0] == "error":  # nothing sent yet: a plain HTTP error
        raise map_error(first[1])

    tok = eng.lm.tokenizer
    eos = set(eng.lm.eos_token_ids)
    sampling = run["sampling"]

    def chunk(delta: dict, finish: str | None = None, **extra) -> dict[str, str]:
        body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": eng.lm.name,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}
        return {"data": json.dumps(body, ensure_ascii=False)}

    async def events() -> AsyncIterator[dict[str, str]]:
        ids: list[int] = []
        sent = ""
        item = first
        try:
            yield chunk({"role": "assistant", "content": ""})
            while True:
                if item[0] == "token":
                    ids += [i for i in item[1] if i not in eos]
                    text = tok.decode(ids, skip_special_tokens=True).lstrip()
                    # hold back trailing spaces (the final answer is stripped), half-decoded characters, and
                    # what may be the start of a stop string (never sent)
                    text, hit = sampling.cut(text)
                    hold = 0 if hit else max((len(x) - 1 for x in sampling.stop), default=0)
                    ready = text[: len(text) - hold].rstrip() if hold else text.rstrip()
                    if not ready.endswith("\ufffd") and ready.startswith(sent) and len(ready) > len(sent):
                        yield chunk({"content": ready[len(sent):]})
                        sent = ready
                elif item[0] == "done":
                    answer = item[1]
                    gen = answer.generation
                    if gen.text.startswith(sent) and len(gen.text) > len(sent):
                        yield chunk({"content": gen.text[len(sent):]})
                    finish = _finish(gen, run["max_new_tokens"])
                    yield chunk({}, finish, nativemem=_extra(answer))
                    if req.stream_options is not None and req.stream_options.include_usage:
                        body = {"id": cid, "object": "chat.completion.chunk", "created": created,
                                "model": eng.lm.name, "choices": [], "usage": _usage(gen)}
                        yield {"data": json.dumps(body)}
                    yield {"data": "[DONE]"}
                    return
                else:  # an error after the first token: tell the client in the stream
                    err = map_error(item[1])
                    yield {"data": json.dumps({"error": {"message": err.message, "type": err.type}})}
                    return
                item = await queue.get()
        finally:
            stop.event.set()  # client gone or stream over: the worker stops at its next token

    # server-sent events framed by sse-starlette (a comment line every 15 s keeps idle proxies from closing)
    return EventSourceResponse(events(), ping=15, sep="\n",
                                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _finish(gen, max_new: int) -> str:
    return "stop" if gen.stopped or gen.new_tokens < max_new else "length"


def _usage(gen) -> dict[str, int]:
    """Every token the model attended: the prompt prefilled plus the memory's injected prefix (also reported on
    its own as ``nativemem.prefix_tokens``)."""
    prompt = gen.prompt_tokens + gen.prefix_tokens
    return {"prompt_tokens": prompt, "completion_tokens": gen.new_tokens, "total_tokens": prompt + gen.new_tokens}


def _extra(answer) -> dict[str, Any]:
    gen = answer.generation
    return {"memory_ids": answer.memory_ids, "prefix_tokens": gen.prefix_tokens, "ttft_s": round(gen.ttft_s, 6),
            "parametric": answer.parametric, "hits": answer.hits, "warnings": answer.warnings,
            **({"remembered": answer.remembered} if answer.remembered is not None else {})}
