"""Output folders that never lose data: checked against the inputs, locked, staged, renamed.

Every command that writes a folder (convert, heal, sweep, demo) goes through `OutputFolder`:

* **inputs are sacred** — an output that equals, contains or lies inside any input (after
  resolving symlinks) is refused before any work (`check_no_overlap`);
* **exclusive** — an advisory lock (`flock`) on ``.NAME.lock`` beside the output is held for the
  whole run, so two runs into the same folder cannot race; the second is refused at once;
* **atomic** — results are written into a staging folder ``.NAME.partial-PID`` that carries a
  marker file (`MARKER`); the finished folder is renamed into place. A folder that appeared at
  the output path meanwhile is only replaced with ``--overwrite``; otherwise the finished result
  is kept beside it and the error says where;
* **only its own folders are deleted** — staging, work and trash folders are removed only when
  they carry this tool's marker; stale staging folders of dead processes (same host) are cleaned
  on the next run.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import shutil
import socket
import time
from collections.abc import Iterable, Mapping
from contextlib import contextmanager
from pathlib import Path

logger = logging.getLogger(__name__)

#: File inside every folder care-mla creates and may delete again.
MARKER = ".care-mla-owned"


class OutputError(ValueError):
    """An output path that cannot be used (overlaps an input, not writable, locked); a usage error."""


class OutputExistsError(OutputError, FileExistsError):
    """The output folder exists and --overwrite was not given."""


# ----------------------------------------------------------------------------- checks


def _resolved(path: str | Path) -> Path:
    return Path(path).expanduser().resolve()


def check_no_overlap(out: str | Path, inputs: Mapping[str, str | Path | None], *, flag: str = "--out") -> None:
    """Refuse an `out` that is, contains or lies inside one of `inputs` (name → path; non-paths are skipped)."""
    target = _resolved(out)
    for name, given in inputs.items():
        if given is None:
            continue
        path = Path(given).expanduser()
        if not path.exists():
            continue  # a hub id or a built-in name, not a path
        source = path.resolve()
        if target == source:
            raise OutputError(f"{flag} {out} is the {name} itself; write to another folder (inputs are only read)")
        if source.is_relative_to(target):
            raise OutputError(f"{flag} {out} contains the {name} ({given}); writing there would replace it — "
                              "choose a folder outside it")
        if target.is_relative_to(source):
            raise OutputError(f"{flag} {out} lies inside the {name} ({given}); choose a folder outside it")


def check_writable(out: str | Path, *, flag: str = "--out") -> None:
    """Refuse an `out` whose folder cannot be created or written, before any work is done."""
    out = Path(out).expanduser().absolute()
    if out.exists() and not out.is_dir():
        raise OutputError(f"{flag} {out} is a file, not a folder; choose another path")
    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise OutputError(f"{flag} {out} cannot be created: {parent} is a file")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{flag} {out} cannot be created: no write permission in {parent}; choose a writable "
                          "folder")


def check_output(out: str | Path, overwrite: bool, *, flag: str = "--out") -> None:
    """The up-front checks of an output folder: writable, and absent unless `overwrite`."""
    check_writable(out, flag=flag)
    if Path(out).exists() and not overwrite:
        raise OutputExistsError(f"output folder {out} exists; pass --overwrite to replace it")


# ----------------------------------------------------------------------------- owned folders


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def make_owned(folder: Path, purpose: str) -> Path:
    """Create `folder` (must not exist) with this process's marker in it."""
    folder.mkdir()
    mark(folder, purpose)
    return folder


def mark(folder: Path, purpose: str) -> None:
    """Put this process's marker into `folder` (which care-mla created)."""
    info = {"pid": os.getpid(), "host": socket.gethostname(), "purpose": purpose, "created": time.time()}
    (folder / MARKER).write_text(json.dumps(info))


def owner(folder: Path) -> dict | None:
    """The marker of a folder care-mla created, or None (not ours, or unreadable)."""
    try:
        info = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def remove_owned(folder: Path) -> bool:
    """Delete `folder` only if it carries care-mla's marker; True when it was removed."""
    if not folder.is_dir() or folder.is_symlink() or owner(folder) is None:
        return False
    shutil.rmtree(folder, ignore_errors=True)
    return True


def _stale(folder: Path) -> bool:
    info = owner(folder)
    if info is None or info.get("host") != socket.gethostname():
        return False
    pid = info.get("pid")
    return isinstance(pid, int) and pid != os.getpid() and not _pid_alive(pid)


def clean_stale(parent: Path, prefixes: Iterable[str]) -> list[Path]:
    """Remove the owned folders under `parent` named with one of `prefixes` whose process is dead."""
    removed = []
    if not parent.is_dir():
        return removed
    for entry in parent.iterdir():
        if entry.name.startswith(tuple(prefixes)) and _stale(entry) and remove_owned(entry):
            logger.info("removed %s, left by an interrupted run", entry)
            removed.append(entry)
    return removed


# ----------------------------------------------------------------------------- the lock


class OutputLock:
    """Exclusive advisory lock on ``.NAME.lock`` beside `out`, for the whole run (released on close).

    The lock file is removed on release; an acquirer checks that the file it locked is still the one
    at the path (the classic unlink race), and retries otherwise.
    """

    def __init__(self, out: Path):
        self.path = out.parent / f".{out.name}.lock"
        self.fd: int | None = None

    def acquire(self) -> "OutputLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                os.close(fd)
                if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    holder = self._holder()
                    raise OutputError(
                        f"another care-mla run{holder} is writing {self.path.parent / self.path.name[1:-5]}; wait for "
                        "it to finish or choose another --out"
                    ) from None
                raise
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.write(fd, str(os.getpid()).encode())
                self.fd = fd
                return self
            os.close(fd)  # unlinked by its previous holder between open and lock: take the new file

    def _holder(self) -> str:
        try:
            return f" (pid {int(self.path.read_text().strip())})"
        except (OSError, ValueError):
            return ""

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# ----------------------------------------------------------------------------- staging and commit


def staging_prefix(out: Path) -> str:
    return f".{out.name}.partial-"


class OutputFolder:
    """The output of one run: locked for the run, written into owned staging folders, committed by rename.

    Use as a context manager around the whole run (the lock), with `staging()` around what is
    written (a folder replaced atomically at `out`). `inputs` are checked for overlap at entry.
    """

    def __init__(self, out: str | Path, *, overwrite: bool, inputs: Mapping[str, str | Path | None] | None = None,
                 flag: str = "--out", purpose: str = "output"):
        self.out = Path(out).expanduser()
        self.overwrite = overwrite
        self.inputs = dict(inputs or {})
        self.flag = flag
        self.purpose = purpose
        self.lock = OutputLock(self.out.absolute())

    def check(self) -> None:
        """The checks before any work: no overlap with inputs, writable, absent unless --overwrite."""
        check_no_overlap(self.out, self.inputs, flag=self.flag)
        check_output(self.out, self.overwrite, flag=self.flag)

    def __enter__(self) -> "OutputFolder":
        self.check()
        self.out.absolute().parent.mkdir(parents=True, exist_ok=True)
        self.lock.acquire()
        try:
            self.check()  # again under the lock: another run may have finished meanwhile
            clean_stale(self.out.absolute().parent, [staging_prefix(self.out), f".{self.out.name}.old-"])
        except BaseException:
            self.lock.release()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.lock.release()

    @contextmanager
    def staging(self):
        """Yield an owned staging folder; on success it becomes `out`, on failure it is removed."""
        parent = self.out.absolute().parent
        tmp = parent / f"{staging_prefix(self.out)}{os.getpid()}"
        remove_owned(tmp)
        make_owned(tmp, self.purpose)
        try:
            yield tmp
            self._commit(tmp)
        except BaseException:
            remove_owned(tmp)
            raise

    def _commit(self, tmp: Path) -> None:
        out = self.out.absolute()
        (tmp / MARKER).unlink()  # a finished output is the user's, not a folder care-mla may delete
        if out.is_symlink() and self.overwrite:
            out.unlink()  # replace the link, never touch what it points to
        if out.exists() or out.is_symlink():
            if not self.overwrite:
                kept = out.parent / f"{out.name}.care-mla-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
                tmp.rename(kept)
                raise OutputExistsError(f"{out} appeared while this run was writing; its result was kept in {kept} "
                                        "(pass --overwrite to replace a folder)")
            trash = out.parent / f".{out.name}.old-{os.getpid()}"
            remove_owned(trash)
            out.rename(trash)
            mark(trash, "replaced output")
            tmp.rename(out)
            remove_owned(trash)
        else:
            tmp.rename(out)

    def write_file(self, name: str, text: str) -> None:
        """Replace one file of the committed output atomically (a report written after the model)."""
        write_text_atomic(self.out / name, text)


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary sibling and a rename: readers see the old or the new file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
