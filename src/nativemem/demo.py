"""The demo behind `make demo`: write a few short documents into a memory and ask about them.

The documents describe invented things, so the model cannot know the answers without the memory.
This is the text-retrieval baseline (`nativemem demo --kind bm25`): BM25 over the documents, the best
passage placed in the prompt; the default demo (`activation_demo.py`) injects the documents' own KV.
Each question is answered with and without the memory.
"""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from .prompting import build_messages, postprocess_answer
from .retrieval import BM25Retriever
from .retrieval import Chunk

__all__ = ["DOCUMENTS", "QUESTIONS", "run_demo"]

DOCUMENTS = [
    "The Velmora Institute was founded in 1987 in the coastal town of Brisk Harbor by the chemist Ada Quell.",
    "Captain Orrin Delacroix commands the research ship Saltmarrow, which carries a crew of forty-two.",
    "The rare Amber Finch nests only on Tollen Island and lays exactly three pale green eggs each spring.",
    "Project Lanternfish is a deep-sea camera that the Velmora Institute lowered to 6,000 metres in 2019.",
    "Ada Quell's favourite instrument was the cello, which she played every Sunday in the harbour chapel.",
]
QUESTIONS = [
    ("Who founded the Velmora Institute?", "Ada Quell"),
    ("Which ship does Captain Orrin Delacroix command?", "Saltmarrow"),
    ("Where does the Amber Finch nest?", "Tollen Island"),
    ("How deep was Project Lanternfish lowered?", "6,000 metres"),
    ("Which instrument did Ada Quell play?", "cello"),
]


def run_demo(lm, console: Console, *, k: int = 1, max_new_tokens: int = 32) -> list[dict]:
    """Index DOCUMENTS, answer QUESTIONS with and without the memory, print a table; return the rows."""
    chunks = [Chunk(id=f"doc{i}", text=t) for i, t in enumerate(DOCUMENTS)]
    memory = BM25Retriever()
    memory.index(chunks)
    by_id = {c.id: c.text for c in chunks}
    console.print(f"[bold]memory:[/] {len(chunks)} documents written (BM25 index, {memory.nbytes:,} bytes); "
                  f"model {lm.name}")
    table = Table(title="answers with and without memory", show_lines=True)
    for col in ("question", "expected", "with memory", "without memory", "retrieved"):
        table.add_column(col)
    rows = []
    for question, expected in QUESTIONS:
        hits = memory.search(question, k)
        passages = [by_id[cid] for cid, _ in hits]
        with_mem = lm.generate(lm.chat_ids(build_messages(question, passages)), max_new_tokens=max_new_tokens)
        without = lm.generate(lm.chat_ids(build_messages(question)), max_new_tokens=max_new_tokens)
        row = {"question": question, "expected": expected, "with_memory": postprocess_answer(with_mem.text),
               "without_memory": postprocess_answer(without.text), "retrieved": [cid for cid, _ in hits]}
        rows.append(row)
        table.add_row(question, expected, row["with_memory"], row["without_memory"], ", ".join(row["retrieved"]))
    console.print(table)
    return rows
