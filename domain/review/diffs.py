"""A unified diff as the analyzers see it: for each changed file, its new side with every hunk line at its
line number in the new file (lines the diff does not show are blank), the added lines, and where each
new-file line is in the diff text (the review numbers the diff's own lines)."""

from __future__ import annotations

from dataclasses import dataclass, field

from unidiff import PatchSet
from unidiff.errors import UnidiffParseError


@dataclass
class ChangedFile:
    path: str
    text: str  # the new side, blank where the diff shows nothing
    added: set[int] = field(default_factory=set)  # new-file line numbers added by the diff
    diff_line: dict[int, int] = field(default_factory=dict)  # new-file line → 1-based line in the diff text


def changed_files(diff: str) -> list[ChangedFile]:
    try:
        patch = PatchSet(diff.splitlines(keepends=True))
    except UnidiffParseError:
        return []
    files = []
    for pf in patch:
        if pf.is_removed_file or pf.is_binary_file:
            continue
        lines: dict[int, str] = {}
        cf = ChangedFile(path=(pf.target_file or pf.path).removeprefix("b/"), text="")
        for hunk in pf:
            for line in hunk:
                if line.target_line_no is None:
                    continue
                lines[line.target_line_no] = line.value.rstrip("\n")
                if line.diff_line_no is not None:
                    cf.diff_line[line.target_line_no] = line.diff_line_no
                if line.is_added:
                    cf.added.add(line.target_line_no)
        last = max(lines, default=0)
        cf.text = "\n".join(lines.get(i, "") for i in range(1, last + 1)) + "\n"
        files.append(cf)
    return files
