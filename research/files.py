"""Writing outputs safely: one helper for files, one for directories, one lock for run directories.

Every output ziplm writes goes through `atomic_file` (or `write_bytes` / `write_json` on top of it) or `AtomicDir`:
the content is built under a temporary name beside the target and moved into place only once it is complete, so a
reader, a crash or a full disk never leaves half a file where a good one was, and no temporary is left behind on
failure. Without `overwrite` the commit itself refuses a target that appeared while the output was being built
(a hard link for files, a rename onto a missing or empty directory for directories: both fail atomically when the
target exists). New files and directories get the permissions the umask gives, as `open` and `mkdir` would.

Temporaries are named `.<name>.<host>-<pid>.<random>` so that the next writer of the same target removes those
of a process killed mid-write (`clean_stale`; only this host's, only of processes that are gone).

Operating-system errors (no space left, read-only file system, permission denied, a directory where a file goes)
become `errors.UserError` with one line naming the path, so the CLI prints them without a traceback.

`RunLock` holds an advisory lock (`fcntl.flock`) on `<run dir>/.lock` for as long as a run writes the directory: a
second writer gets "run directory ... in use by pid N" instead of interleaving its checkpoints and metrics.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path

from research import errors


def os_error(e: OSError, doing: str) -> errors.UserError:
    """A one-line UserError for an operating-system error while `doing` (e.g. "writing runs/x/model.zlm")."""
    reason = (e.strerror or type(e).__name__).lower()
    return errors.UserError(f"{reason} {doing}")


# Operating-system errors as libraries that wrap them (orbax / tensorstore, safetensors) spell them in messages.
_OS_REASONS = (
    ("No space left on device", "no space left on device"),
    ("Disk quota exceeded", "disk quota exceeded"),
    ("Read-only file system", "read-only file system"),
    ("Permission denied", "permission denied"),
)


def os_reason(e: Exception) -> str | None:
    """The operating-system reason an exception's message carries ("no space left on device"), or None."""
    text = str(e)
    return next((reason for marker, reason in _OS_REASONS if marker in text), None)


def umask() -> int:
    """The process's umask (read without changing it for longer than a call)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _check_target(target: Path, overwrite: bool) -> None:
    if target.is_dir():
        raise errors.UserError(f"{target} is a directory; give a file path")
    if (target.exists() or target.is_symlink()) and not overwrite:
        raise errors.UserError(f"{target} exists; pass --overwrite to replace it")
    if not target.parent.is_dir():
        raise errors.UserError(f"the directory of {target} does not exist")


def check_writable(path, *, overwrite: bool = False) -> Path:
    """Checks before any work that `path` can be written as a file (its directory exists, it is not a directory,
    it does not exist unless `overwrite`); returns the absolute path. Use it before long work whose output goes
    to `path`."""
    target = Path(path).expanduser().absolute()
    _check_target(target, overwrite)
    if not os.access(target.parent, os.W_OK):
        raise errors.UserError(f"permission denied writing {target}")
    return target


@contextlib.contextmanager
def atomic_file(path, *, overwrite: bool = True, mode: str = "wb"):
    """Yields a file object whose content replaces `path` only when the block succeeds (fsynced first).

    Args:
      path: the target file. A dangling symlink counts as existing (it is never written through).
      overwrite: replace an existing target; without it, a target that exists at the start or appears before
        the commit is refused (UserError) and nothing is changed.
      mode: "wb" or "w".
    """
    with staged(path, overwrite=overwrite) as tmp:
        try:
            with open(tmp, mode) as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            raise os_error(e, f"writing {Path(path).expanduser().absolute()}") from None


@contextlib.contextmanager
def staged(path, *, overwrite: bool = True):
    """Yields a temporary file path beside `path` for any writer to build the output at; it replaces `path` when
    the block succeeds and is removed when it fails (so a command can finish its other outputs, a report, before
    its main output appears). `overwrite` as in `atomic_file`."""
    target = Path(path).expanduser().absolute()
    _check_target(target, overwrite)
    clean_stale(target)
    try:
        fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(target), suffix=".tmp", dir=target.parent)
        os.fchmod(fd, 0o666 & ~umask())
        os.close(fd)
    except OSError as e:
        raise os_error(e, f"writing {target}") from None
    try:
        try:
            yield Path(tmp)
        except errors.UserError as e:  # name the target, not the temporary
            if tmp not in str(e):
                raise
            raise type(e)(str(e).replace(tmp, str(target))) from None
        if overwrite:
            os.replace(tmp, target)
        else:
            try:
                os.link(tmp, target)  # fails if the target appeared meanwhile
            except FileExistsError:
                raise errors.UserError(f"{target} appeared while it was being written; nothing replaced") from None
            os.unlink(tmp)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise os_error(e, f"writing {target}") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _owner() -> str:
    """This process as temporary names record it: host and pid."""
    return f"{re.sub(r'[^A-Za-z0-9]+', '', socket.gethostname())[:32] or 'host'}-{os.getpid()}"


def _temp_prefix(target: Path) -> str:
    return f".{target.name}.{_owner()}."


def clean_stale(target: Path) -> list[Path]:
    """Removes the temporaries a killed writer of `target` left beside it (`.<name>.<host>-<pid>.*`, from
    `atomic_file` and `AtomicDir`) whose process, on this host, is gone; returns them. Another host's, or a
    running process's, are left alone."""
    host = _owner().rsplit("-", 1)[0]
    pattern = re.compile(rf"^\.{re.escape(target.name)}\.{re.escape(host)}-(\d+)\.")
    removed = []
    try:
        entries = list(target.parent.iterdir())
    except OSError:
        return removed
    for p in entries:
        m = pattern.match(p.name)
        if m is None or _alive(int(m.group(1))):
            continue
        try:
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
            removed.append(p)
        except OSError:
            pass
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_bytes(path, data: bytes, *, overwrite: bool = True) -> Path:
    """Writes `data` to `path` through `atomic_file`; returns the absolute path."""
    with atomic_file(path, overwrite=overwrite) as f:
        f.write(data)
    return Path(path).expanduser().absolute()


def write_json(path, obj, *, overwrite: bool = True) -> Path:
    """Writes `obj` as indented, key-sorted JSON through `atomic_file`."""
    text = json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n"
    return write_bytes(path, text.encode(), overwrite=overwrite)


class AtomicDir:
    """Builds a directory under a temporary name and moves it into place only when the block succeeds.

    An existing non-empty target is refused unless `overwrite` (checked at the start and again, atomically, at
    the commit: a target that appeared meanwhile is refused, not replaced); with it, the old directory is replaced
    only after the new one is complete.
    """

    def __init__(self, target: Path, overwrite: bool = False):
        self.target = Path(target).expanduser().absolute()
        self.overwrite = overwrite
        if self.target.is_symlink() and not self.target.exists():
            raise errors.UserError(f"{self.target} is a dangling symlink; remove it or choose another path")
        if self.target.exists() and not self.target.is_dir():
            raise errors.UserError(f"{self.target} exists and is not a directory")
        if self.target.is_dir() and any(self.target.iterdir()) and not overwrite:
            raise errors.UserError(f"{self.target} exists and is not empty; pass --overwrite to replace it")

    def __enter__(self) -> Path:
        try:
            self.target.parent.mkdir(parents=True, exist_ok=True)
            clean_stale(self.target)
            self.tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(self.target), dir=self.target.parent))
            os.chmod(self.tmp, 0o777 & ~umask())
        except OSError as e:
            raise os_error(e, f"creating {self.target}") from None
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            if isinstance(exc, OSError):
                raise os_error(exc, f"writing {self.target}") from None
            if isinstance(exc, errors.UserError) and str(self.tmp) in str(exc):  # name the target, not the temporary
                raise type(exc)(str(exc).replace(str(self.tmp), str(self.target))) from None
            return False
        try:
            self._commit()
        except BaseException:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise
        return False

    def _commit(self) -> None:
        old = None
        if self.overwrite and self.target.exists():
            old = self.target.with_name(f".{self.target.name}.old-{os.getpid()}")
            self.target.rename(old)
        try:
            os.rename(self.tmp, self.target)  # onto a missing or empty directory only: atomic refusal otherwise
        except OSError as e:
            if old is not None:
                old.rename(self.target)
            if e.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
                raise errors.UserError(f"{self.target} appeared while it was being written; nothing replaced") from None
            raise os_error(e, f"writing {self.target}") from None
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


class RunLock:
    """An exclusive advisory lock on a run directory, held while the block runs (the directory is created)."""

    def __init__(self, workdir: Path):
        self.path = Path(workdir) / ".lock"
        self._fd = None

    def __enter__(self) -> RunLock:
        import fcntl

        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise os_error(e, f"locking {self.path.parent}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise errors.UserError(
                f"run directory {self.path.parent} is in use by pid {holder}; wait for it or choose another --workdir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc):
        import fcntl

        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
        return False
