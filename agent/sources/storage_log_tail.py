"""Reading many log files exactly once: durable read positions across rotation and restarts.

The position rules (identity, offset, fingerprint, copytruncate and
rename-and-create rotation, start at end, a positions file of the wrong
shape set aside) are described in agent/sources/storage_log.py, the source
that uses :class:`FileTailer`.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
from pathlib import Path

from agent.fsutil import set_aside, write_atomic

log = logging.getLogger(__name__)

MAX_LINE = 1 << 20  # bytes: a longer line is skipped (and counted), never waited for
MAX_READ = 64 << 20  # bytes read from one file per cycle, at most (the rest is read next cycle)


def _fingerprint(first_line: bytes) -> str:
    return hashlib.blake2b(first_line, digest_size=8).hexdigest()


def _first_line(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            line = f.readline(4096)
    except OSError:
        return None
    return line if line.endswith(b"\n") else None


def _is_count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _valid_positions(data) -> tuple[dict | None, dict]:
    """``(files, kmsg)`` from a positions file, or ``(None, {})`` when its shape is not ours.

    Entries of the wrong shape inside a good file are dropped (that file is read
    as new); a document of the wrong shape as a whole is refused.
    """
    if not isinstance(data, dict) or not isinstance(data.get("files", {}), dict):
        return None, {}
    files = {}
    for path, p in data.get("files", {}).items():
        if (isinstance(p, dict) and all(_is_count(p.get(k)) for k in ("dev", "ino", "gen", "offset"))
                and isinstance(p.get("fp"), (str, type(None))) and isinstance(p.get("skip", False), bool)):
            files[path] = p
        else:
            log.warning("storage_log: dropping the saved position of %s (wrong shape: %.80r)", path, p)
    kmsg = data.get("kmsg", {})
    if not (isinstance(kmsg, dict) and isinstance(kmsg.get("boot", ""), str) and isinstance(kmsg.get("seq", 0), int)):
        kmsg = {}
    return files, kmsg


class FileTailer:
    """Positions over many files; ``poll`` returns new complete lines with their (file_id, offset)."""

    def __init__(self, state_path: Path, start_at_end: bool, max_lines: int):
        self.state_path = state_path
        self.start_at_end = start_at_end
        self.max_lines = max_lines
        self.pos: dict[str, dict] = {}
        self.long_lines = 0  # lines over MAX_LINE skipped since start
        self.fresh = True
        self.kmsg: dict = {}
        try:
            data = json.loads(state_path.read_text())
        except FileNotFoundError:
            data = FileNotFoundError
        except (OSError, ValueError) as e:
            log.warning("storage_log: positions %s unreadable (%s); starting at the end of each file", state_path, e)
            set_aside(state_path, "storage_log")
            data = FileNotFoundError
        if data is not FileNotFoundError:
            files, kmsg = _valid_positions(data)
            if files is None:
                log.warning("storage_log: positions %s have the wrong shape (%.80r); starting at the end of each file",
                            state_path, data)
                set_aside(state_path, "storage_log")
            else:
                self.pos, self.kmsg, self.fresh = files, kmsg, False
        self._dirty = False

    def save(self) -> None:
        """Write the positions (atomically) if they moved since the last save."""
        if not self._dirty:
            return
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(self.state_path, json.dumps({"files": self.pos, "kmsg": self.kmsg}).encode())
        self._dirty = False

    def _read_from(self, path: str, p: dict, offset: int, limit: int) -> tuple[list[tuple[int, bytes]], int]:
        """Complete lines from ``offset``: [(offset, line)], new offset.

        A line longer than MAX_LINE is skipped, counted once in ``long_lines``:
        its bytes are passed as they are read, across cycles if its newline is
        not written yet (``p["skip"]`` remembers that, in the positions file too),
        and the lines after it are read as usual.
        """
        out = []
        skipping = p.get("skip") is True
        budget = MAX_READ
        try:
            with open(path, "rb") as f:
                f.seek(offset)
                while len(out) < limit and budget > 0:
                    line = f.readline(MAX_LINE)
                    if not line:
                        break
                    budget -= len(line)
                    complete = line.endswith(b"\n")
                    if skipping:  # the rest of an over-long line
                        offset += len(line)
                        skipping = not complete
                    elif complete:
                        out.append((offset, line))
                        offset += len(line)
                    elif len(line) >= MAX_LINE:
                        self.long_lines += 1
                        log.debug("storage_log: skipping a line over %d bytes at %s:%d", MAX_LINE, path, offset)
                        offset += len(line)
                        skipping = True
                    else:
                        break  # no newline yet: left for the next cycle
        except OSError as e:
            log.debug("storage_log: cannot read %s: %s", path, e)
        if skipping != (p.get("skip") is True):
            p["skip"] = skipping
            self._dirty = True
        return out, offset

    def _old_inode_sibling(self, path: str, dev: int, ino: int) -> str | None:
        for cand in sorted(glob.glob(glob.escape(path) + ".*")):
            try:
                st = os.stat(cand)
            except OSError:
                continue
            if st.st_dev == dev and st.st_ino == ino:
                return cand
        return None

    def poll(self, paths: list[str]) -> list[tuple[str, str, int, bytes]]:
        """New lines of every file: [(path, file_id, offset, line)]."""
        out: list[tuple[str, str, int, bytes]] = []
        for path in paths:
            try:
                st = os.stat(path)
            except OSError:
                continue
            p = self.pos.get(path)
            first = _first_line(path)
            fp = _fingerprint(first) if first is not None else None
            if p is None:
                start = st.st_size if (self.fresh and self.start_at_end) else 0
                if start:
                    # just after the last complete line: never start in the middle of one
                    with open(path, "rb") as f:
                        f.seek(max(0, start - 65536))
                        chunk = f.read(start - max(0, start - 65536))
                    nl = chunk.rfind(b"\n")
                    start = start - len(chunk) + nl + 1 if nl >= 0 else start
                # no newline in the last 64 KiB: inside an over-long line, skipped to its end
                p = {"dev": st.st_dev, "ino": st.st_ino, "gen": 0, "offset": start, "fp": fp,
                     "skip": bool(start) and start == st.st_size and not chunk.endswith(b"\n")}
                self.pos[path] = p
                self._dirty = True
            elif (p["dev"], p["ino"]) != (st.st_dev, st.st_ino):
                # renamed away and re-created: finish the old inode where it now lives
                old = self._old_inode_sibling(path, p["dev"], p["ino"])
                if old:
                    fid = f"{p['dev']}:{p['ino']}:{p['gen']}"
                    lines, _ = self._read_from(old, dict(p), p["offset"], self.max_lines)
                    out.extend((old, fid, o, ln) for o, ln in lines)
                p = {"dev": st.st_dev, "ino": st.st_ino, "gen": 0, "offset": 0, "fp": fp, "skip": False}
                self.pos[path] = p
                self._dirty = True
            elif st.st_size < p["offset"] or (p.get("fp") and fp and fp != p["fp"]):
                # truncated in place (copytruncate) or replaced by a file reusing the inode
                rotated = path + ".1"
                r1 = _first_line(rotated)
                if st.st_size < p["offset"] and r1 is not None and p.get("fp") == _fingerprint(r1):
                    fid = f"{p['dev']}:{p['ino']}:{p['gen']}"
                    lines, _ = self._read_from(rotated, dict(p), p["offset"], self.max_lines)
                    out.extend((rotated, fid, o, ln) for o, ln in lines)
                p.update(gen=p["gen"] + 1, offset=0, fp=fp, skip=False)
                self._dirty = True
            if p.get("fp") is None and fp is not None:
                p["fp"] = fp
                self._dirty = True
            fid = f"{p['dev']}:{p['ino']}:{p['gen']}"
            lines, new_off = self._read_from(path, p, p["offset"], self.max_lines)
            if new_off != p["offset"]:
                p["offset"] = new_off
                self._dirty = True
            out.extend((path, fid, o, ln) for o, ln in lines)
        # forget files that are gone (their state would only grow)
        for gone in [k for k in self.pos if k not in paths and not os.path.exists(k)]:
            del self.pos[gone]
            self._dirty = True
        if self.fresh:
            self.fresh, self._dirty = False, True  # remembered, so a restart is not "fresh" either
        return out
