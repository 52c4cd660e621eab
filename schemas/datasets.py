"""The named datasets a config may refer to by name (``calibration.dataset: wikitext2-valid``).

Each is a file under the data folder (podar's shipped texts, ``data_dir`` or ``$PODAR_DATA_DIR``), with a
Hugging Face hub fallback for online users. Any other dataset value is a path to a UTF-8 text file.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["NamedDataset", "NAMED_DATASETS"]


@dataclass(frozen=True)
class NamedDataset:
    """A text podar knows by name: ``file`` relative to the data folder, ``hub`` as 'repo|subset|split'."""

    name: str
    file: str
    hub: str
    use: str


NAMED_DATASETS: dict[str, NamedDataset] = {
    d.name: d for d in (
        NamedDataset("wikitext2", "wikitext-2-raw/wiki.test.raw", "wikitext|wikitext-2-raw-v1|test",
                     "evaluation (the papers' protocol)"),
        NamedDataset("wikitext2-valid", "wikitext-2/valid.txt", "wikitext|wikitext-2-v1|validation",
                     "calibration and fine-tuning"),
    )
}
