"""Every link between the repository's Markdown files lands: the file exists (tests/unit/test_standalone.py
checks that too) and the ``#anchor`` names a heading of that file, as GitHub makes a heading's anchor.

README sends a newcomer one link away into docs/; a section renamed or moved must not leave a link that
opens the right page at the top, or no page.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LINK = re.compile(r"\]\(([^)\s]+)\)")
FENCE = re.compile(r"^(```|~~~)")


def _markdown_files() -> list[str]:
    names = subprocess.run(["git", "ls-files", "-z", "*.md"], cwd=ROOT, capture_output=True, check=True).stdout.decode().split("\0")
    return [n for n in names if n and (ROOT / n).is_file()]


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped (word characters, spaces and hyphens
    stay), each space a hyphen."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(text: str) -> set[str]:
    """The anchors of a Markdown text's headings (not of lines in code blocks); a repeated heading gets
    -1, -2, ... as on GitHub."""
    out: set[str] = set()
    seen: dict[str, int] = {}
    fenced = False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        m = re.match(r"#{1,6} (.+)", line)
        if fenced or not m:
            continue
        base = slug(m.group(1))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def _links(text: str) -> list[str]:
    out, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
        elif not fenced:
            out += LINK.findall(line)
    return out


def test_every_relative_link_and_anchor_lands():
    bad = {}
    for name in _markdown_files():
        text = (ROOT / name).read_text()
        for target in _links(text):
            if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            dest = (ROOT / Path(name).parent / path).resolve() if path else ROOT / name
            if not dest.exists():
                bad.setdefault(name, []).append(f"{target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest.read_text()):
                bad.setdefault(name, []).append(f"{target} (no heading with that anchor in {dest.relative_to(ROOT)})")
    assert not bad


def test_the_checker_reads_anchors_as_github_makes_them():
    text = "# Serving CaT: Ray Serve, gRPC\n## `make` targets\n```\n# not a heading\n```\n## Recipe v2\n## Recipe v2\n"
    assert anchors(text) == {"serving-cat-ray-serve-grpc", "make-targets", "recipe-v2", "recipe-v2-1"}
    assert slug("Which confidence signal works on a model: `caspo diagnose`") == "which-confidence-signal-works-on-a-model-caspo-diagnose"
    assert slug("Serving latency: v1 against v2's architecture") == "serving-latency-v1-against-v2s-architecture"
    assert slug("2. Rooms") == "2-rooms"
