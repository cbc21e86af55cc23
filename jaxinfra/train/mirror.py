"""A remote run folder's logs, written locally and uploaded at each checkpoint and at the end."""
from __future__ import annotations

import os

from jaxinfra.core.storage import download, is_remote, isfile, join, upload, walk_files


class Mirror:
    """A remote run folder's small files (metrics, TensorBoard events, plots, config, reports),
    written to a local folder and uploaded to the store by `push()`: at each checkpoint and at the end."""

    def __init__(self, remote: str, local: str):
        self.remote, self.local = remote, local
        self._sent: dict[str, tuple[int, int]] = {}  # relative path -> (size, mtime_ns) last uploaded

    @property
    def active(self) -> bool:
        """Whether there is anything to mirror (a local run folder is its own mirror)."""
        return is_remote(self.remote)

    def pull(self, *names: str) -> None:
        """Fetch these files from the store (a restart on another machine continues its metrics)."""
        for name in names if self.active else ():
            src = join(self.remote, name)
            if isfile(src):
                download(src, os.path.join(self.local, name))

    def push(self) -> list[str]:
        """Upload the local files that changed since the last push; returns their relative paths."""
        if not self.active or not os.path.isdir(self.local):
            return []
        sent = []
        for rel, _ in walk_files(self.local):
            st = os.stat(os.path.join(self.local, rel))
            if self._sent.get(rel) != (st.st_size, st.st_mtime_ns):
                upload(os.path.join(self.local, rel), join(self.remote, rel))
                self._sent[rel] = (st.st_size, st.st_mtime_ns)
                sent.append(rel)
        return sent
