"""Generate the blocking client (``client.py``) from the asyncio one (``aio.py``).

python scripts/gen_sync_client.py          # regenerate
python scripts/gen_sync_client.py --check  # fail when client.py is stale

``aio.py`` is the one definition of both clients' methods, signatures,
overloads and docstrings. The blocking client is the same text with ``async``
and ``await`` dropped and the asyncio names swapped for the blocking ones
(``_transport`` holds the few operations that differ), plus a handful of
sentences that only one of the two can truthfully say (``PHRASES``).
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "src" / "kernelgen_client" / "aio.py"
TARGET = ROOT / "src" / "kernelgen_client" / "client.py"

#: Exact passages of aio.py and what the blocking client says instead; each must occur once.
PHRASES: list[tuple[str, str]] = [
    (
        '''"""``AsyncKernelClient``: the asyncio client (grpc.aio).

This module is the one definition of both clients' methods, signatures and
docstrings: ``client.py`` (``KernelClient``, blocking) is generated from it by
``scripts/gen_sync_client.py``, which drops ``async``/``await`` and swaps the
names of the asyncio transport for the blocking one (``_transport``). Edit
this file, then run the script; ``make test`` fails when they differ.
"""

# ``timeout`` is each call's gRPC deadline, the same parameter as on the sync client.
# ruff: noqa: ASYNC109
''',
        '''"""``KernelClient``: the blocking client.

Generated from ``aio.py`` by ``scripts/gen_sync_client.py``; do not edit. Both
clients are defined once, in ``aio.py``: edit it, then run the script.
"""
''',
    ),
    (
        '"""An asyncio client of a kernelgen server, for one event loop.',
        '"""A blocking client of a kernelgen server; thread-safe.',
    ),
    (
        """
    Calls run concurrently on the client's event loop, and the server batches them::

        kernels = await asyncio.gather(
            *(client.generate("hyena-2d", [29, 29], row) for row in np.eye(8, 384))
        )
""",
        """
    Threads may share one client; the server batches their concurrent calls.
""",
    ),
    ('"""Wait until every channel is connected;', '"""Block until every channel is connected;'),
]

#: Whole words of aio.py and their blocking counterparts, everywhere (code and docstrings).
WORDS: list[tuple[str, str]] = [
    (r"\basync (def|for|with) ", r"\1 "),
    (r"\bawait ", ""),
    (r"\b__aenter__\b", "__enter__"),
    (r"\b__aexit__\b", "__exit__"),
    (r"\bAsyncKernelClient\b", "KernelClient"),
    (r"\bAsyncChannels\b", "SyncChannels"),
    (r"\bAsyncOnce\b", "SyncOnce"),
]


def render(source: str) -> str:
    text = source
    for passage, replacement in PHRASES:
        count = text.count(passage)
        if count != 1:
            raise SystemExit(f"{SOURCE.name}: expected one passage starting {passage[:50]!r}, found {count}")
        text = text.replace(passage, replacement)
    for pattern, replacement in WORDS:
        text = re.sub(pattern, replacement, text)
    leftover = re.findall(r".*\b(?:async|await|asyncio|aio\b(?!\.py)).*", text)
    if leftover:
        raise SystemExit("the blocking client would still say:\n  " + "\n  ".join(leftover))
    return formatted(text)


def formatted(text: str) -> str:
    """``text`` as ``ruff format`` writes it (``make lint`` checks the tree's format)."""
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    if ruff is None:
        raise SystemExit("ruff is not installed: pip install -e '.[dev]'")
    done = subprocess.run(
        [ruff, "format", "--stdin-filename", str(TARGET), "-"],
        input=text, capture_output=True, text=True, check=False, cwd=ROOT,
    )  # fmt: skip
    if done.returncode:
        raise SystemExit(f"ruff format failed on the generated client:\n{done.stderr}")
    return done.stdout


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--check", action="store_true", help="fail if client.py is stale instead of writing")
    args = parser.parse_args()
    text = render(SOURCE.read_text())
    if not args.check:
        TARGET.write_text(text)
        return 0
    if TARGET.read_text() != text:
        print(f"{TARGET.relative_to(ROOT)} is stale; run python scripts/gen_sync_client.py")
        return 1
    print(f"{TARGET.relative_to(ROOT)} is up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
