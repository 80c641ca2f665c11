"""The checkout itself: no tracked text file holds an unresolved merge."""
import re
import subprocess

from tests.helpers import ROOT

# NOTE: git's conflict markers: <<<<<<< ours, ||||||| base (diff3), =======, >>>>>>> theirs, each at a line's start
MARKER = re.compile(rb"^(<{7}|\|{7}|>{7})( |$)", re.M)


def tracked_files() -> list:
    """The files git tracks in the checkout (every file but caches when it is not a git checkout)."""
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=False)
    if listed.returncode == 0 and listed.stdout:
        return [ROOT / name for name in listed.stdout.decode().split("\0") if name]
    skip = {".git", "__pycache__", ".pytest_cache", "runs", "demo_data", ".whl"}
    return [p for p in ROOT.rglob("*") if p.is_file() and not skip & set(p.relative_to(ROOT).parts)]


def conflicted_lines(data: bytes) -> list:
    """Line numbers of merge-conflict markers in a text (a file with a NUL byte is binary: none)."""
    if b"\0" in data:
        return []
    return [data.count(b"\n", 0, m.start()) + 1 for m in MARKER.finditer(data)]


def test_conflict_markers_are_found():
    text = b"# Benchmarks\n<<<<<<< HEAD\n## 5. GPU\n=======\n## 6. CPU\n>>>>>>> anyphotos\nend\n"
    assert conflicted_lines(text) == [2, 6]
    assert conflicted_lines(b"a\n||||||| base\nb\n") == [2]
    assert conflicted_lines(b"Title\n=======\n<<<<<<<<<< not a marker\n") == []
    assert conflicted_lines(b"\0<<<<<<< binary\n") == []


def test_no_tracked_text_file_holds_merge_conflict_markers():
    files = tracked_files()
    assert any(p.name == "BENCHMARKS.md" for p in files) and len(files) > 50
    found = {str(p.relative_to(ROOT)): lines for p in files if p.is_file()
             for lines in [conflicted_lines(p.read_bytes())] if lines}
    assert not found, f"unresolved merge conflicts (file: lines): {found}"
