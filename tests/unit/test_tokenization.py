from distserve.engine.models import byte_tokenizer
from distserve.tokenization import IncrementalDetokenizer


def test_multibyte_characters_split_across_tokens_come_out_whole():
    tok = byte_tokenizer()
    text = "héllo wörld ✓ 日本語 🙂"
    ids = tok(text)["input_ids"]
    assert len(ids) > len(text)  # the byte tokenizer splits every non-ASCII character
    d = IncrementalDetokenizer(tok)
    deltas = [d.add([i]) for i in ids]
    deltas.append(d.flush())
    assert "".join(deltas) == text
    assert all("\ufffd" not in x for x in deltas)
    assert deltas[ids.index(tok("🙂")["input_ids"][0]):].count("") >= 3  # 4-byte emoji held back until whole


def test_batches_of_tokens_and_flush_of_a_dangling_byte():
    tok = byte_tokenizer()
    ids = tok("naïve")["input_ids"]
    d = IncrementalDetokenizer(tok)
    assert d.add(ids[:3]) == ""  # the batch ends inside ï: held back until the character is whole
    assert d.add(ids[3:]) == "naïve"
    d2 = IncrementalDetokenizer(tok)
    d2.add(ids[:3])
    assert d2.flush() == "na\ufffd"  # at the end, what is left comes out, a dangling byte as U+FFFD
