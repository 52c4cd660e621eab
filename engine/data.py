"""Text data: named datasets, tokenization, evaluation and calibration windows.

A named dataset (``schemas.datasets``) is read from the data folder when one is set (``PruningConfig.data_dir``,
else ``$PODAR_DATA_DIR``), else from the texts shipped with podar (``podar/data``, xz-compressed), else, with the
optional ``datasets`` package (``pip install 'podar[hub]'``), from the Hugging Face hub. Any other dataset value
is a path to a UTF-8 text file.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import json
import lzma
import os
from pathlib import Path
from typing import Any

import torch

from podar.schemas.datasets import NAMED_DATASETS
from podar.schemas.errors import DataError

__all__ = [
    "NAMED_DATASETS",
    "shipped_data",
    "shipped_text",
    "resolve_data_dir",
    "load_text",
    "tokenize_text",
    "eval_windows",
    "calibration_windows",
    "text_sha256",
    "check_tokenizer_fits",
]



def resolve_data_dir(config_value: str | None) -> Path | None:
    """The data folder: the config's ``data_dir``, else ``$PODAR_DATA_DIR``, else None (podar's shipped texts)."""
    value = config_value or os.environ.get("PODAR_DATA_DIR")
    return Path(value).expanduser() if value else None


def shipped_data() -> Path:
    """The folder of the texts that ship with podar (``podar/data`` in the installed package)."""
    return Path(str(importlib.resources.files("podar").joinpath("data")))


def shipped_text(name: str) -> Path | None:
    """The xz-compressed copy of named dataset ``name`` that ships with podar, or None."""
    spec = NAMED_DATASETS.get(name)
    if spec is None:
        return None
    path = shipped_data() / f"{spec.file}.xz"
    return path if path.is_file() else None


def _named(name: str, data_dir: Path | None, field: str) -> str:
    spec = NAMED_DATASETS[name]
    if data_dir is not None and (data_dir / spec.file).is_file():
        return _read(data_dir / spec.file, field)
    shipped = shipped_text(name) if data_dir is None else None
    if shipped is not None:
        return lzma.decompress(shipped.read_bytes()).decode("utf-8")
    hub = _from_hub(spec.hub)
    if hub is not None:
        return hub
    where = (f"'{data_dir / spec.file}' does not exist (the data folder is set by data_dir or PODAR_DATA_DIR; unset "
             "both to use the texts shipped with podar)" if data_dir is not None
             else f"podar's shipped copy '{shipped_data() / spec.file}.xz' is missing (a broken install?)")
    raise DataError(f"{field} '{name}': {where}; the hub fallback needs the optional 'datasets' package: "
                    "pip install 'podar[hub]'")


def load_text(name: str, data_dir: Path | None, *, field: str = "dataset") -> str:
    """The whole text of dataset ``name`` (named or a file path). ``field`` names the config field in errors."""
    if name in NAMED_DATASETS:
        return _named(name, data_dir, field)
    path = Path(name).expanduser()
    if not path.is_file():
        raise DataError(
            f"{field} '{name}' is neither a named dataset ({', '.join(NAMED_DATASETS)}) nor an existing file"
        )
    return _read(path, field)


def _read(path: Path, field: str) -> str:
    """A text file's text, or a JSON Lines file's (``.jsonl``) records' ``text`` fields joined by blank lines."""
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{field}: '{path}' is not UTF-8 text (byte {e.start}: {e.reason}); convert it to UTF-8") from e
    if path.suffix.lower() != ".jsonl":
        return raw
    texts = []
    for number, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{field}: '{path}' line {number} is not JSON ({e.msg}); a .jsonl file holds one JSON "
                            "object per line") from e
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise DataError(f"{field}: '{path}' line {number} has no string field 'text' (each record needs one)")
        texts.append(record["text"])
    return "\n\n".join(texts)


def _from_hub(spec: str) -> str | None:
    try:
        import datasets  # noqa: F401  (optional: online users only)
    except ImportError:
        return None
    repo, subset, split = spec.split("|")
    try:
        ds = datasets.load_dataset(repo, subset, split=split)
    except Exception:
        return None
    return "\n\n".join(ds["text"])


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def tokenize_text(tokenizer: Any, text: str, *, field: str = "dataset") -> torch.Tensor:
    """ids: (n_tokens,) int64 — the whole text tokenized once, no special tokens added. ``field`` names the
    config field the text comes from, in errors."""
    if not text.strip():
        raise DataError(f"{field}: the text is empty (only whitespace); give a text with content")
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def check_tokenizer_fits(tokenizer: Any, model: torch.nn.Module) -> None:
    """Raise DataError when the tokenizer can produce ids the model's embedding has no row for."""
    rows = model.get_input_embeddings().weight.shape[0]
    size = len(tokenizer)
    if size > rows:
        raise DataError(
            f"tokenizer/model mismatch: the tokenizer has {size} tokens but the model's input embedding has "
            f"{rows} rows; load the tokenizer that belongs to this model"
        )


def eval_windows(ids: torch.Tensor, seq_len: int, max_windows: int | None, *, name: str = "text") -> torch.Tensor:
    """windows: (n_windows, seq_len) int64 — non-overlapping, remainder dropped, first ``max_windows``."""
    n_total = ids.numel() // seq_len
    if n_total == 0:
        raise DataError(
            f"evaluation text '{name}' has {ids.numel()} tokens, fewer than one window of "
            f"evaluation.sequence_length={seq_len}; use a longer text or a shorter window"
        )
    n = n_total if max_windows is None else min(max_windows, n_total)
    return ids[: n * seq_len].view(n, seq_len)  # (n, T)


def calibration_windows(
    ids: torch.Tensor, num_samples: int, seq_len: int, seed: int, *, name: str = "text", field: str = "calibration"
) -> torch.Tensor:
    """samples: (num_samples, seq_len) int64 — random windows (seeded), as the Wanda/SparseGPT loaders do."""
    n_tokens = ids.numel()
    if n_tokens <= seq_len:
        raise DataError(
            f"{field} text '{name}' has {n_tokens} tokens; {field}.sequence_length={seq_len} needs more than "
            f"that. Use a longer text or a shorter sequence_length"
        )
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, n_tokens - seq_len, (num_samples,), generator=gen)  # (N,)
    offsets = torch.arange(seq_len)  # (T,)
    return ids[starts[:, None] + offsets[None, :]]  # (N, T)
