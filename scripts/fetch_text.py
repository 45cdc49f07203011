"""Fetch real English text that ships inside PyPI packages (no hub needed), into data/.

    python scripts/fetch_text.py          # data/lee_background.cor, data/botchan.txt

- lee_background.cor: 299 news articles from gensim's test data (gensim 4.4.0 wheel).
- botchan.txt: Soseki's novel "Botchan" in English translation (Project Gutenberg, public domain),
  from sentencepiece's source distribution.
Used for perplexity, GPTQ calibration and the example eval task; see the README for provenance.
"""
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

DATA = Path(__file__).resolve().parent.parent / "data"
SOURCES = {  # file name -> (pip requirement, extra pip flags, member path suffix inside the archive)
    "lee_background.cor": ("gensim==4.4.0", ["--only-binary=:all:"], "gensim/test/test_data/lee_background.cor"),
    "botchan.txt": ("sentencepiece==0.2.1", ["--no-binary=:all:"], "test/botchan.txt"),
}


def fetch(name: str, data_dir: Path = DATA) -> Path:
    """Return data_dir/name, downloading its package with pip the first time."""
    target = data_dir / name
    if target.exists():
        return target
    requirement, flags, member = SOURCES[name]
    data_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, *flags, requirement]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        archive = next(Path(tmp).iterdir())
        if archive.suffix in (".whl", ".zip"):
            with zipfile.ZipFile(archive) as z:
                data = z.read(next(n for n in z.namelist() if n.endswith(member)))
        else:
            with tarfile.open(archive) as t:
                data = t.extractfile(next(m for m in t.getmembers() if m.name.endswith(member))).read()
    tmp_target = target.with_suffix(".tmp")
    tmp_target.write_bytes(data)
    tmp_target.replace(target)
    return target


if __name__ == "__main__":
    for name in SOURCES:
        print(fetch(name))
