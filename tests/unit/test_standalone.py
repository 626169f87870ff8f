"""The repository stands alone: none of its tracked files names a path outside it.

A clone with nothing beside it must build, test and read the same as the machine it was written on, so
no tracked text file may name:

* the reference folder beside a checkout (``..`` + ``/shared``), any relative link out of the repository
  from a Markdown file, or a Python path built above the repository root (``Path(__file__).resolve().parents[N]`` past the root);
* an absolute path of a machine: ``/work/...``, ``/root/...``, ``/home/...``, ``/Users/...``;
* the cluster volume ``/shared`` anywhere but where the cluster is described (see the allowance below);
* a design document the repository does not hold (``DESIGN.md``, ``DESIGN §``); ``docs/design.md §N``
  citations must name a section that docs/design.md has.

Allowances, each narrow and each stated in the file that uses it:

* ``/shared`` is the mount path of the cluster's shared volume (the PVC ``caspo-shared``) inside the
  pods. It may appear in the k8s manifests, the real-model configs, the deployment and real-model docs and
  the tests of the manifests, and each such file must say so with the words ``the cluster's own volume``.
* ``/home/caspo`` is the home of the user the Dockerfile itself creates (``useradd caspo``): allowed in the
  Dockerfile only, which must say ``the image's own``.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# an absolute path starts a token: not after a word character, a dot, a slash, a tilde or a dash
_START = r"(?<![\w.~/-])"
MACHINE = re.compile(_START + r"/(?:work|root|home|Users)/")
CLUSTER = re.compile(_START + r"/shared\b")
OUTSIDE = re.compile(r"\.\./shared\b")
DESIGN = re.compile(r"DESIGN\.md|DESIGN §")
PARENTS = re.compile(r"Path\(__file__\)\.resolve\(\)\.parents\[(\d+)\]")
MD_LINK = re.compile(r"\]\(([^)\s#]+)")
CITE = re.compile(r"docs/design\.md §(\d+)")

CLUSTER_PLACES = ("k8s/", "configs/", "docs/deploy.md", "docs/real-models.md", "tests/deploy/")
CLUSTER_NOTE = "the cluster's own volume"
IMAGE_HOME = ("Dockerfile", "/home/caspo/", "the image's own")
SELF = "tests/unit/test_standalone.py"  # this file names the patterns it forbids


def _tracked_text() -> dict[str, str]:
    """path -> text of every tracked file that is text (binary files: weights, pictures, are skipped)."""
    names = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout.decode().split("\0")
    out = {}
    for name in filter(None, names):
        p = ROOT / name
        if not p.is_file():  # deleted in the working tree, not yet committed
            continue
        data = p.read_bytes()
        if b"\0" in data:
            continue
        try:
            out[name] = data.decode("utf-8")
        except UnicodeDecodeError:
            continue
    return out


FILES = _tracked_text()


def _hits(pattern: re.Pattern, text: str) -> list[str]:
    return [f"line {text.count(chr(10), 0, m.start()) + 1}: {m.group(0)!r}" for m in pattern.finditer(text)]


def test_the_tracked_files_are_read():
    # the guard reads what git tracks: the code, the docs, the manifests (an empty list would pass anything)
    assert {"README.md", "pyproject.toml", "caspo/__init__.py", "docs/design.md"} <= set(FILES)


def test_no_path_beside_the_repository():
    bad = {name: _hits(OUTSIDE, text) for name, text in FILES.items() if name != SELF}
    assert not {k: v for k, v in bad.items() if v}


def test_no_absolute_machine_path():
    bad = {}
    for name, text in FILES.items():
        if name == SELF:
            continue
        hits = [m for m in MACHINE.finditer(text)]
        if name == IMAGE_HOME[0] and IMAGE_HOME[2] in text:
            hits = [m for m in hits if not text.startswith(IMAGE_HOME[1], m.start())]
        if hits:
            bad[name] = [f"line {text.count(chr(10), 0, m.start()) + 1}: {text[m.start():m.start() + 30]!r}" for m in hits]
    assert not bad


def test_the_cluster_volume_only_where_the_cluster_is_described():
    bad = {}
    for name, text in FILES.items():
        if name == SELF or not CLUSTER.search(text):
            continue
        if not name.startswith(CLUSTER_PLACES):
            bad[name] = "names /shared outside the cluster's manifests, configs and docs: " + ", ".join(_hits(CLUSTER, text))
        elif CLUSTER_NOTE not in text:
            bad[name] = f"names /shared without saying it is {CLUSTER_NOTE!r}"
    assert not bad


def test_no_python_path_above_the_repository():
    bad = {}
    for name, text in FILES.items():
        if not name.endswith(".py") or name == SELF:
            continue
        depth = len(Path(name).parts)  # parents[depth - 1] of a file is the repository root
        over = [m.group(0) for m in PARENTS.finditer(text) if int(m.group(1)) >= depth]
        if over:
            bad[name] = over
    assert not bad


def test_markdown_links_stay_inside():
    bad = {}
    for name, text in FILES.items():
        if not name.endswith(".md"):
            continue
        for target in MD_LINK.findall(text):
            if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
                continue
            path = (ROOT / Path(name).parent / target).resolve()
            if not path.is_relative_to(ROOT):
                bad.setdefault(name, []).append(f"{target} (outside the repository)")
            elif not path.exists():
                bad.setdefault(name, []).append(f"{target} (no such file)")
    assert not bad


def test_design_citations_name_sections_the_repository_holds():
    design = FILES["docs/design.md"]
    sections = {int(n) for n in re.findall(r"^## (\d+)\. ", design, flags=re.M)}
    assert sections, "docs/design.md has numbered sections ('## N. Title')"
    bad = {}
    for name, text in FILES.items():
        if name == SELF:
            continue
        hits = _hits(DESIGN, text) + [f"§{n} (no such section)" for n in CITE.findall(text) if int(n) not in sections]
        if hits:
            bad[name] = hits
    assert not bad


def test_the_guard_catches_what_it_is_for():
    # each pattern matches the forms that were in the repository, and not their harmless neighbours
    # (the examples are split in two strings so that this file does not itself name those paths)
    assert OUTSIDE.search("[DESIGN.md](../" "shared/DESIGN.md)")
    assert MACHINE.search('DEFAULT_DATA = "/work/' 'shared/data/gsm8k/train.jsonl"')
    assert MACHINE.search("cd /root/x") and MACHINE.search("/home/me/data") and MACHINE.search("(/Users/me)")
    assert not MACHINE.search("https://example.org/work/x") and not MACHINE.search("~/work/x") and not MACHINE.search("runs/home/x")
    assert CLUSTER.search("run_dir: /shared/runs/mesh") and CLUSTER.search("mountPath: /shared}")
    assert not CLUSTER.search("../" "shared/x") and not CLUSTER.search("caspo-shared") and not CLUSTER.search("runs/shared/x")
    assert DESIGN.search("(DESIGN §4)") and not DESIGN.search("docs/design.md §4")
    assert [m.group(1) for m in PARENTS.finditer('Path(__file__).resolve().parents[3] / "shared"')] == ["3"]
