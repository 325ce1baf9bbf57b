"""The activation-memory demo: the demo documents written into an activation memory and asked about.

Each document becomes one chunk whose KV (keys before rotary encoding) is stored with retrieval vectors
from the model's own states; the retrieval transform is first fitted on a generic fit set that does not
contain the documents. Every question is answered three ways: with the memory (the retrieved chunk's KV
injected as a prefix, only the question prefilled), with the same chunk pasted as text (RAG), and
without memory.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

from .prompting import DEFAULT_SYSTEM, build_messages, postprocess_answer
from .demo import DOCUMENTS, QUESTIONS

__all__ = ["run_activation_demo"]


def run_activation_demo(lm, console: Console, *, folder: str | Path | None = None, k: int = 1,
                        max_new_tokens: int = 32) -> list[dict]:
    """Fit, write DOCUMENTS, answer QUESTIONS with memory / with pasted text / without; print tables.

    Args:
        folder: memory folder (default: a temporary one, removed afterwards).
        k: chunks injected per question.
    """
    import nativemem as nm

    from .memories.activation.fitset import GENERIC_FIT_TEXTS

    with tempfile.TemporaryDirectory(prefix="nativemem-demo-") as tmp:
        path = Path(folder) if folder is not None else Path(tmp) / "demo.mem"
        mem = nm.open_memory(path, lm, kind="activation", top_k=k, frame_system=DEFAULT_SYSTEM)
        with console.status("fitting the retrieval transform on a generic fit set..."):
            fit = mem.fit(GENERIC_FIT_TEXTS)
        console.print(f"[bold]fit:[/] {'; '.join(fit.notes)}", highlight=False)
        receipt = mem.add(DOCUMENTS, user_id="demo")
        console.print(f"[bold]memory:[/] {receipt} - {mem.bytes_per_token():,} payload bytes per token "
                      f"({mem.config.kv_dtype} KV, keys before RoPE), model {lm.name}", highlight=False)
        table = Table(title="answers with activation memory, with pasted text, and without memory", show_lines=True)
        for col in ("question", "expected", "activation memory", "text (RAG)", "no memory", "retrieved",
                    "prefilled / injected"):
            table.add_column(col)
        rows = []
        for question, expected in QUESTIONS:
            hits = mem.search(question, k=k, user_id="demo")
            ids = lm.chat_ids(build_messages(question))
            with_mem = lm.generate(ids, max_new_tokens=max_new_tokens, memory=mem.injecting([h.id for h in hits]))
            rag = lm.generate(lm.chat_ids(build_messages(question, [h.text for h in hits])),
                              max_new_tokens=max_new_tokens)
            without = lm.generate(ids, max_new_tokens=max_new_tokens)
            row = {"question": question, "expected": expected, "activation": postprocess_answer(with_mem.text),
                   "rag": postprocess_answer(rag.text), "without_memory": postprocess_answer(without.text),
                   "retrieved": [h.text for h in hits], "prompt_tokens": with_mem.prompt_tokens,
                   "prefix_tokens": with_mem.prefix_tokens, "rag_prompt_tokens": rag.prompt_tokens,
                   "ttft_s": with_mem.ttft_s, "rag_ttft_s": rag.ttft_s}
            rows.append(row)
            table.add_row(question, expected, row["activation"], row["rag"], row["without_memory"],
                          " | ".join(t[:48] + ("..." if len(t) > 48 else "") for t in row["retrieved"]),
                          f"{row['prompt_tokens']} / {row['prefix_tokens']} (RAG prefills {row['rag_prompt_tokens']})")
        console.print(table)
        mem.close()
        del mem
        import gc

        gc.collect()  # the store closes (and unlocks) before its temporary folder is removed
    return rows
