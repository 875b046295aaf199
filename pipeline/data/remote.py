"""Remote shards: a fixed command per URL scheme streams the object to stdout, with the URL as one
argument (never a shell, never a user-given command: ``pipe:`` URLs are refused)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from pipeline.errors import ConfigError

# URL scheme -> command that writes the object to stdout; the URL is appended as the last argument
FETCHERS = {
    "http": ["curl", "--fail", "--silent", "--show-error", "--location", "--retry", "3", "--"],
    "https": ["curl", "--fail", "--silent", "--show-error", "--location", "--retry", "3", "--"],
    "s3": ["aws", "s3", "cp", "--only-show-errors", "--", None, "-"],
    "gs": ["gcloud", "storage", "cat", "--"],
}


class _Fetched:
    """stdout of a fetch command as a readable stream; at end of data a failed command raises OSError
    with its exit code and last stderr line (instead of looking like a truncated shard)."""

    def __init__(self, argv: list[str], url: str):
        self.url = url
        try:
            self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        except FileNotFoundError:
            raise ConfigError(f"cannot fetch {url}: the command '{argv[0]}' is not installed") from None

    def read(self, n: int = -1) -> bytes:
        data = self.proc.stdout.read(n)
        if not data and self.proc.wait() != 0:  # the fetch failed: say why instead of "truncated"
            err = self.proc.stderr.read().decode(errors="replace").strip().splitlines()
            raise OSError(f"{self.proc.args[0]} exited with {self.proc.returncode}" + (f": {err[-1][:200]}" if err else ""))
        return data

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdout.close()
            self.proc.kill()
        self.proc.wait()
        self.proc.stdout.close()
        self.proc.stderr.close()


def fetch_command(url: str) -> list[str] | None:
    """The argv that streams ``url`` to stdout (no shell involved), or None for a local path."""
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if url.startswith("pipe:") or scheme == "pipe":
        raise ConfigError(f"shard URL {url[:80]!r}: 'pipe:' commands are refused; give a path or an "
                          f"http(s)://, s3:// or gs:// URL")
    if not scheme or scheme == "file":
        return None
    template = FETCHERS.get(scheme)
    if template is None:
        raise ConfigError(f"shard URL {url[:80]!r}: unsupported scheme '{scheme}' (known: file, "
                          f"{', '.join(sorted(FETCHERS))})")
    return [url if part is None else part for part in template] + ([url] if None not in template else [])


def open_url(url: str | Path):
    """A binary stream of a local shard or a remote one (see ``FETCHERS``)."""
    url = str(url)
    argv = fetch_command(url)
    if argv is None:
        return open(url.removeprefix("file://"), "rb")
    return _Fetched(argv, url)
