"""The output directory of a merge: locked, written under a temporary name,
renamed into place only when complete.

    with Output(out_dir, inputs=[...], force=False) as out:
        write everything into out.tmp
        out.commit()

* ``OUT.lock`` is held with ``fcntl.flock`` for the whole run, so a second
  merge to the same ``OUT`` fails at once, naming the process that holds it.
  The kernel drops the lock when its holder dies, however it dies.
* The temporary directory is ``OUT.tmp-<pid>-<random>``.  Holding the lock
  means no other merge is writing ``OUT``, so every ``OUT.tmp-*`` found at
  start is a dead run's leftover: it is removed, and the removal is reported.
  Its space counts as free when the merge checks for room (``leftover_bytes``).
  A run stopped by Ctrl-C, SIGTERM or SIGHUP removes its own temporary
  (``research-merge``); one killed outright leaves it for the next.
* ``commit`` re-checks ``OUT`` right before the rename.  An ``OUT`` that did
  not exist at start, or exists without ``force``, is never deleted.  With
  ``force``, the old ``OUT`` is first renamed aside, then removed once the new
  one is in place, so there is never a moment without a complete ``OUT``.
* ``OUT`` may not be, or contain, any input: ``--force`` never deletes a model
  it is reading.
* Directories are created with the process's umask, as other tools do.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import shutil
import uuid


class OutputError(ValueError):
    """A refused output directory; the message names it."""


def _is_within(path: str, root: str) -> bool:
    path, root = os.path.realpath(path), os.path.realpath(root)
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


class Output:
    def __init__(self, out_dir: str, *, inputs=(), force: bool = False, log=print):
        self.out = os.path.abspath(out_dir)
        self.force, self.log = force, log
        self.parent, self.name = os.path.dirname(self.out), os.path.basename(self.out)
        for src in inputs:
            if src and _is_within(src, self.out):
                raise OutputError(f"{self.out}: the output directory is, or contains, the input {src}; "
                                  "choose another output directory")
        if os.path.exists(self.out) and not os.path.isdir(self.out):
            raise OutputError(f"{self.out} exists and is not a directory")
        self.existed = os.path.exists(self.out)
        if self.existed and not force:
            raise OutputError(f"{self.out} exists; pass --force to replace it")
        self.tmp = None
        self._lock_fd = None

    # --- the lock ---------------------------------------------------------------------

    @property
    def lock_path(self) -> str:
        return f"{self.out}.lock"

    def _acquire(self):
        os.makedirs(self.parent, exist_ok=True)
        while True:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                holder = self._holder()
                raise OutputError(f"{self.out}: another merge{f' (pid {holder})' if holder else ''} is writing "
                                  f"it (lock {self.lock_path}); wait for it or choose another output directory") from None
            try:  # the file we locked must still be the one at the path (a finishing run unlinks it)
                same = os.path.samestat(os.fstat(fd), os.stat(self.lock_path))
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
                self._lock_fd = fd
                return
            os.close(fd)

    def _holder(self) -> int | None:
        try:
            with open(self.lock_path) as f:
                return int(f.read().strip() or 0) or None
        except (OSError, ValueError):
            return None

    def _release(self):
        if self._lock_fd is not None:
            try:
                os.unlink(self.lock_path)
            except FileNotFoundError:
                pass
            os.close(self._lock_fd)
            self._lock_fd = None

    # --- temporaries ------------------------------------------------------------------

    def _leftovers(self):
        """``(path, pid or None)`` of each ``OUT.tmp-*`` and ``OUT.old-*`` beside ``OUT``."""
        if not os.path.isdir(self.parent):
            return
        pattern = re.compile(re.escape(self.name) + r"\.(tmp|old)-(\d+)?.*$")
        for entry in sorted(os.listdir(self.parent)):
            m = pattern.fullmatch(entry)
            if m:
                yield os.path.join(self.parent, entry), int(m.group(2)) if m.group(2) else None

    def leftover_bytes(self) -> int:
        """Disk space held by the leftovers that entering removes: room the output may
        count on (where another merge holds the lock, entering fails anyway)."""
        total = 0
        for path, _ in self._leftovers():
            for root, dirs, files in os.walk(path):
                for f in [root, *(os.path.join(root, f) for f in files)]:
                    try:
                        total += os.lstat(f).st_blocks * 512
                    except OSError:
                        pass
        return total

    def _clean_stale(self):
        for path, pid in self._leftovers():
            shutil.rmtree(path, ignore_errors=True)
            who = f"pid {pid}" if pid is not None else "an older run"
            self.log(f"removed {path}: the leftover of an interrupted merge ({who}; no merge holds {self.lock_path})")

    def __enter__(self):
        self._acquire()
        try:
            self._clean_stale()
            self.tmp = os.path.join(self.parent, f"{self.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
            os.mkdir(self.tmp)  # mode 0777 & ~umask
        except BaseException:
            self._release()
            raise
        return self

    def commit(self) -> str:
        """Rename the finished temporary directory to ``OUT``."""
        exists = os.path.exists(self.out)
        if exists and not (self.force and self.existed):
            why = "appeared while this merge ran" if not self.existed else "exists"
            raise OutputError(f"{self.out} {why}; not replacing it (pass --force to replace an existing one)")
        aside = None
        if exists:
            aside = os.path.join(self.parent, f"{self.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}")
            os.rename(self.out, aside)
        os.rename(self.tmp, self.out)
        self.tmp = None
        if aside:
            shutil.rmtree(aside, ignore_errors=True)
        return self.out

    def __exit__(self, *exc):
        try:
            if self.tmp is not None:
                shutil.rmtree(self.tmp, ignore_errors=True)
                self.tmp = None
        finally:
            self._release()
        return False
