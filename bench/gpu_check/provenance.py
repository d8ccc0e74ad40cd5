"""Which code ran: the commit under test, recorded so that a stale `.git` cannot lie about it.

The device machine receives a copy of the working tree with a `.git` that may be stale (the H200
run of 2026-11-30 reported 2722551 for code at dae53ae). So the report identifies the code by
two records, neither of which reads `.git` on the device:

1. **The source tree hash** (always): sha256 over the sorted paths and sha256 contents of the
   files that make up the code under test (`*.py` under lambda_grpo/, bench/, tests/, plus
   Makefile, pyproject.toml, setup.py; bench/results/ and __pycache__ excluded), computed on
   the device from the files that actually ran. `python -m bench.gpu_check --find-commit HASH`
   on a development checkout walks the recent commits of every branch (from git's objects, no
   checkout) and names the one(s) with that hash; none means uncommitted code ran.
2. **The stamp** (when shipped): `python -m bench.gpu_check --stamp` (`make gpu-stamp`), run on
   the development machine just before the copy is shipped, writes
   bench/results/commit-under-test.json: `git rev-parse HEAD`, the branch, a dirty flag with the
   changed files, and the tree hash at that moment. bench/results/ is git-ignored, so the stamp
   travels only when named (the device tool's `carry`). The report trusts the stamp's commit only
   when its tree hash equals the one computed on the device, and says "stale stamp" otherwise.

What `git rev-parse HEAD` says on the device is reported too, labelled unreliable.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import subprocess
import sys
from typing import Dict, Iterable, List, Tuple

# no torch import here: `--stamp` and `--find-commit` run with any python3 and git
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

ROOTS = ("lambda_grpo", "bench", "tests")
TOP_FILES = ("Makefile", "pyproject.toml", "setup.py")
STAMP = os.path.join("bench", "results", "commit-under-test.json")


def counted(path: str) -> bool:
    """Whether a repository-relative path is part of the code under test."""
    parts = path.replace(os.sep, "/").split("/")
    if "__pycache__" in parts or path.replace(os.sep, "/").startswith("bench/results/"):
        return False
    if len(parts) == 1:
        return parts[0] in TOP_FILES
    return parts[0] in ROOTS and parts[-1].endswith(".py")


def _digest(items: Iterable[Tuple[str, str]]) -> str:
    h = hashlib.sha256()
    for path, blob_sha in sorted(items):
        h.update(f"{path}\0{blob_sha}\n".encode())
    return h.hexdigest()[:16]


def tree_hash(root: str = REPO) -> Tuple[str, int]:
    """(hash, number of files) of the code under test as it is on this disk."""
    items = []
    for top in TOP_FILES:
        p = os.path.join(root, top)
        if os.path.isfile(p):
            with open(p, "rb") as f:
                items.append((top, hashlib.sha256(f.read()).hexdigest()))
    for base in ROOTS:
        for d, dirs, files in os.walk(os.path.join(root, base)):
            dirs[:] = sorted(x for x in dirs if x != "__pycache__")
            for name in files:
                rel = os.path.relpath(os.path.join(d, name), root).replace(os.sep, "/")
                if counted(rel):
                    with open(os.path.join(root, rel), "rb") as f:
                        items.append((rel, hashlib.sha256(f.read()).hexdigest()))
    return _digest(items), len(items)


def _git(*args: str, root: str = REPO) -> str:
    try:
        res = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=30)
        return res.stdout.strip() if res.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def write_stamp(root: str = REPO) -> Dict[str, object]:
    """bench/results/commit-under-test.json from the development checkout (see the module docstring)."""
    status = [ln for ln in _git("status", "--porcelain", "--untracked-files=all", root=root).splitlines()
              if counted(ln[3:].strip().strip('"').split(" -> ")[-1])]
    th, n = tree_hash(root)
    stamp = {"commit": _git("rev-parse", "HEAD", root=root) or "?",
             "branch": _git("rev-parse", "--abbrev-ref", "HEAD", root=root) or "?",
             "subject": _git("log", "-1", "--format=%s", root=root)[:120],
             "dirty": bool(status), "dirty_files": [ln[3:] for ln in status[:30]], "tree": th, "files": n,
             "written_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
    path = os.path.join(root, STAMP)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(stamp, f, indent=1)
    return stamp


def code_record(root: str = REPO) -> Dict[str, str]:
    """What the report says about the code under test (meta fields, all strings)."""
    th, n = tree_hash(root)
    rec = {"tree_hash": th, "tree_files": str(n),
           "git_head_here": (_git("rev-parse", "--short", "HEAD", root=root) or "?") + " (this machine's .git: "
                            "unreliable on the device machine)"}
    stamp = None
    path = os.path.join(root, STAMP)
    if os.path.isfile(path):
        try:
            with open(path) as f:
                stamp = json.load(f)
        except (OSError, ValueError):
            stamp = None
    if stamp is None:
        rec["commit"] = "unknown (no stamp shipped): find it with --find-commit " + th
        rec["code"] = f"tree {th}"
    elif stamp.get("tree") == th:
        dirty = " + uncommitted changes (" + ", ".join(stamp.get("dirty_files", [])[:6]) + ")" \
            if stamp.get("dirty") else ""
        rec["commit"] = (f"{str(stamp.get('commit'))[:12]} on {stamp.get('branch')}{dirty} (stamp verified: same "
                         "tree hash)")
        rec["code"] = f"{str(stamp.get('commit'))[:12]}{'+dirty' if stamp.get('dirty') else ''} tree {th}"
    else:
        rec["commit"] = (f"unknown: the shipped stamp names {str(stamp.get('commit'))[:12]} but its tree hash "
                         f"{stamp.get('tree')} differs from this tree's {th} (stale stamp); --find-commit {th}")
        rec["code"] = f"tree {th} (stale stamp)"
    return rec


class _Blobs:
    """sha256 of git blobs, read through one `git cat-file --batch` process."""

    def __init__(self, root: str):
        self.proc = subprocess.Popen(["git", "cat-file", "--batch"], cwd=root, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE)
        self.cache: Dict[str, str] = {}

    def sha256(self, oid: str) -> str:
        if oid not in self.cache:
            self.proc.stdin.write(oid.encode() + b"\n")
            self.proc.stdin.flush()
            size = int(self.proc.stdout.readline().split()[2])
            data = self.proc.stdout.read(size)
            self.proc.stdout.read(1)  # the newline after the object
            self.cache[oid] = hashlib.sha256(data).hexdigest()
        return self.cache[oid]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def commit_tree_hash(rev: str, root: str = REPO, blobs: "_Blobs | None" = None) -> str:
    """The tree hash of a commit's code, from git's objects (no checkout)."""
    own = blobs is None
    blobs = blobs or _Blobs(root)
    try:
        items = []
        for line in _git("ls-tree", "-r", rev, root=root).splitlines():
            meta, path = line.split("\t", 1)
            _, kind, oid = meta.split()
            if kind == "blob" and counted(path):
                items.append((path, blobs.sha256(oid)))
        return _digest(items)
    finally:
        if own:
            blobs.close()


def find_commits(target: str, max_count: int = 300, root: str = REPO) -> List[str]:
    """Commits whose code has tree hash `target`: the last max_count of this checkout's history first,
    then the newest max_count of every branch."""
    revs = list(dict.fromkeys(_git("rev-list", f"--max-count={max_count}", "HEAD", root=root).split() +
                              _git("rev-list", "--all", f"--max-count={max_count}", root=root).split()))
    found = []
    if not revs:
        return found
    blobs = _Blobs(root)
    try:
        for rev in revs:
            if commit_tree_hash(rev, root, blobs) == target:
                found.append(rev[:12] + " " + _git("log", "-1", "--format=%s", rev, root=root)[:90])
    finally:
        blobs.close()
    return found


def cli(args: List[str]) -> int:
    """`--stamp` or `--find-commit HASH` (bench/gpu_check/__init__.py routes them here)."""
    if args[0] == "--stamp":
        st = write_stamp()
        print(f"wrote {STAMP}: commit {st['commit']} ({st['branch']}), dirty {st['dirty']}, tree {st['tree']}\n"
              f"ship it with the tree: the device tool's carry=[\"{STAMP}\"]")
        return 0
    if len(args) < 2:
        print("--find-commit needs the tree hash of a report", file=sys.stderr)
        return 2
    found = find_commits(args[1])
    print("\n".join(found) if found else f"no commit of the last 300 (of HEAD, and of all branches) has tree hash "
                                          f"{args[1]}: the run was of uncommitted code")
    return 0 if found else 1
