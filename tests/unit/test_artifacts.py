"""domain.paths.sha256_tree: the one folder digest (dot-files skipped) and its users agree on it."""

from __future__ import annotations

from domain import consistency
from domain.artifacts import publish_dir
from domain.paths import data_root, sha256_tree


def _folder(root, name="model"):
    folder = root / name
    (folder / "sub").mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "sub" / "weights.bin").write_bytes(b"\x00\x01" * 100)
    return folder


def test_sha256_tree_skips_dot_files_but_sees_names_and_contents(tmp_path):
    folder = _folder(tmp_path)
    before = sha256_tree(folder)
    (folder / ".cache-lock").write_text("written after the fact")
    (folder / "sub" / ".hidden").write_text("also skipped")
    assert sha256_tree(folder) == before
    (folder / "sub" / "weights.bin").write_bytes(b"\x00\x02" * 100)
    changed = sha256_tree(folder)
    assert changed != before
    (folder / "sub" / "weights.bin").rename(folder / "sub" / "other.bin")
    assert sha256_tree(folder) not in (before, changed)


def test_published_folder_matches_its_recorded_digest_in_the_consistency_check(sqlite_ledger):
    staging = _folder(data_root(), ".job-1.tmp")
    digest = sha256_tree(staging)
    dest = data_root() / "quantized" / "job-1"
    publish_dir(staging, dest)
    (dest / ".lock").write_text("x")
    assert not staging.exists()
    assert consistency.file_matches("quantized/job-1", digest) == (True, "sha256 mismatch")
    assert consistency.file_matches("quantized/job-1", "0" * 64)[0] is False
