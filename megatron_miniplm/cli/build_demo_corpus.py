"""Build a small multi-domain, Pile-style JSONL corpus from text this machine already has.

Domains come from the Python installation running this script:
  python-code   standard-library modules (source)
  python-tests  the standard library's test suite (source)
  docstrings    prose: the docstrings of standard-library modules, classes and functions
  package-docs  README / LICENSE / METADATA text of installed packages
  noise         low-quality text: words of the other domains in random order

    python tools/build_demo_corpus.py --output-dir DIR [--chars-per-domain 600000] [--test-fraction 0.15]

Writes DIR/train.jsonl and DIR/test.jsonl ({"text", "meta": {"pile_set_name"}}); a
document goes to the test split by a hash of its source, so the held-out
documents never enter training and the split does not depend on the order. As in
the paper (a held-out high-quality corpus), the noise domain has no test documents.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import os
import random
import sys
import sysconfig
from pathlib import Path
from typing import Iterator

from megatron_miniplm.atomic_io import publish, temp_name
from megatron_miniplm.cli.runner import tool


def _read(path: Path) -> str | None:
    try:
        text = path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None
    return text if text.strip() else None


def _stdlib_files(tests: bool) -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for path in sorted(root.rglob("*.py")):
        parts = set(path.relative_to(root).parts)
        if "site-packages" in parts or "idlelib" in parts:
            continue
        if ("test" in parts or "tests" in parts) == tests:
            files.append(path)
    return files


def _stdlib_sources(tests: bool) -> Iterator[tuple[str, str]]:
    for path in _stdlib_files(tests):
        text = _read(path)
        if text:
            yield str(path), text


def docstrings() -> Iterator[tuple[str, str]]:
    """One document per module: its docstrings, in source order, as paragraphs."""
    for path in _stdlib_files(tests=False):
        text = _read(path)
        if not text:
            continue
        try:
            tree = ast.parse(text)
        except SyntaxError:
            continue
        parts = []
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 80:
                    parts.append(doc.strip())
        if parts:
            yield str(path), "\n\n".join(parts)


def package_docs() -> Iterator[tuple[str, str]]:
    roots = {Path(p) for p in (sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"])}
    for root in sorted(roots):
        for path in sorted(root.glob("*.dist-info/*")):
            if path.name in ("METADATA", "LICENSE", "LICENSE.txt", "LICENSE.md", "README.md", "NOTICE"):
                text = _read(path)
                if text and len(text) > 200:
                    yield str(path), text


def noise(words: list[str], docs: int, seed: int) -> Iterator[tuple[str, str]]:
    rng = random.Random(seed)
    for i in range(docs):
        lines = [" ".join(rng.choice(words) for _ in range(rng.randint(4, 14)))
                 for _ in range(rng.randint(10, 60))]
        yield f"noise-{i}", "\n".join(lines)


def _is_test(source: str, fraction: float) -> bool:
    h = int(hashlib.sha256(source.encode()).hexdigest()[:8], 16)
    return h / 0xFFFFFFFF < fraction


def build(output_dir: str, chars_per_domain: int, test_fraction: float = 0.15, seed: int = 0) -> dict:
    domains = {
        "python-code": _stdlib_sources(tests=False),
        "python-tests": _stdlib_sources(tests=True),
        "docstrings": docstrings(),
        "package-docs": package_docs(),
    }
    os.makedirs(output_dir, exist_ok=True)
    paths = {split: os.path.join(output_dir, f"{split}.jsonl") for split in ("train", "test")}
    tmp = {split: temp_name(p) for split, p in paths.items()}
    stats = {}
    vocabulary: list[str] = []
    with open(tmp["train"], "w") as train, open(tmp["test"], "w") as test:
        def emit(domain, source, text):
            held_out = domain != "noise" and _is_test(source, test_fraction)
            out = test if held_out else train
            out.write(json.dumps({"text": text, "meta": {"pile_set_name": domain}}) + "\n")
            s = stats.setdefault(domain, {"docs": 0, "chars": 0, "test_docs": 0})
            s["docs"] += 1
            s["chars"] += len(text)
            s["test_docs"] += out is test

        # Files are visited in a seeded random order, so each domain's budget
        # samples the whole library rather than its alphabetical head.
        for domain, docs in domains.items():
            docs = list(docs)
            random.Random(f"{seed}-{domain}").shuffle(docs)
            used = 0
            for source, text in docs:
                if used >= chars_per_domain:
                    break
                # a file's head, short enough that no file dominates a domain and that the test
                # split holds enough documents for a document-level bootstrap to mean something
                text = text[: max(1000, chars_per_domain // 80)]
                emit(domain, source, text)
                used += len(text)
                if len(vocabulary) < 200_000:
                    vocabulary.extend(text.split()[:200])
        used = 0
        for source, text in noise(vocabulary, docs=10_000, seed=seed):
            if used >= chars_per_domain:
                break
            emit("noise", source, text)
            used += len(text)
    for split in paths:
        publish(tmp[split], paths[split])
    return stats


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-dir", required=True)
    p.add_argument("--chars-per-domain", type=int, default=600_000)
    p.add_argument("--test-fraction", type=float, default=0.15,
                   help="share of the non-noise documents held out for the comparison, chosen by a hash of their source")
    p.add_argument("--seed", type=int, default=0)
    return p


@tool
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    stats = build(args.output_dir, args.chars_per_domain, args.test_fraction, args.seed)
    print(f"{'domain':<14}{'docs':>7}{'test docs':>11}{'chars':>12}")
    for domain, s in stats.items():
        print(f"{domain:<14}{s['docs']:>7}{s['test_docs']:>11}{s['chars']:>12}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
