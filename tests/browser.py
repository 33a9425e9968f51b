"""Helpers for the browser test: a real headless Chromium, its DOM and a screenshot.

NOTE: when ``/usr/bin/chromium`` (or ``chromium`` on PATH) is missing, :func:`chromium_or_skip`
INSTALLS THE SYSTEM PACKAGE with ``apt-get update && apt-get install -y chromium`` (Debian;
needs root). Set ``AUTOSEARCH_NO_APT=1`` to skip the test instead. If the install fails the
test is skipped with the reason.

Everything else is plain Python: the dumped DOM is parsed with ``html.parser`` and the PNG
decoded with ``zlib`` + numpy, so the test needs no extra Python package.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import tempfile
import zlib
from html.parser import HTMLParser
from pathlib import Path

import numpy as np

_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--hide-scrollbars", "--virtual-time-budget=5000",
)
_VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "param", "source", "track", "wbr"}


def find_chromium() -> str | None:
    """Path of a Chromium binary, or ``None``."""
    if Path("/usr/bin/chromium").exists():
        return "/usr/bin/chromium"
    return shutil.which("chromium") or shutil.which("chromium-browser")


def install_chromium(*, timeout: float = 900) -> tuple[str | None, str]:
    """Install Debian's ``chromium`` with apt-get (SYSTEM CHANGE; root only). Returns (path, why-not)."""
    if os.environ.get("AUTOSEARCH_NO_APT"):
        return None, "chromium is missing and AUTOSEARCH_NO_APT is set (install it: apt-get install -y chromium)"
    if not shutil.which("apt-get"):
        return None, "chromium is missing and there is no apt-get to install it"
    if hasattr(os, "geteuid") and os.geteuid() != 0:
        return None, "chromium is missing and installing it needs root (apt-get install -y chromium)"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", "chromium"]):
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, check=False)
            if out.returncode != 0:
                return None, f"`{' '.join(cmd)}` failed: {(out.stderr or out.stdout).strip()[-300:]}"
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"installing chromium failed: {exc}"
    path = find_chromium()
    return path, "" if path else "apt-get installed chromium but no chromium binary was found"


def chromium_or_skip() -> str:
    """A Chromium binary; installs it when missing (see the module docstring), else skips the test."""
    import pytest

    path = find_chromium()
    if path:
        return path
    path, why = install_chromium()
    if not path:
        pytest.skip(why)
    return path


def _run(binary: str, args: list[str], *, timeout: float) -> subprocess.CompletedProcess[bytes]:
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        cmd = [binary, *_FLAGS, f"--user-data-dir={profile}", *args]
        return subprocess.run(cmd, capture_output=True, timeout=timeout, check=False)


def dump_dom(binary: str, page: Path, *, timeout: float = 120) -> str:
    """The page's DOM after its scripts ran (``--dump-dom``)."""
    out = _run(binary, ["--dump-dom", Path(page).resolve().as_uri()], timeout=timeout)
    if out.returncode != 0 or not out.stdout:
        raise RuntimeError(f"chromium --dump-dom failed ({out.returncode}): {out.stderr.decode(errors='replace')[-500:]}")
    return out.stdout.decode("utf-8", errors="replace")


def screenshot(binary: str, page: Path, png: Path, *, width: int = 1200, height: int = 900, scale: float = 0.5,
               timeout: float = 120) -> Path:
    """A PNG of the top of the page (``scale`` shrinks it, so decoding it stays fast)."""
    args = [f"--window-size={width},{height}", f"--force-device-scale-factor={scale}", f"--screenshot={Path(png).resolve()}",
            Path(page).resolve().as_uri()]
    out = _run(binary, args, timeout=timeout)
    if out.returncode != 0 or not Path(png).exists():
        raise RuntimeError(f"chromium --screenshot failed ({out.returncode}): {out.stderr.decode(errors='replace')[-500:]}")
    return Path(png)


class _FigureCounter(HTMLParser):
    """Per element id of interest: ``svg.main-svg`` and ``.scatterlayer path.point`` inside it."""

    def __init__(self, ids: set[str]) -> None:
        super().__init__(convert_charrefs=True)
        self.ids = ids
        self.stack: list[tuple[str, str | None, set[str]]] = []
        self.main_svg: dict[str, int] = {i: 0 for i in ids}
        self.points: dict[str, int] = {i: 0 for i in ids}
        self.seen: set[str] = set()

    def _owner(self) -> str | None:
        for _, el_id, _ in reversed(self.stack):
            if el_id in self.ids:
                return el_id
        return None

    def _visit(self, tag: str, attrs: list[tuple[str, str | None]]) -> tuple[str | None, set[str]]:
        a = dict(attrs)
        el_id = a.get("id")
        classes = set((a.get("class") or "").split())
        if el_id in self.ids:
            self.seen.add(el_id)
        owner = el_id if el_id in self.ids else self._owner()
        if owner is not None:
            if tag == "svg" and "main-svg" in classes:
                self.main_svg[owner] += 1
            if tag == "path" and "point" in classes and any("scatterlayer" in c for _, _, c in self.stack):
                self.points[owner] += 1
        return el_id, classes

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        el_id, classes = self._visit(tag, attrs)
        if tag not in _VOID:
            self.stack.append((tag, el_id, classes))

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._visit(tag, attrs)

    def handle_endtag(self, tag: str) -> None:
        for k in range(len(self.stack) - 1, -1, -1):
            if self.stack[k][0] == tag:
                del self.stack[k:]
                return


def count_figure_elements(dom: str, ids: set[str]) -> tuple[set[str], dict[str, int], dict[str, int]]:
    """(ids found, main-svg count per id, scatter point count per id) of a dumped DOM."""
    parser = _FigureCounter(set(ids))
    parser.feed(dom)
    parser.close()
    return parser.seen, parser.main_svg, parser.points


def _paeth(a: int, b: int, c: int) -> int:
    p = a + b - c
    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
    if pa <= pb and pa <= pc:
        return a
    return b if pb <= pc else c


def read_png(path: Path) -> np.ndarray:
    """Decode an 8-bit, non-interlaced RGB / RGBA / grey PNG into an (h, w, channels) uint8 array."""
    data = Path(path).read_bytes()
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError(f"{path} is not a PNG file")
    pos, idat = 8, []
    width = height = channels = 0
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        body = data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            width, height, depth, ctype, _, _, interlace = struct.unpack(">IIBBBBB", body)
            if depth != 8 or interlace or ctype not in (0, 2, 4, 6):
                raise ValueError(f"unsupported PNG (bit depth {depth}, colour type {ctype}, interlace {interlace})")
            channels = {0: 1, 2: 3, 4: 2, 6: 4}[ctype]
        elif kind == b"IDAT":
            idat.append(body)
        pos += 12 + length
    raw = zlib.decompress(b"".join(idat))
    stride = width * channels
    out = np.zeros((height, stride), dtype=np.uint8)
    prev = np.zeros(stride, dtype=np.int32)
    for y in range(height):
        start = y * (stride + 1)
        ftype = raw[start]
        line = np.frombuffer(raw, dtype=np.uint8, count=stride, offset=start + 1).astype(np.int32)
        if ftype == 0:
            cur = line
        elif ftype == 1:  # Sub: cumulative sum per channel, modulo 256
            cur = (np.cumsum(line.reshape(width, channels), axis=0) % 256).reshape(-1)
        elif ftype == 2:  # Up
            cur = (line + prev) % 256
        else:  # Average or Paeth: sequential along the row
            vals = line.tolist()
            up = prev.tolist()
            res = [0] * stride
            for i in range(stride):
                a = res[i - channels] if i >= channels else 0
                if ftype == 3:
                    res[i] = (vals[i] + ((a + up[i]) >> 1)) & 0xFF
                else:
                    c = up[i - channels] if i >= channels else 0
                    res[i] = (vals[i] + _paeth(a, up[i], c)) & 0xFF
            cur = np.asarray(res, dtype=np.int32)
        out[y] = cur
        prev = cur
    return out.reshape(height, width, channels)
