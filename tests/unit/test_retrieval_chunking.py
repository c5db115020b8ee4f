"""Chunking: code along function/class boundaries, text by size with overlap, stable ids and content hashes."""

from domain.retrieval.chunking import MAX_CHARS, brace_pieces, chunk_document, size_pieces

PY = '''import os
import sys

CONSTANT = 3


def first(a, b):
    """Add two numbers."""
    return a + b


@decorator
def second(x):
    return x * 2


class Greeter:
    def hello(self):
        return "hi"
'''


def test_python_split_along_functions_and_classes():
    chunks = chunk_document("m.py", PY, path="m.py")
    symbols = [c.symbol for c in chunks]
    assert symbols == ["first", "second", "Greeter"]  # the short import block is glued to the next piece
    assert chunks[0].text.startswith("import os") and "def first" in chunks[0].text
    assert chunks[1].text.startswith("@decorator\ndef second")  # decorators stay with their function
    assert chunks[1].start_line == 12
    assert "".join(c.text for c in chunks) == PY  # a partition: nothing lost, nothing repeated
    assert all(c.language == "python" and c.document_id == "m.py" for c in chunks)
    assert [c.id for c in chunks] == [f"m.py#{i}" for i in range(3)]


def test_big_class_is_split_into_methods():
    methods = "".join(f"    def m{i}(self):\n" + "        x = 1\n" * 40 + f"        return {i}\n" for i in range(6))
    text = "class Big:\n    '''doc'''\n" + methods
    chunks = chunk_document("big", text, language="python")
    assert [c.symbol for c in chunks][:3] == ["Big", "Big.m0", "Big.m1"]
    assert all(len(c.text) <= MAX_CHARS for c in chunks)


def test_unparsable_python_falls_back_to_size():
    chunks = chunk_document("bad", "def broken(:\n  pass\n" * 10, language="python")
    assert len(chunks) == 1 and chunks[0].symbol is None


def test_content_hash_is_stable_and_position_independent():
    a = chunk_document("d", PY, path="m.py")
    b = chunk_document("d", PY.replace("return a + b", "return a - b"), path="m.py")
    assert [c.content_hash for c in a][1:] == [c.content_hash for c in b][1:]
    assert a[0].content_hash != b[0].content_hash
    assert chunk_document("other-id", PY, path="m.py")[1].content_hash == a[1].content_hash


def test_text_split_by_size_with_overlap():
    words = " ".join(f"word{i}" for i in range(2000))
    pieces = size_pieces(words, max_chars=500, overlap=100)
    assert all(len(p) <= 500 for p in pieces)
    assert len(pieces) > len(words) // 500
    for a, b in zip(pieces, pieces[1:]):
        assert a[-50:].split()[-1] in b  # consecutive windows overlap
    assert pieces[0].startswith("word0 ") and pieces[-1].rstrip().endswith("word1999")
    doc = chunk_document("notes", words, source="doc")
    assert len(doc) > 1 and all(c.source == "doc" and c.language is None for c in doc)


def test_brace_languages_split_at_top_level_blocks():
    go = """package main

import "fmt"

func add(a int, b int) int {
\tif a > 0 {
\t\treturn a + b
\t}
\treturn b
}

func main() {
\tfmt.Println(add(1, 2))
}
"""
    chunks = chunk_document("main.go", go, path="main.go")
    assert [c.symbol for c in chunks][-2:] == ["add", "main"]
    assert chunks[-2].text.rstrip().endswith("}") and "return b" in chunks[-2].text
    js = "function a() {\n  return {x: 1};\n}\n\nclass B {\n  m() { return '}'; }\n}\n"
    assert [p[0] for p in brace_pieces(js)] == ["a", "B"]
