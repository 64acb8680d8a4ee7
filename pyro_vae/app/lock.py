"""One writer per run folder: :class:`RunLock`, held for the whole command."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

from pyro_vae.errors import UserInputError

__all__ = ["LOCK", "RunLock"]

#: the lock file of a run folder: held by its one writer for the whole command
LOCK = ".lock"


class RunLock:
    """One writer per run folder: an exclusive ``fcntl.flock`` on ``FOLDER/.lock``.

    The kernel releases the lock when its process exits, however it exits, so a killed
    run never blocks its own resume. A second writer is refused at once (exit 2) with the
    holder's PID and command. The holder deletes the lock file (while still holding it)
    when it is done, so a folder is left as the command found it; a process that locked
    a file just deleted sees that the path no longer names the file it locked and tries
    again, so two writers never hold locks on two different files. The folder is created
    for the lock when missing, and removed again if the command leaves nothing else in it.
    Readers (``evaluate``, ``sample``) take no lock: every file is replaced atomically, so
    they see the old version or the new one, never a torn one.
    """

    def __init__(self, folder: Path, command: str = "") -> None:
        self.folder = Path(folder)
        self.command = command
        self._descriptor: int | None = None
        self._created = False
        self._confinement: Any = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, kind: Any, value: Any, traceback: Any) -> None:
        self.release()

    def acquire(self) -> None:
        from pyro_vae.io import LinkError, confined

        if self.folder.exists() and not self.folder.is_dir():
            raise UserInputError(f"--out {self.folder} is a file: pass a folder for the run")
        self._created = not self.folder.exists()
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / LOCK
        if path.is_symlink():  # (O_NOFOLLOW below refuses it too, atomically)
            raise LinkError(
                f"{path} is a symbolic link: pyro-vae never writes through a link; remove "
                f"it (a run folder's .lock is a file of its own)"
            )
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX: no lock, say so
            import warnings

            warnings.warn("pyro-vae: no fcntl here: run folders are not locked", stacklevel=2)
            return
        while True:
            try:
                descriptor = os.open(
                    path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644
                )
            except FileNotFoundError:  # the holder removed the folder it had created
                self._created = True
                self.folder.mkdir(parents=True, exist_ok=True)
                continue
            except OSError as error:
                if error.errno != errno.ELOOP:
                    raise
                raise LinkError(
                    f"{path} is a symbolic link: pyro-vae never writes through a link; "
                    f"remove it (a run folder's .lock is a file of its own)"
                ) from None
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = os.read(descriptor, 4096).decode("utf-8", "replace").strip()
                os.close(descriptor)
                raise UserInputError(
                    f"{self.folder} is in use by another pyro-vae process "
                    f"({holder or 'its PID is not recorded yet'}): wait for it to finish, or "
                    f"choose another folder"
                ) from None
            # the file we locked must still be the one at the path: its holder deletes it
            # when done, and may have done so between our open and our flock
            try:
                current = os.stat(path).st_ino
            except FileNotFoundError:
                current = None
            if os.fstat(descriptor).st_ino == current:
                break
            os.close(descriptor)
        self._descriptor = descriptor
        self._confinement = confined(self.folder)  # no write below it follows a link
        self._confinement.__enter__()
        try:  # who holds it, for the refusal of a second writer (best effort: disk full)
            os.ftruncate(descriptor, 0)
            os.write(descriptor, f"PID {os.getpid()}: {self.command}".encode()[:4000])
        except OSError:
            pass

    def release(self) -> None:
        if self._confinement is not None:
            self._confinement.__exit__(None, None, None)
            self._confinement = None
        if self._descriptor is None:
            return
        try:  # deleted while still held: see the class docstring
            (self.folder / LOCK).unlink(missing_ok=True)
            if self._created and not any(self.folder.iterdir()):
                self.folder.rmdir()
        except OSError:
            pass
        finally:
            os.close(self._descriptor)  # releases the lock
            self._descriptor = None
