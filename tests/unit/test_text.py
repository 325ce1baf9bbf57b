"""Text checks reject unusable input with specific messages; chunking respects the budget."""

import pytest

from nativemem.errors import InputError
from nativemem.text import check_text, chunk_text, split_sentences


def words(s):
    return len(s.split())


@pytest.mark.parametrize(
    "bad, message",
    [("", "is empty"), ("  \n\t", "only whitespace"), (b"\xff\xfeabc", "not valid UTF-8"),
     ("abc\x00def", "binary"), (123, "must be a string")],
)
def test_check_text_rejects(bad, message):
    with pytest.raises(InputError, match=message):
        check_text(bad)


def test_check_text_size_limit_and_bytes():
    assert check_text("héllo".encode()) == "héllo"
    with pytest.raises(InputError, match="too large"):
        check_text("x" * 11, max_chars=10)


def test_sentences_and_chunks_keep_all_words_within_budget():
    text = ("Marie Curie was born in Warsaw. She moved to Paris! Did she win prizes? Yes, two of them.\n\n"
            "A new paragraph starts here. " + "word " * 30)
    sents = split_sentences(text)
    assert sents[0] == "Marie Curie was born in Warsaw." and sents[2] == "Did she win prizes?"
    chunks = chunk_text(text, 8, words)
    assert all(words(c) <= 8 for c in chunks)
    assert " ".join(chunks).split() == text.split()
    assert chunks[0] == "Marie Curie was born in Warsaw."


def test_chunk_cuts_overlong_word():
    chunks = chunk_text("a" * 50, 3, lambda s: (len(s) + 9) // 10)
    assert "".join(chunks) == "a" * 50 and all(len(c) <= 30 for c in chunks)


def test_unspaced_cjk_text_chunks_in_linear_work_and_splits_on_cjk_full_stops():
    """A long run with no spaces used to be re-counted whole at every cut (quadratic). Now each cut searches
    a bounded window: the characters counted grow linearly with the text."""
    counted = []

    def tokens(s):  # byte-level-ish: about one token per CJK character
        counted.append(len(s))
        return len(s.encode("utf-8")) // 3 + 1

    run = "汉字文本没有空格" * 12_500  # 100,000 characters, no spaces, no sentence end
    chunks = chunk_text(run, 256, tokens)
    assert "".join(chunks) == run and all(tokens(c) <= 256 for c in chunks)
    assert len(chunks) == pytest.approx(100_000 / 255, rel=0.02)  # each cut takes (nearly) a full budget
    assert sum(counted) < 40 * len(run)  # linear: a bounded window, log-many counts per cut
    assert split_sentences("第一句。第二句！第三句？最后") == ["第一句。", "第二句！", "第三句？", "最后"]


def test_a_run_is_cut_from_one_tokenisation_with_one_count_per_piece():
    """With the tokenizer's offsets, each piece of an unspaced run ends at its max_tokens-th token and is checked
    by one count; a piece that counts over on its own gives tokens back until it fits."""
    calls = []

    def count(s):  # two characters per token, but "XY" merges into one token only inside a longer text
        calls.append(len(s))
        return (len(s) + 1) // 2

    def ends(s):
        return list(range(2, len(s), 2)) + [len(s)]

    run = "汉字" * 5_000
    chunks = chunk_text(run, 100, count, token_ends=ends)
    assert "".join(chunks) == run and all(count(c) <= 100 for c in chunks)
    assert [len(c) for c in chunks[:-1]] == [200] * (len(chunks) - 1)
    calls.clear()
    chunk_text(run, 100, count, token_ends=ends)
    assert len(calls) <= len(chunks) + 3  # one count per piece (plus three of the whole run, as a sentence)

    def strict(s):  # a piece counts one token more on its own than inside the run: one token is given back
        return (len(s) + 1) // 2 + 1

    chunks = chunk_text(run, 100, strict, token_ends=ends)
    assert "".join(chunks) == run and all(strict(c) <= 100 for c in chunks)
