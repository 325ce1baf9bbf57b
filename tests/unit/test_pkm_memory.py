"""pkm memory: add (receipt, recall, duplicates, capacity), the gate switch, delete, save/open."""

import math

import pytest
import torch
from testing import tiny_lm

import nativemem as nm
from nativemem.errors import InputError
from nativemem.hooks import count_hooks
from nativemem.memories.pkm import PKMConfig, PKMMemory, generate_facts, load_facts, save_facts
from nativemem.prompting import build_messages


pytestmark = pytest.mark.usefixtures("one_thread")


TINY = dict(layers=(0, 1), num_keys=16, heads=2, top_k=4, key_dim=16, lr=0.1, batch_size=4, max_epochs=60,
            gate_steps=100, gate=False,  # the gate of a random 2-layer model is not what these tests are about
            phrasings=2, train_autocast="float32")  # a width-32 random model stores 2 phrasings of a few facts, not 4


def memory(lm, **cfg) -> PKMMemory:
    return PKMMemory(lm, PKMConfig(**{**TINY, **cfg}))


@pytest.fixture
def lm():
    # initializer_range 0.2: the default 0.02 gives an LM head too weak for confident answers at width 32
    return tiny_lm(initializer_range=0.2)


def greedy(lm, fact, mem=None):
    return lm.generate(lm.chat_ids(build_messages(fact.prompt, system=PKMConfig().system)), max_new_tokens=40,
                       memory=mem).text


def test_add_trains_until_recalled_and_says_so(lm):
    mem = memory(lm)
    facts = generate_facts(3, seed=5)
    receipt = mem.add(facts, user_id="bob")
    d = receipt.details
    assert receipt.ids == [f.id for f in facts] and receipt.steps > 0 and receipt.final_loss is not None
    assert d["recall"] == 1.0 and d["stopped"] == "recalled" and d["exposures_per_fact"] > 0
    assert {"calibrate_s", "cache_s", "train_s", "eval_s", "gate_s"} <= set(d)
    assert len(d["epoch_active"]) == len(d["epoch_missed"]) == len(d["epoch_share"]) == d["epochs"]
    assert d["epoch_missed"][-1] == 0 and d["epoch_share"][-1] == 1.0  # what the stop rule saw when it stopped
    assert receipt.layers == [0, 1] and mem.stats()["facts"] == 3
    for f in facts:  # recall means greedy decoding reproduces the answer exactly
        assert greedy(lm, f, mem) == f.answer
        assert greedy(lm, f) != f.answer
    assert count_hooks(lm.model) == 0
    assert all(p.requires_grad and p.grad is None for p in lm.model.parameters())  # flags restored, no grads


def test_plain_sentences_become_completion_facts(lm):
    mem = memory(lm)
    receipt = mem.add(["Marie Curie was born in Warsaw in 1867.", "Paris is the capital of France."])
    assert receipt.details["recall"] == 1.0
    ids = lm.encode("Paris is the capital of")
    bos = torch.tensor([[lm.tokenizer.bos_token_id]])
    out = lm.generate(torch.cat([bos, ids], 1), max_new_tokens=12, memory=mem)
    assert out.text.startswith("France.")


def test_duplicates_and_conflicts_later_answer_wins(lm):
    mem = memory(lm)
    r = mem.add([("Who guards the gate?", "Orvel"), ("Who guards the gate?", "Brisk"), ("Name the river.", "Ulm"),
                 ("Name the river.", "Ulm")])
    assert len(r.ids) == 2 and any("later answer wins" in n for n in r.notes) and any("duplicate" in n for n in r.notes)
    assert [rec["answer"] for rec in mem.records.values()] == ["Brisk", "Ulm"]
    again = mem.add([("Name the river.", "Ulm")])
    assert again.did_nothing and any("already stored" in n for n in again.notes)
    changed = mem.add([("Who guards the gate?", "Tamsin")])
    assert changed.ids == r.ids[:1] and any("new answer" in n for n in changed.notes)
    assert mem.records[r.ids[0]]["answer"] == "Tamsin" and len(mem.records) == 2
    fact = type(generate_facts(1)[0])("Who guards the gate?", "Tamsin")
    assert greedy(lm, fact, mem) == "Tamsin"


def test_bad_input_fails_before_any_training(lm):
    mem = memory(lm)
    for bad in ([("Q?", "")], [{"prompt": "Q?", "answer": "  "}], [("ok?", "fine"), ("Q?", "")]):
        with pytest.raises(InputError, match="empty"):
            mem.add(bad)
    assert not mem.records and torch.equal(mem.values, torch.zeros_like(mem.values))
    tiny_pool = memory(lm, num_keys=4, slots_per_fact=4)  # 16 slots: 4 facts
    with pytest.raises(InputError, match=r"num_keys=\d+"):
        tiny_pool.add(generate_facts(5))
    assert not tiny_pool.records and not tiny_pool.calibrated


def test_cli_style_input_a_whole_jsonl_file_as_one_string(lm, tmp_path):
    facts = generate_facts(2, seed=9)
    path = save_facts(facts, tmp_path / "f.jsonl")
    mem = memory(lm)
    r = mem.add(path.read_text())
    assert sorted(r.ids) == sorted(f.id for f in facts) and r.details["recall"] == 1.0
    assert load_facts(path)[0]["prompt"] == facts[0].prompt


def test_gate_switch_and_stats(lm):
    mem = memory(lm)
    facts = generate_facts(2, seed=1)
    r = mem.add(facts)
    assert set(r.details["gate"]) >= {"0", "1", "open_tokens", "closed_tokens"} and mem.gate_trained
    ids = lm.chat_ids("How do I boil an egg?")
    bare = lm.logits(ids)
    ungated = lm.logits(ids, memory=mem)
    assert mem.stats()["gate_mean_last"] is None
    mem.gate = True
    lm.logits(ids, memory=mem)
    s = mem.stats()
    assert s["gate"] and 0.0 <= s["gate_mean_last"] <= 1.0 and set(s["gate_mean_last_by_layer"]) == {"0", "1"}
    last = mem.gates["1"].net[-1]
    with torch.no_grad():  # force every gate shut: the model is the bare model, bit for bit
        saved = [g.net[-1].bias.clone() for g in mem.gates.values()]
        for g in mem.gates.values():
            g.net[-1].bias.fill_(-1e4)
        assert torch.equal(lm.logits(ids, memory=mem), bare) and mem.stats()["gate_open_last"] == 0.0
        for g in mem.gates.values():  # force them open: the hard gate gives the ungated memory
            g.net[-1].bias.fill_(1e4)
        torch.testing.assert_close(lm.logits(ids, memory=mem), ungated)
        for g, b in zip(mem.gates.values(), saved):
            g.net[-1].bias.copy_(b)
    assert last.bias.shape == (1,)
    mem.gate = False
    lm.logits(ids, memory=mem)
    assert mem.stats()["gate_mean_last"] is None


def test_untrained_gate_cannot_be_switched_on_silently(lm):
    mem = memory(lm, gate_auto=False)
    mem.add(generate_facts(1))
    mem.gate = True
    with pytest.raises(InputError, match="gate"):
        lm.logits(lm.chat_ids("hi"), memory=mem)
    assert count_hooks(lm.model) == 0
    mem.train_gate(negatives=["A neutral sentence about the weather."], questions=["What time is it?"])
    lm.logits(lm.chat_ids("hi"), memory=mem)


def test_the_gate_add_trains_opens_on_every_stored_fact_and_keeps_the_users_closed_examples(lm, tmp_path):
    """add's gate takes its open examples from the final check of the new facts and encodes the earlier ones
    (the same tokens train_gate finds from scratch); closed examples given once stay for every later training,
    across a reopen."""
    mem = nm.open_memory(tmp_path / "m", lm, kind="pkm", **TINY)
    mem.add_gate_examples(["A neutral sentence about the weather."], questions=["What time is it?"])
    first = mem.add(generate_facts(2, seed=1)).details["gate"]
    second = mem.add(generate_facts(4, seed=2)[2:]).details["gate"]
    assert second["open_tokens"] > first["open_tokens"]
    assert mem.train_gate()["open_tokens"] == second["open_tokens"]  # every stored fact, as a fresh encoding finds
    assert mem.train_gate(max_facts=2)["open_tokens"] < second["open_tokens"]
    closed = second["closed_tokens"]
    assert mem.train_gate(negatives=["Another plain sentence, about rivers."])["closed_tokens"] > closed
    mem.save()
    again = nm.open_memory(tmp_path / "m", lm)
    assert again.gate_examples == {"negatives": ["A neutral sentence about the weather.",
                                                 "Another plain sentence, about rivers."],
                                   "questions": ["What time is it?"]}
    assert again.train_gate()["closed_tokens"] > closed
    with pytest.raises(InputError, match="list of strings"):
        again.add_gate_examples("one string")
    with pytest.raises(InputError, match="non-empty"):
        again.add_gate_examples(["  "])


def test_delete_returns_the_fact_to_the_no_memory_level_and_keeps_the_others(lm):
    mem = memory(lm, max_epochs=200)
    facts = generate_facts(4, seed=2)
    assert mem.add(facts).details["recall"] == 1.0  # every fact is stored before one is deleted
    target, others = facts[0], facts[1:]
    assert greedy(lm, target, mem) == target.answer
    r = mem.delete(target.id)
    d = r.details
    assert r.ids == [target.id] and d["recalled_before"] and not d["recalled_after"]
    assert d["recalled_without_memory"] is False and d["margin_after"] < -mem.config.margin and not r.notes
    assert d["phrasings"] > 1 and d["phrasings_recalled_before"] == d["phrasings"]  # every phrasing unlearned
    assert d["phrasings_recalled_after"] == 0
    assert greedy(lm, target, mem) != target.answer
    margins = mem.recall(others)
    assert bool((margins > 0).all()), margins
    assert target.id not in mem.records and len(mem.records) == 3
    assert mem.delete(target.id).did_nothing
    assert count_hooks(lm.model) == 0


def test_save_open_keeps_facts_signatures_gate_and_outputs(lm, tmp_path):
    mem = nm.open_memory(tmp_path / "m", lm, kind="pkm", **TINY)
    facts = generate_facts(3, seed=4)
    mem.add(facts)
    mem.gate = True
    ids = lm.chat_ids(build_messages(facts[0].prompt, system=mem.config.system))
    before = lm.logits(ids, memory=mem)
    mem.save()
    assert mem.state_dict()["pkm_values_rows"].shape[0] == mem.slots_used()  # only the used rows are written
    again = nm.open_memory(tmp_path / "m", lm)
    assert isinstance(again, PKMMemory) and again.gate and again.gate_trained and again.calibrated
    assert list(again.records) == list(mem.records)
    assert all(torch.equal(again.signatures[k], mem.signatures[k]) for k in mem.records)
    assert torch.equal(again.values, mem.values)
    assert torch.equal(lm.logits(ids, memory=again), before)
    assert again.delete(facts[1].id).ids == [facts[1].id]  # works after a reopen (signatures survived)


def test_only_used_pool_rows_are_saved(lm, tmp_path):
    mem = nm.open_memory(tmp_path / "m", lm, kind="pkm", **{**TINY, "num_keys": 64, "phrasings": 1})
    mem.add(generate_facts(1))
    mem.save()
    rows = mem.state_dict()["pkm_values_rows"]
    assert 0 < rows.shape[0] < mem.num_slots / 4
    assert (tmp_path / "m" / "memory.safetensors").stat().st_size < mem.values.numel() * 4 / 2


def test_default_layers_adapt_to_the_depth():
    assert PKMMemory(tiny_lm(), PKMConfig(num_keys=8, top_k=4)).layer_ids == [0, 1]
    assert PKMMemory(tiny_lm(num_hidden_layers=30), PKMConfig(num_keys=8, top_k=4)).layer_ids == [14, 20, 26]
    with pytest.raises(InputError, match="out of range"):
        PKMMemory(tiny_lm(), PKMConfig(layers=(5,), num_keys=8, top_k=4))
    with pytest.raises(InputError):
        PKMConfig(layers=(1.5,))
    with pytest.raises(InputError):
        PKMConfig(top_k=20, num_keys=8)


def test_the_memory_leaves_the_shared_chat_prefix_untouched(lm):
    """Facts are trained after the chat prefix (system prompt + user header): reading skips it too."""
    mem = memory(lm)
    fact = generate_facts(1)[0]
    mem.add([fact])
    ids = lm.chat_ids(build_messages(fact.prompt, system=mem.config.system))
    n = len(mem.known_prefixes()[0])
    assert ids[0, :n].tolist() == list(mem.known_prefixes()[0])
    bare, with_mem = lm.logits(ids), lm.logits(ids, memory=mem)
    assert torch.equal(with_mem[0, :n], bare[0, :n])
    assert not torch.equal(with_mem[0, n:], bare[0, n:])
    other = lm.chat_ids(build_messages(fact.prompt, system="Another system prompt."))  # only BOS matches: memory from token 1 on
    assert not torch.equal(lm.logits(other, memory=mem)[0, 1:], lm.logits(other)[0, 1:])


def test_with_the_gate_on_the_receipt_also_reports_gated_recall(lm):
    mem = memory(lm, gate=True)
    r = mem.add(generate_facts(2, seed=6))
    assert 0.0 <= r.details["recall_gated"] <= 1.0 and r.details["recall"] == 1.0
    assert "recall_gated" not in memory(lm).add(generate_facts(1)).details


def test_captures_run_in_batches_bounded_by_rows_and_padded_tokens():
    """A capture's forward is one step on a shared model: at most 16 rows and 2,048 padded tokens (a longer
    sequence goes alone), every sequence once, in order."""
    from nativemem.memories.pkm.memory import _token_batches

    seqs = [[1] * n for n in (5, 700, 3, 3000, 10, 10, 10, 10, 600, 600, 600, 600)] + [[2] * 4] * 40
    batches = list(_token_batches(seqs, rows=16, tokens=2048))
    assert [s for b in batches for s in b] == seqs
    for b in batches:
        assert len(b) <= 16
        assert len(b) == 1 or len(b) * max(map(len, b)) <= 2048


def test_each_fact_is_trained_under_several_phrasings_and_the_receipt_says_which(lm):
    facts = generate_facts(3, seed=4)
    d = memory(lm, phrasings=3).add(facts).details
    # 3 forward phrasings each, and a reverse question for the birth city and the employer
    assert d["phrasings"] == 3 and d["trained_phrasings"] == 3 * 3 + 2
    assert d["augmentation"] == {"question templates": 3, "declarative sentences": 3, "reverse questions": 2,
                                 "surface variants": 0}
    assert d["recall"] == 1.0 and d["recall_phrasings"] == 1.0 and d["templates_skipped"] == 0
    one = memory(lm, phrasings=1).add(facts).details
    assert one["trained_phrasings"] == 3 and one["augmentation"]["question templates"] == 0


def test_sentences_stating_an_attribute_are_trained_as_facts_and_as_themselves(lm):
    mem = memory(lm, phrasings=3)
    d = mem.add(["Ada Lind works for Nordic Robotics.", "It rains a lot in Bergen."]).details
    assert d["sentences_as_facts"] == 1 and d["sentences_as_text"] == 1 and d["recall_phrasings"] == 1.0
    Fact = nm.memories.pkm.Fact
    said = Fact("Ada Lind works for Nordic", "Robotics.", chat=False)  # the sentence itself, its last word
    question = Fact("Which company does Ada Lind work for?", "Nordic Robotics")
    assert bool((mem.recall([said, question]) > 0).all())  # greedy decoding reproduces both answers
    assert greedy(lm, question, mem) == "Nordic Robotics"


def test_an_answer_over_the_limit_is_refused_before_training(lm):
    mem = memory(lm, max_answer_tokens=4)
    with pytest.raises(InputError, match="max_answer_tokens=4"):
        mem.add([("What is the long answer?", "one two three four five six seven eight")])
    assert not mem.records and mem.slots_used() == 0


def test_a_phrasing_share_below_one_stops_training_once_that_share_is_recalled(lm):
    from nativemem.memories.pkm.train import PrefixCache

    facts = generate_facts(4, seed=4)
    runs = {}
    for share in (1.0, 0.5):
        # two phrasings and room to converge: at three the tiny model trains at the edge of its capacity, where
        # rounding decides whether share 1 converges in 60 epochs
        mem = memory(lm, phrasings=2, phrasing_recall=share, max_epochs=120)
        items, _ = mem._items(facts, augment=True)
        for it in items:  # no own prompt among them: only the share decides when training stops
            it.kind = "question templates"
        mem._calibrate(items)
        prefixes = PrefixCache(lm.model)
        mem._cache(items, prefixes)
        runs[share] = mem._train(items, prefixes)
    recalled = {share: float((r.margins > 0).float().mean()) for share, r in runs.items()}
    assert runs[1.0].stopped == runs[0.5].stopped == "recalled" and recalled[1.0] == 1.0
    assert 0.5 <= recalled[0.5] < 1.0 and runs[0.5].epochs < runs[1.0].epochs
    # through add, own prompts are always all recalled whatever the share, and the receipt says which share
    d = memory(lm, phrasings=3, phrasing_recall=0.5).add(facts).details
    assert d["recall"] == 1.0 and d["recall_phrasings"] >= 0.5 and d["phrasing_recall_target"] == 0.5
    with pytest.raises(InputError, match="phrasing_recall"):
        PKMConfig(phrasing_recall=0.0)


def train_directly(lm, facts, **kwargs):
    """``train_items`` on the facts' phrasings through a fresh memory's pieces, as ``add`` calls it (no polish)."""
    from nativemem.memories.pkm import train as T

    mem = memory(lm, phrasings=2)
    items, _ = mem._items(facts, augment=True)
    mem._calibrate(items)
    prefixes = T.PrefixCache(lm.model)
    mem._cache(items, prefixes)
    params, opts = mem._trainable()
    for p in params:
        p.requires_grad_(True)
    own = torch.tensor([it.kind == "own prompt" for it in items])
    with T.frozen(lm.model):
        return T.train_items(lm.model, items, mem.lowest_layer, prefixes,
                             memory_scope=lambda: mem._scope(sparse=True), optimizers=opts, params=params,
                             batch_size=4, required=own, **kwargs)


def test_with_a_share_the_stop_rule_reads_the_margins_after_each_epochs_steps_not_before(lm, monkeypatch):
    from nativemem.memories.pkm import train as T

    facts = generate_facts(4, seed=4)
    events: list[tuple[str, set[int]]] = []
    batches, evaluate = T._batches, T.evaluate_items

    def record_batches(items, batch_size, rng):
        events.append(("train", {it.index for it in items}))
        return batches(items, batch_size, rng)

    def record_measure(model, items, *args, **kwargs):
        events.append(("measure", {it.index for it in items}))
        return evaluate(model, items, *args, **kwargs)

    monkeypatch.setattr(T, "_batches", record_batches)
    monkeypatch.setattr(T, "evaluate_items", record_measure)
    for share in (0.9, 1.0):
        events.clear()
        result = train_directly(lm, facts, max_epochs=120, margin=1.0, share=share)
        epochs = [[ids, set()] for kind, ids in events if kind == "train"]
        n = 0
        for kind, ids in events:
            n += kind == "train"
            if kind == "measure" and n:
                epochs[n - 1][1] |= ids
        assert result.stopped == "recalled" and len(epochs) == result.epochs >= 2
        assert len(result.epoch_missed) == len(result.epoch_share) == result.epochs
        assert result.epoch_missed[-1] == 0 and result.epoch_share[-1] >= share
        if share < 1.0:  # every item trained in an epoch (a few: below the sample floor) is measured after it
            assert all(trained <= measured for trained, measured in epochs)
        else:  # with the full rule the loop measures only the items left out (the last epoch: then the final check)
            assert all(not trained & measured for trained, measured in epochs[:-1])


def test_with_a_share_the_epochs_may_leave_a_few_own_prompts_to_the_float32_polish(lm, monkeypatch):
    from nativemem.memories.pkm import memory as M
    from nativemem.memories.pkm import train as T

    facts = generate_facts(4, seed=4)

    def epochs(share, slack, states):  # the stop rule fed these (required missed, share) states, one per epoch
        feed = iter(states)
        monkeypatch.setattr(T, "_stop_state", lambda *a: next(feed))
        r = train_directly(lm, facts, max_epochs=3, margin=100.0, share=share, slack=slack)
        return r.epochs, r.stopped

    assert epochs(0.9, 1, [(3, 0.95), (1, 0.95), (0, 0.95)]) == (2, "recalled")
    assert epochs(0.9, 0, [(3, 0.95), (1, 0.95), (0, 0.95)]) == (3, "recalled")
    assert epochs(0.9, 1, [(1, 0.85), (1, 0.89), (0, 0.85)]) == (3, "max_epochs")  # the share is still needed
    assert epochs(1.0, 1, [(1, 1.0), (1, 1.0), (0, 1.0)]) == (3, "recalled")  # every item: no slack
    monkeypatch.undo()
    # add passes its share of own prompts (rounded down) to its epochs, none to the polish rounds
    calls, train = [], M.train_items
    monkeypatch.setattr(M, "train_items", lambda *a, **k: calls.append(k.get("slack", 0)) or train(*a, **k))
    memory(lm, phrasings=2, phrasing_recall=0.9).add(facts)
    assert calls and not any(calls)  # half a percent of four facts: none left to the polish
    calls.clear()
    monkeypatch.setattr(M, "_POLISH_SLACK", 0.25)
    memory(lm, phrasings=2, phrasing_recall=0.9).add(facts)
    assert calls[0] == 1 and not any(calls[1:])


def test_the_final_check_measures_own_prompts_in_float32_and_other_phrasings_under_the_training_autocast(lm):
    from nativemem.memories.pkm.train import CastWeights, PrefixCache, evaluate_items

    mem = memory(lm, phrasings=3, train_autocast="bfloat16")
    facts = generate_facts(4, seed=2)
    mem.add(facts)
    items, _ = mem._items(facts, augment=True)
    prefixes = PrefixCache(lm.model)
    mem._cache(items, prefixes)
    scope = mem._scope
    exact = [it.kind == "own prompt" for it in items]
    assert 0 < sum(exact) < len(items)
    f32 = evaluate_items(lm.model, items, mem.lowest_layer, prefixes, scope)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = evaluate_items(lm.model, items, mem.lowest_layer, prefixes, scope,
                              weights=CastWeights.of(lm.model, mem.lowest_layer, torch.bfloat16))
    own = torch.tensor(exact)
    for part in (own, ~own):  # the two modes differ on both parts, so the test can tell which one measured them
        assert not torch.allclose(f32[part], bf16[part], rtol=0, atol=1e-5)
    margins, sigs, z = mem._check(items, prefixes, {it.index for it in items}, exact=exact)
    torch.testing.assert_close(margins[own], f32[own], rtol=0, atol=1e-5)
    torch.testing.assert_close(margins[~own], bf16[~own], rtol=0, atol=1e-5)
    assert all(len(s) for s in sigs) and all(sum(len(t) for t in z[i]) for i in mem.layer_ids)
    torch.testing.assert_close(mem._check(items, prefixes)[0], f32, rtol=0, atol=1e-5)  # no flags: all float32
    mem.config.train_autocast = "float32"  # no training autocast: every item in float32 whatever the flags
    torch.testing.assert_close(mem._check(items, prefixes, exact=exact)[0], f32, rtol=0, atol=1e-5)


def test_add_caches_own_prompts_in_float32_and_other_phrasings_under_the_training_autocast(lm):
    from nativemem.memories.pkm.train import PrefixCache

    mem = memory(lm, layers=(1,), phrasings=3, train_autocast="bfloat16")  # layer 1: a cached layer below it
    items, _ = mem._items(generate_facts(4, seed=2), augment=True)
    own = [it.kind == "own prompt" for it in items]
    assert 0 < sum(own) < len(items)
    reference = PrefixCache(lm.model)
    mem._cache(items, reference)
    f32 = [it.hidden.clone() for it in items]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mem._cache(items, reference)
    bf16 = [it.hidden.clone() for it in items]
    prefixes = PrefixCache(lm.model)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # a prefix first met under autocast is kept in float32
        first = prefixes.get(items[0].prefix, 1)
    assert first.layers[0].keys.dtype == torch.float32
    torch.testing.assert_close(first.layers[0].keys, reference.get(items[0].prefix, 1).layers[0].keys)
    mem._cache(items, prefixes, fast=True)
    for it, o, a, b in zip(items, own, f32, bf16):
        assert not torch.allclose(a, b, rtol=0, atol=1e-6)  # the two modes differ, so the test tells which ran
        torch.testing.assert_close(it.hidden, a if o else b, rtol=0, atol=0)
    mem._cache(items, prefixes)  # not fast: everything in float32
    assert all(torch.equal(it.hidden, a) for it, a in zip(items, f32))


def test_what_the_final_check_misses_is_polished_and_only_own_prompts_and_polished_items_are_measured_again(lm):
    from nativemem.memories.pkm.train import PrefixCache

    mem = memory(lm, phrasings=2, max_epochs=120)
    facts = generate_facts(2, seed=4)
    items, _ = mem._items(facts, augment=True)
    mem._calibrate(items)
    prefixes = PrefixCache(lm.model)
    mem._cache(items, prefixes)
    victim = next(it for it in items if it.kind == "own prompt")
    calls, real = [], mem._check

    def check(batch, *args, **kwargs):  # the first (full) pass reports one own prompt missed, as bf16 drift can
        margins, sigs, z = real(batch, *args, **kwargs)
        calls.append(([it.index for it in batch], margins.clone()))
        if len(calls) == 1:
            margins[batch.index(victim)] = -1.0
            sigs[batch.index(victim)] = torch.empty(0, dtype=torch.long)
        return margins, sigs, z

    mem._check = check
    result = mem._train(items, prefixes)
    assert result.stopped == "recalled" and result.polished >= 1 and len(calls) >= 2
    own = sorted(it.index for it in items if it.kind == "own prompt")
    assert all(sorted(c[0]) == own for c in calls[1:])  # own prompts only (the victim is one; a polish may
    # make another slip on a model this small, and the next round polishes that one)
    assert bool((result.margins > 0).all())  # measured again: the polished prompt and every other is recalled
    others = [it.index for it in items if it.kind != "own prompt"]
    torch.testing.assert_close(result.margins[others], calls[0][1][others])  # kept from the full pass
    assert len(result.signatures[victim.index])  # its rows read come from a later pass


def test_recalled_enough_needs_every_required_item_and_the_share():
    from nativemem.memories.pkm.train import recalled_enough

    m = torch.tensor([1.0, 0.5, -0.2, 2.0])
    own = torch.tensor([True, False, False, True])
    assert not recalled_enough(m) and recalled_enough(m, 0.75) and not recalled_enough(m, 0.8)
    assert recalled_enough(m, 0.5, own) and not recalled_enough(m, 0.5, torch.tensor([False, False, True, False]))


def test_with_a_share_each_epoch_checks_the_required_items_and_a_part_of_the_others():
    import random

    from nativemem.memories.pkm.train import Item, _SampleCheck

    items = [Item(i, [1, 2, 3], 1, 0) for i in range(30)]
    required = torch.tensor([i < 3 for i in range(30)])
    sampler = _SampleCheck(items, required, 3, random.Random(0))
    for epoch in range(9):
        trained = {epoch, epoch + 10}  # two items trained this epoch: fresh, not checked
        rest = [it for it in items if it.index not in trained]
        check, unchecked = sampler.take(rest)
        ids = [it.index for it in check]
        assert len(ids) == len(set(ids)) and not trained & set(ids)
        assert {0, 1, 2} - trained <= set(ids)  # every required item left out, every epoch
        assert len(ids) - len({0, 1, 2} - trained) == math.ceil((len(rest) - len({0, 1, 2} - trained)) / 3)
        assert sorted(ids + [it.index for it in unchecked]) == sorted(it.index for it in rest)


def test_the_sample_checks_own_prompts_near_the_margin_every_epoch_and_no_more_others_than_it_trained():
    import random

    from nativemem.memories.pkm.train import Item, _SampleCheck

    items = [Item(i, [1, 2, 3], 1, 0) for i in range(60)]
    required = torch.tensor([i < 12 for i in range(60)])
    margins = torch.tensor([1.5] * 4 + [5.0] * 8 + [2.0] * 48)  # items 0-3 near the margin, 4-11 well above it
    sampler = _SampleCheck(items, required, 4, random.Random(0), margins=margins, sure=3.0, floor=5)
    seen: dict[int, int] = {i: 0 for i in range(60)}
    for _ in range(8):
        check, unchecked = sampler.take(items, trained=3)
        ids = [it.index for it in check]
        assert len(ids) == len(set(ids)) and sorted(ids + [it.index for it in unchecked]) == list(range(60))
        assert {0, 1, 2, 3} <= set(ids)  # near the margin: every epoch
        assert sum(4 <= i < 12 for i in ids) == 2  # well above it: a quarter of them, rotating
        assert sum(i >= 12 for i in ids) == 5  # the rest: capped at max(trained, floor), not 48 / 4 = 12
        for i in ids:
            seen[i] += 1
    assert all(seen[i] == 2 for i in range(4, 12))  # each held own prompt once in every four epochs
    check, _ = sampler.take(items, trained=40)
    assert sum(it.index >= 12 for it in check) == 12  # never more than 1/every of the rest


def test_the_sample_of_the_rest_is_drawn_anew_each_epoch_so_its_slips_are_those_of_the_unchecked():
    """The stop rule discounts the unchecked items by the share of the sample that slipped: a sample that
    avoids the items checked lately (a rotating queue) holds the items unmeasured longest and slips more."""
    import random

    from nativemem.memories.pkm.train import Item, _SampleCheck

    items = [Item(i, [1, 2, 3], 1, 0) for i in range(400)]
    sampler = _SampleCheck(items, None, 4, random.Random(0), floor=40)
    last_checked = {i: 0 for i in range(400)}
    again, ages_checked, ages_unchecked = 0, [], []
    previous: set[int] = set()
    for epoch in range(1, 201):
        check, unchecked = sampler.take(items, trained=0)
        ids = {it.index for it in check}
        assert len(ids) == 40
        again += len(ids & previous)
        if epoch > 100:
            ages_checked += [epoch - last_checked[i] for i in ids]
            ages_unchecked += [epoch - last_checked[it.index] for it in unchecked]
        for i in ids:
            last_checked[i] = epoch
        previous = ids
    assert 0.5 * 0.1 < again / (199 * 40) < 1.5 * 0.1  # an item just checked is drawn again at the sample's rate
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    assert abs(mean(ages_checked) - mean(ages_unchecked)) < 0.1 * mean(ages_unchecked)


def test_the_stop_rule_discounts_unchecked_items_by_the_share_of_the_sample_that_slipped():
    from nativemem.memories.pkm.train import Item, _stop_state

    items = [Item(i, [1, 2, 3], 1, 0) for i in range(10)]
    pos = {id(it): i for i, it in enumerate(items)}
    margins = torch.tensor([1.0] * 9 + [-1.0])  # 0.9 recalled as measured
    required = torch.tensor([True] + [False] * 9)
    assert _stop_state(margins, required, None, pos) == (0, 0.9)
    assert _stop_state(margins, required, (0.25, items[5:9]), pos) == (0, 0.8)  # 9 - 0.25 * 4 = 8 expected
    assert _stop_state(margins, required, (0.25, items[6:]), pos) == (0, 0.825)  # item 9 was not recalled anyway
    assert _stop_state(torch.tensor([-1.0] + [1.0] * 9), required, None, pos) == (1, 0.9)  # a required item missed
    assert _stop_state(margins, None, None, pos) == (0, 0.9)


def test_the_slip_rate_counts_recalled_items_that_slipped_leaving_required_ones_out():
    from nativemem.memories.pkm.train import _slip_rate

    before = torch.tensor([1.0, 1.0, 1.0, 1.0, -1.0, 1.0])
    after = torch.tensor([1.0, -0.5, 0.0, 2.0, -1.0, -3.0])
    required = torch.tensor([False, False, False, False, False, True])
    assert _slip_rate(before, after, required) == 0.5  # 2 of the 4 recalled, not required ones slipped
    assert _slip_rate(before, after, None) == 0.6  # 3 of 5 when nothing is required
    assert _slip_rate(torch.full((6,), -1.0), after, None) == 0.0 and _slip_rate(before[:1], after[:1], None) == 0.0
