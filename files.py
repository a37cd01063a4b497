"""Committing files to disk: atomic writes, directory commits that always leave a complete state, run locks.

Every writer of outputs goes through here, so nothing half-written is ever read back:
- `atomic_write(path, write)`: a temp file beside `path`, then one rename.
- `atomic_dir_swap(tmp, final)`: a finished directory replaces an old one (old moved aside, new renamed in).
- `commit_dir(tmp, final, pointer)`: a finished directory goes into place, then the symlink `pointer` is switched
  to it in one rename. Readers that follow the pointer see the old or the new directory, never none: a kill
  between any two renames still leaves a complete directory that the pointer (or a scan) finds.
- `writing(tmp, what)`: around the writing of a temp file or directory: removed at once when the writing fails,
  and a full disk reported as one line (`DiskFullError`) naming ENOSPC and the path.
- `RunLock(path)`: one process per run directory (an OS lock, released by the kernel when its holder dies);
  `lock_holder(path)` says who holds it, if anyone (sweeps never touch a run directory that is in use).

`fault_point(name)` is for tests only: with WMTP_FAULT="<name>[:<n>]" the n-th time a commit reaches that point the
process stops there as if killed (no cleanup runs in the commit), so tests can show every state is recoverable.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from errors import UserError

FAULT_ENV = "WMTP_FAULT"
_fault_hits: collections.Counter = collections.Counter()


class FaultInjected(BaseException):
    """Raised by `fault_point` (tests only). A BaseException, so no `except Exception` handler swallows it."""


def fault_point(name: str) -> None:
    """Stop here when $WMTP_FAULT names this point (and this is its n-th hit); a no-op otherwise."""
    spec = os.environ.get(FAULT_ENV, "")
    point, _, nth = spec.rpartition(":")
    if not nth.isdigit():
        point, nth = spec, "1"
    if point != name:
        return
    _fault_hits[name] += 1
    if _fault_hits[name] == int(nth):
        raise FaultInjected(f"{FAULT_ENV}={spec}: stopped at {name}")


def md5(path: str | os.PathLike) -> str:
    """Hex MD5 of a file, read in 8 MiB chunks (checklists, S3 ETags)."""
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(8 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class DiskFullError(UserError):
    """No space left where a run writes: one line naming ENOSPC and the path (what was committed before is intact)."""


FULL = (errno.ENOSPC, errno.EDQUOT)


def out_of_space(e: BaseException, where: Path) -> bool:
    """Whether the failed write `e` under `where` is a full disk: an ENOSPC / EDQUOT OSError in its chain (or among
    the per-rank failures torch.distributed.checkpoint collects), or under 1 MiB free there now (torch's zip writer
    reports a full disk as "unexpected pos", without an errno)."""
    stack, seen = [e], set()
    while stack:
        x = stack.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, OSError) and x.errno in FULL:
            return True
        failures = getattr(x, "failures", None)  # CheckpointException: {rank: (exception, traceback)}
        if isinstance(failures, dict):
            stack += [v[0] if isinstance(v, tuple) else v for v in failures.values()]
        stack += [x.__cause__, x.__context__]
    try:
        return shutil.disk_usage(where).free < 1 << 20
    except OSError:
        return False


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def writing(tmp: str | os.PathLike, what: str, clean: bool = True) -> Iterator[None]:
    """Around the writing of the temp file or directory `tmp` (`what` names it in the message). When the writing
    raises, `tmp` is removed at once (by one rank of several: `clean`), so a partial copy never fills the disk; what
    a kill or an interrupt leaves, the next start clears. A full disk becomes a DiskFullError naming ENOSPC and the
    path."""
    tmp = Path(tmp)
    try:
        yield
    except BaseException as e:  # torch.distributed.checkpoint's CheckpointException is a BaseException
        if isinstance(e, (KeyboardInterrupt, SystemExit, GeneratorExit, FaultInjected)):
            raise
        full = out_of_space(e, tmp.parent)
        if clean:
            remove(tmp)
        if full:
            raise DiskFullError(
                f"no space left on device (ENOSPC) writing {what} at {tmp}: the partial copy was removed and what was "
                f"committed before it is intact; free space in {tmp.parent} (df -h), then continue (--resume)"
            ) from None
        raise


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Write a file through `write(tmp_path)` into a temp file beside it, then os.replace: readers never see a
    half-written file, and a crash leaves the old file (or none). Shared by every module that writes outputs."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        with writing(tmp, str(path)):
            write(tmp)
            os.chmod(tmp, 0o644)  # mkstemp's 0600 would make outputs private to the writer
            os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def atomic_dir_swap(tmp: str | os.PathLike, final: str | os.PathLike) -> None:
    """Put a fully written directory `tmp` at `final`, replacing an old one: the old is moved aside first, so
    `final` is at every moment either the complete old or the complete new directory, or (between the two
    renames) absent with both complete copies beside it. Where a reader must never find it absent, use
    `commit_dir` with a pointer."""
    tmp, final = Path(tmp), Path(final)
    old = final.with_name(f".{final.name}.old")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        fault_point("swap:moved-aside")
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def point(link: str | os.PathLike, target: str) -> None:
    """Make `link` a symlink to `target` (a name relative to its directory) in one rename."""
    link = Path(link)
    tmp = link.with_name(f".{link.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    os.symlink(target, tmp)
    os.replace(tmp, link)  # rename(2) replaces the symlink itself, never the directory it points to


def commit_dir(tmp: str | os.PathLike, final: str | os.PathLike, pointer: str | os.PathLike) -> None:
    """Publish the fully written directory `tmp` as `final`, then switch the symlink `pointer` to it.

    Until the pointer moves it names the previous complete directory; a `final` that already exists is replaced
    by `atomic_dir_swap`, during which the pointer names `tmp` if it named `final`. Readers must not delete
    what the pointer names (checkpoint.clean_partial)."""
    tmp, final = Path(tmp), Path(final)
    fault_point("commit:written")
    if final.exists() and Path(pointer).resolve() == final.resolve():
        point(
            pointer, tmp.name
        )  # replacing what the pointer names: let it name the new copy through the swap
    atomic_dir_swap(tmp, final)
    fault_point("commit:renamed")
    point(pointer, final.name)
    fault_point("commit:pointed")


# --------------------------------------------------------------------------- one run per directory


class LockError(UserError):
    """Another live process holds the run directory."""


class RunLock:
    """An exclusive lock on `<dir>/.lock` for as long as a run lives; the file names the holder (host, pid).

    flock is an OS lock: it goes away with the process that held it, so the lock of a killed run is taken over
    by the next one (the file's old contents are only information).
    """

    def __init__(self, directory: str | os.PathLike):
        self.path = Path(directory) / ".lock"
        self._fd: int | None = None
        self.previous: dict = {}  # holder recorded in the file when we took it over (a run that is gone)

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("since", 0)))
            raise LockError(
                f"{self.path.parent} is in use by another run (host {holder.get('host', '?')}, pid "
                f"{holder.get('pid', '?')}, since {since}): wait for it to end or choose another train.run_name"
            ) from None
        self.previous = _read_holder(fd)
        info = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def lock_holder(directory: str | os.PathLike) -> dict | None:
    """The holder recorded in `<directory>/.lock` while a live process holds that lock, else None. Probes without
    taking the lock over (a shared, non-blocking try, released at once) and without touching the file."""
    try:
        fd = os.open(Path(directory) / ".lock", os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _read_holder(fd)
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _read_holder(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0) or b"{}")
    except ValueError:
        return {}
