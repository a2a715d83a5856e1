"""Build the served confirmation-page snippet from its readable source, ``kassa.js``.

The build is small on purpose (no npm toolchain): it drops comment lines and indentation, line by line,
then computes the content version, the SRI hash (sha384) and the gzipped bytes. The server builds once
per process on first use (``built()``); ``python -m kassa.snippet.build --out FILE`` writes the same
bytes for stores that host the file themselves and prints the ``<script>`` tag with its integrity.

The line-based rule is safe because the source keeps every comment on a line of its own (a trailing
``// ...`` after code is left in place, never cut mid-line, so strings containing ``//`` survive).
"""

from __future__ import annotations

import argparse
import base64
import gzip
import hashlib
import json
import sys
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from urllib.parse import urlsplit

from kassa.atomicfile import write_atomic

SIZE_BUDGET_GZIP = 10 * 1024  # issue 6: the served script is at most 10 KB gzipped


@dataclass(frozen=True, slots=True)
class BuiltSnippet:
    """The served file and what a page needs to pin it."""

    body: bytes  # the JavaScript served as /v1/snippet.js
    gzipped: bytes  # the same, gzip-compressed (served when the client accepts gzip)
    version: str  # content hash: the ``?v=`` of the immutable URL
    integrity: str  # ``sha384-…`` for the ``integrity`` attribute (SRI)
    source_bytes: int

    def script_tag(self, base_url: str) -> str:
        url = f"{base_url.rstrip('/')}/v1/snippet.js?v={self.version}"
        return f'<script async src="{url}" integrity="{self.integrity}" crossorigin="anonymous"></script>'


def source() -> str:
    """The readable source shipped in the package."""
    return resources.files("kassa.snippet").joinpath("kassa.js").read_text(encoding="utf-8")


def minify(text: str) -> str:
    """Drop comment-only lines, ``/* … */`` blocks that start a line (``/*!`` is kept) and indentation."""
    out: list[str] = []
    in_block = False
    for raw in text.splitlines():
        line = raw.strip()
        if in_block:
            if "*/" in line:
                in_block = False
                rest = line.split("*/", 1)[1].strip()
                if rest:
                    out.append(rest)
            continue
        if not line or line.startswith("//"):
            continue
        if line.startswith("/*") and not line.startswith("/*!"):
            if "*/" not in line:
                in_block = True
                continue
            rest = line.split("*/", 1)[1].strip()
            if rest:
                out.append(rest)
            continue
        out.append(line)
    # Newlines stay: automatic semicolon insertion then reads the code exactly as the source.
    return "\n".join(out) + "\n"


def build(text: str | None = None) -> BuiltSnippet:
    """Build from ``text`` (default: the packaged ``kassa.js``)."""
    src = source() if text is None else text
    body = minify(src).encode("utf-8")
    digest = hashlib.sha384(body).digest()
    return BuiltSnippet(
        body=body,
        gzipped=gzip.compress(body, compresslevel=9, mtime=0),
        version=hashlib.sha256(body).hexdigest()[:12],
        integrity="sha384-" + base64.b64encode(digest).decode("ascii"),
        source_bytes=len(src.encode("utf-8")),
    )


@cache
def built() -> BuiltSnippet:
    """The packaged snippet, built once per process."""
    return build()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kassa.snippet.build", description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, help="write the built file here")
    ap.add_argument("--base-url", default="https://kassa.example.com", help="Kassa's public URL, for the tag")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)
    base = urlsplit(args.base_url)
    if base.scheme not in ("http", "https") or not base.netloc:
        # `notaurl` or `javascript:…` made a tag whose src no browser loads as Kassa's script
        print(f"--base-url must be Kassa's public http(s):// URL, got {args.base_url!r}", file=sys.stderr)
        return 2
    snippet = built()
    if args.out:
        try:
            write_atomic(args.out, snippet.body)
        except OSError as exc:  # a directory, or a folder Kassa may not write: was a traceback
            print(f"cannot write the snippet to {args.out}: {exc.strerror or exc}", file=sys.stderr)
            return 2
    info = {
        "version": snippet.version, "integrity": snippet.integrity, "bytes": len(snippet.body),
        "gzip_bytes": len(snippet.gzipped), "source_bytes": snippet.source_bytes,
        "gzip_budget_bytes": SIZE_BUDGET_GZIP, "script_tag": snippet.script_tag(args.base_url),
        "out": str(args.out) if args.out else None,
    }
    if args.json:
        print(json.dumps(info))
    else:
        print(f"snippet {snippet.version}: {info['bytes']:,} bytes, {info['gzip_bytes']:,} gzipped "
              f"(budget {SIZE_BUDGET_GZIP:,}); source {snippet.source_bytes:,} bytes")
        print(f"integrity {snippet.integrity}")
        print(info["script_tag"])
        if args.out:
            print(f"wrote {args.out}")
    return 0 if len(snippet.gzipped) <= SIZE_BUDGET_GZIP else 1


if __name__ == "__main__":
    sys.exit(main())
