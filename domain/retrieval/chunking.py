"""Split documents into chunks: code along function/class boundaries, text by size with overlap.

Each chunk carries a content hash (of its text and where it came from), so re-indexing a document whose
chunks did not change reuses their embeddings instead of computing them again.
"""

from __future__ import annotations

import ast
import hashlib
import re
from dataclasses import asdict, dataclass, field

MAX_CHARS = 2000  # a chunk longer than this is split by size (MiniLM reads ~256 tokens anyway)
OVERLAP = 200
MIN_CHARS = 40  # smaller pieces (a lone import, a blank gap) are merged into their neighbour

CODE_LANGUAGES = {"python", "py", "javascript", "js", "typescript", "ts", "java", "go", "c", "cpp", "c++", "csharp",
                  "c#", "rust", "kotlin", "scala", "swift", "php", "ruby", "rb"}
EXTENSIONS = {".py": "python", ".js": "javascript", ".jsx": "javascript", ".ts": "typescript", ".tsx": "typescript",
              ".java": "java", ".go": "go", ".c": "c", ".h": "c", ".cc": "cpp", ".cpp": "cpp", ".hpp": "cpp",
              ".cs": "csharp", ".rs": "rust", ".kt": "kotlin", ".scala": "scala", ".swift": "swift", ".php": "php",
              ".rb": "ruby"}


@dataclass
class Chunk:
    id: str  # "<document id>#<n>": stable for the same document and position
    document_id: str
    text: str
    content_hash: str
    source: str | None = None
    language: str | None = None
    path: str | None = None
    symbol: str | None = None  # function/class name when split along code boundaries
    start_line: int | None = None
    metadata: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)


def content_hash(text: str, path: str | None = None) -> str:
    return hashlib.sha256(f"{path or ''}\0{text}".encode()).hexdigest()


def guess_language(language: str | None, path: str | None) -> str | None:
    if language:
        return language.lower()
    if path:
        for ext, lang in EXTENSIONS.items():
            if path.lower().endswith(ext):
                return lang
    return None


def chunk_document(doc_id: str, text: str, *, source: str | None = None, language: str | None = None,
                   path: str | None = None, metadata: dict | None = None,
                   max_chars: int = MAX_CHARS, overlap: int = OVERLAP) -> list[Chunk]:
    """The chunks of one document, in order."""
    lang = guess_language(language, path)
    by_size = lambda: [(None, line, part) for line, part in _with_lines(text, size_pieces(text, max_chars, overlap))]  # noqa: E731
    if lang in ("python", "py"):
        pieces = python_pieces(text) or by_size()
    elif lang in CODE_LANGUAGES:
        pieces = brace_pieces(text) or by_size()
    else:
        pieces = by_size()
    final: list[tuple[str | None, int | None, str]] = []
    for symbol, line, piece in pieces:
        if len(piece) > max_chars:
            final.extend((symbol, line, p) for p in size_pieces(piece, max_chars, overlap))
        else:
            final.append((symbol, line, piece))
    chunks = []
    for n, (symbol, line, piece) in enumerate(p for p in final if p[2].strip()):
        chunks.append(Chunk(id=f"{doc_id}#{n}", document_id=doc_id, text=piece, content_hash=content_hash(piece, path),
                            source=source, language=lang, path=path, symbol=symbol, start_line=line,
                            metadata=dict(metadata or {})))
    return chunks


def python_pieces(text: str) -> list[tuple[str | None, int, str]]:
    """Top-level functions and classes (a big class is split into its methods); the code between them
    (imports, constants) forms its own pieces. Empty if the text does not parse."""
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return []
    lines = text.splitlines(keepends=True)
    spans: list[tuple[str | None, int, int]] = []  # (symbol, first line index, end line index exclusive)
    for node in tree.body:
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue
        start = min([node.lineno] + [d.lineno for d in node.decorator_list]) - 1
        end = node.end_lineno or node.lineno
        body = "".join(lines[start:end])
        if isinstance(node, ast.ClassDef) and len(body) > MAX_CHARS:
            methods = [m for m in node.body if isinstance(m, (ast.FunctionDef, ast.AsyncFunctionDef))]
            cursor = start
            for m in methods:
                m_start = min([m.lineno] + [d.lineno for d in m.decorator_list]) - 1
                if m_start > cursor:
                    spans.append((node.name, cursor, m_start))
                spans.append((f"{node.name}.{m.name}", m_start, m.end_lineno or m.lineno))
                cursor = m.end_lineno or m.lineno
            if cursor < end:
                spans.append((node.name, cursor, end))
        else:
            spans.append((node.name, start, end))
    pieces: list[tuple[str | None, int, str]] = []
    cursor = 0
    for symbol, start, end in spans:
        if start > cursor:
            pieces.append((None, cursor + 1, "".join(lines[cursor:start])))
        pieces.append((symbol, start + 1, "".join(lines[start:end])))
        cursor = end
    if cursor < len(lines):
        pieces.append((None, cursor + 1, "".join(lines[cursor:])))
    return _merge_small(pieces)


_BLOCK_START = re.compile(r"^\S.*(\{\s*|\bdo\s*|:\s*)$")
_SYMBOL = re.compile(r"\b(?:func|function|fn|def|class|struct|interface|impl|enum|trait|module)\s+([A-Za-z_][\w.]*)"
                     r"|([A-Za-z_]\w*)\s*\([^;]*\)\s*(?:->\s*[\w<>\[\], &*]+\s*)?(?:\w+\s*)*\{\s*$")


def brace_pieces(text: str) -> list[tuple[str | None, int, str]]:
    """Split brace/indent languages at top-level block boundaries: a new piece starts at an unindented line
    when the running brace depth is zero. A heuristic, good enough for C-like and Go/Rust/JS/Java code."""
    lines = text.splitlines(keepends=True)
    pieces: list[tuple[str | None, int, str]] = []
    depth, start = 0, 0
    for i, line in enumerate(lines):
        stripped = line.strip()
        if depth == 0 and i > start and line[:1].strip() and not stripped.startswith(("}", ")", "]", "//", "*", "#", "@")):
            prev = "".join(lines[start:i])
            if prev.strip():
                pieces.append((_symbol_of(prev), start + 1, prev))
                start = i
        code = re.sub(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|//.*$', "", line)
        depth = max(0, depth + code.count("{") - code.count("}"))
    tail = "".join(lines[start:])
    if tail.strip():
        pieces.append((_symbol_of(tail), start + 1, tail))
    return _merge_small(pieces)


def _symbol_of(block: str) -> str | None:
    for line in block.splitlines()[:5]:
        m = _SYMBOL.search(line)
        if m:
            return m.group(1) or m.group(2)
    return None


def _merge_small(pieces: list[tuple[str | None, int, str]]) -> list[tuple[str | None, int, str]]:
    """Glue blank gaps to the previous piece and pieces shorter than MIN_CHARS (imports, a closing brace)
    to the following one, so the pieces still partition the text."""
    out: list[tuple[str | None, int, str]] = []
    carry: tuple[int, str] | None = None
    for symbol, line, piece in pieces:
        if not piece.strip() and out and carry is None:
            out[-1] = (out[-1][0], out[-1][1], out[-1][2] + piece)
            continue
        if carry is not None:
            line, piece = carry[0], carry[1] + piece
            carry = None
        if len(piece.strip()) < MIN_CHARS and symbol is None:
            carry = (line, piece)
            continue
        out.append((symbol, line, piece))
    if carry is not None:
        if out:
            symbol, line, piece = out[-1]
            out[-1] = (symbol, line, piece + carry[1])
        else:
            out.append((None, carry[0], carry[1]))
    return out


def size_pieces(text: str, max_chars: int = MAX_CHARS, overlap: int = OVERLAP) -> list[str]:
    """Windows of at most ``max_chars`` characters overlapping by ``overlap``, cut at a line or word end
    when one is near."""
    if len(text) <= max_chars:
        return [text]
    overlap = min(overlap, max_chars // 2)
    pieces, start = [], 0
    while start < len(text):
        end = min(len(text), start + max_chars)
        if end < len(text):
            cut = max(text.rfind("\n", start + max_chars // 2, end), text.rfind(" ", start + max_chars // 2, end))
            if cut > start:
                end = cut + 1
        pieces.append(text[start:end])
        if end >= len(text):
            break
        start = max(end - overlap, start + 1)
    return pieces


def _with_lines(text: str, pieces: list[str]) -> list[tuple[int, str]]:
    out, pos = [], 0
    for p in pieces:
        at = text.find(p, pos)
        at = at if at >= 0 else pos
        out.append((text.count("\n", 0, at) + 1, p))
        pos = at + 1
    return out
