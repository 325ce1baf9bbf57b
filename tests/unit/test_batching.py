"""Batched decoding: every row of a batch gets what it would get decoding alone (prefix, positions, padding,
rows joining and leaving between steps), and each row keeps its own sampling, stop strings and errors."""

from __future__ import annotations

import pytest
import torch
from testing import tiny_lm, tiny_model, tiny_tokenizer

import nativemem as nm
from nativemem.batching import DecodeBatch, batchable, prefill
from nativemem.model import LanguageModel, Sampling

PROMPTS = ["Where was Marie Curie born?", "Name a river.", "What is the capital of France and why is it famous?",
           "Hello"]


@pytest.fixture(scope="module")
def lm64():
    tok = tiny_tokenizer()  # float64: rounding differences of batched products stay far below any token gap
    return LanguageModel(tiny_model("llama", dtype=torch.float64, vocab_size=len(tok)), tok, name="tiny-llama-64")


def _run(lm, rows_in_order, joins):
    """Join rows at the given steps (``joins``: step -> rows) and step until all end; returns finished rows."""
    batch, finished, step = DecodeBatch(lm), [], 0
    while step in joins or len(batch) or any(s > step for s in joins):
        ready = joins.get(step, [])
        finished += [r for r in ready if r.done]
        batch.join(ready)
        finished += batch.step()
        step += 1
    assert {id(r) for r in finished} == {id(r) for r in rows_in_order}
    return rows_in_order


def test_a_batch_decodes_each_row_as_it_would_alone(lm64, tmp_path):
    mem = nm.open_memory(tmp_path / "m", lm64, kind="activation", gate_threshold=0.0, kv_dtype="float32")
    mem.add(["Marie Curie was born in Warsaw in 1867. She won two Nobel prizes.",
             "The Amber Finch nests on Tollen Island every spring."], user_id="u")
    alone, rows = [], []
    for n, prompt in enumerate(PROMPTS):
        ids = lm64.chat_ids([{"role": "user", "content": prompt}])
        use = mem if n % 2 == 0 else None  # half the rows carry a memory prefix of their own
        alone.append(lm64.generate(ids, max_new_tokens=9 + n, memory=use, user_id="u", query=prompt))
        if use is not None:
            with mem.active(lm=lm64, user_id="u", query=prompt) as inj:
                rows.append(prefill(lm64, ids, injection=inj, max_new_tokens=9 + n, keep_scores=True))
        else:
            rows.append(prefill(lm64, ids, max_new_tokens=9 + n, keep_scores=True))
    assert alone[0].prefix_tokens > 0 and alone[1].prefix_tokens == 0
    _run(lm64, rows, {0: rows[:2], 3: rows[2:3], 5: rows[3:]})
    for n, (a, r) in enumerate(zip(alone, rows)):
        # the logits of every step are those of the whole sequence run at once (same prefix, same positions)
        ids = lm64.chat_ids([{"role": "user", "content": PROMPTS[n]}])
        seq = torch.cat([ids, torch.tensor([r.new[:-1]])], dim=1)
        whole = lm64.logits(seq, memory=mem if n % 2 == 0 else None, user_id="u", query=PROMPTS[n])[0, -len(r.new):]
        assert (torch.stack(r.scores) - whole.float()).abs().max() < 1e-6
        got = r.result(lm64)
        assert got.token_ids == a.token_ids and got.text == a.text
        assert (got.prompt_tokens, got.prefix_tokens, got.new_tokens) == (a.prompt_tokens, a.prefix_tokens,
                                                                         a.new_tokens)
        assert 0 < got.ttft_s <= got.total_s
    mem.close()


def test_each_row_keeps_its_own_sampling_stop_strings_and_errors(lm64):
    ids = [lm64.chat_ids([{"role": "user", "content": p}]) for p in PROMPTS]
    greedy_alone = lm64.generate(ids[0], max_new_tokens=12)
    text = lm64.tokenizer.decode(greedy_alone.token_ids[3:5], skip_special_tokens=True).strip()
    assert text, "the tiny model's answer has no text to stop at"
    stop = Sampling(stop=(text,))
    stopped_alone = lm64.generate(ids[0], max_new_tokens=12, sampling=stop)
    seeded = Sampling(temperature=1.0, top_p=0.9, seed=7)

    def fail_at(n):
        seen = []

        def on_token(tokens):
            seen.extend(tokens)
            if len(seen) == n:
                raise RuntimeError("client went away")
        return on_token

    rows = [prefill(lm64, ids[0], max_new_tokens=12, sampling=Sampling(temperature=0.0)),
            prefill(lm64, ids[0], max_new_tokens=12, sampling=stop),
            prefill(lm64, ids[1], max_new_tokens=12, sampling=seeded),
            prefill(lm64, ids[2], max_new_tokens=12, on_token=fail_at(3))]
    _run(lm64, rows, {0: rows})
    assert rows[0].result(lm64).token_ids == greedy_alone.token_ids  # temperature 0 is greedy
    got = rows[1].result(lm64)
    assert got.text == stopped_alone.text and got.stopped and text not in got.text
    assert isinstance(rows[3].error, RuntimeError) and len(rows[3].new) == 3
    # a seed gives the same text whatever shares the batch
    again = [prefill(lm64, ids[1], max_new_tokens=12, sampling=seeded)]
    _run(lm64, again, {0: again})
    assert again[0].result(lm64).token_ids == rows[2].result(lm64).token_ids
    other = [prefill(lm64, ids[1], max_new_tokens=12, sampling=Sampling(temperature=1.0, seed=8))]
    _run(lm64, other, {0: other})
    assert other[0].new != rows[2].new


def test_models_with_sliding_window_layers_are_not_batched():
    assert batchable(tiny_lm("llama")) and batchable(tiny_lm("qwen2"))
    assert not batchable(tiny_lm("gemma3_text"))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rows_of_any_length_joining_and_leaving_at_any_step_keep_their_own_logits(lm64, seed):
    """Many rows, short and long, joining at random steps and ending after random counts: the batch's buffers
    grow in slots and columns, shift when a longer row joins, and move the last row into a freed slot; every
    row's logits must stay those of its own sequence run whole."""
    import random

    rng = random.Random(seed)
    vocab = len(lm64.tokenizer)
    rows, seqs, joins = [], [], {}
    for _ in range(14):
        prompt = torch.tensor([[rng.randrange(3, vocab) for _ in range(rng.choice([1, 2, 5, 17, 40, 90]))]])
        row = prefill(lm64, prompt, max_new_tokens=rng.randint(1, 30), keep_scores=True)
        row.eos = frozenset()  # a random model's end token would end rows by chance
        rows.append(row)
        seqs.append(prompt)
        joins.setdefault(rng.randrange(0, 40), []).append(row)
    _run(lm64, rows, joins)
    for prompt, row in zip(seqs, rows):
        seq = torch.cat([prompt, torch.tensor([row.new[:-1]], dtype=prompt.dtype)], dim=1)
        whole = lm64.logits(seq)[0, -len(row.new):]
        assert len(row.new) == row.max_new_tokens
        assert (torch.stack(row.scores) - whole.float()).abs().max() < 1e-6
