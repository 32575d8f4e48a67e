"""A task's training split tokenised once and stored compactly (one flat int32 tensor), with an on-disk
cache: the ``datasets`` Arrow format under ``<cache>/tokenized/<key>``, the key a hash of the tokenizer,
``data.max_length`` and the examples' text, so a second run of a large mixture starts without tokenising.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

from malora_train.data.collate import EncodedExample, encode_examples
from malora_train.data.types import Example
from malora_train.labels import IGNORE_INDEX

log = logging.getLogger(__name__)

ENCODE_CHUNK = 4096  # examples tokenised per call: bounds the memory of Python lists of token ids
CACHE_FORMAT = 1  # bump when the stored layout or the encoding rules change


def tokenizer_fingerprint(tokenizer) -> str:
    """What decides the token ids: the fast tokenizer's full definition (vocabulary, merges, normaliser,
    special-token post-processing), else its vocabulary, plus the class and special tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    definition = (backend.to_str() if backend is not None
                  else json.dumps(sorted(tokenizer.get_vocab().items())))
    extra = json.dumps([type(tokenizer).__name__, tokenizer.bos_token_id, tokenizer.eos_token_id,
                        tokenizer.pad_token_id, sorted(tokenizer.all_special_ids)])
    return hashlib.sha256((definition + extra).encode()).hexdigest()


def cache_key(tokenizer_id: str, examples: Sequence[Example], max_length: int) -> str:
    digest = hashlib.sha256(f"{CACHE_FORMAT}:{tokenizer_id}:{max_length}:".encode())
    for example in examples:
        digest.update(example.prompt.encode())
        digest.update(b"\0")
        digest.update(example.target.encode())
        digest.update(b"\1")
    return digest.hexdigest()[:32]


class TokenizedSplit:
    """Encoded examples of one task: ``ids`` (flat), per-example lengths, prompt lengths, truncation."""

    def __init__(self, ids: torch.Tensor, lengths: list[int], prompt_lengths: list[int],
                 truncated: list[bool], task_index: int) -> None:
        self.task_index = task_index
        self.ids = ids
        self.lengths = lengths
        self.prompt_lengths = prompt_lengths
        self.truncated = truncated
        self.offsets = [0]
        for length in lengths:
            self.offsets.append(self.offsets[-1] + length)

    @classmethod
    def encode(cls, tokenizer, examples: Sequence[Example], max_length: int, task_index: int,
               cache_dir: Path | None = None, tokenizer_id: str | None = None) -> TokenizedSplit:
        """Tokenise ``examples`` (or read them from ``cache_dir`` when the same tokenizer, max_length and
        examples were tokenised before; pass ``tokenizer_id`` to fingerprint the tokenizer only once)."""
        if cache_dir is None:
            return cls._tokenize(tokenizer, examples, max_length, task_index)
        key = cache_key(tokenizer_id or tokenizer_fingerprint(tokenizer), examples, max_length)
        folder = cache_dir / key
        if (folder / "dataset_info.json").is_file():
            try:
                return cls._load(folder, task_index)
            except Exception as err:  # noqa: BLE001 - a damaged cache entry is rebuilt, never fatal
                log.warning("tokenised-data cache %s is unreadable (%s): tokenising again", folder, err)
        split = cls._tokenize(tokenizer, examples, max_length, task_index)
        split._save(folder)
        return split

    @classmethod
    def _tokenize(cls, tokenizer, examples: Sequence[Example], max_length: int,
                  task_index: int) -> TokenizedSplit:
        chunks, prompt_lengths, truncated, lengths = [], [], [], []
        for start in range(0, len(examples), ENCODE_CHUNK):
            encoded = encode_examples(tokenizer, examples[start:start + ENCODE_CHUNK], max_length,
                                      task_index)
            chunks.append(torch.tensor([i for example in encoded for i in example.input_ids],
                                       dtype=torch.int32))
            lengths += [len(example.input_ids) for example in encoded]
            prompt_lengths += [example.labels.count(IGNORE_INDEX) for example in encoded]
            truncated += [example.truncated for example in encoded]
        ids = torch.cat(chunks) if chunks else torch.zeros(0, dtype=torch.int32)
        return cls(ids, lengths, prompt_lengths, truncated, task_index)

    def _save(self, folder: Path) -> None:
        """Write the Arrow dataset beside ``folder`` and rename it into place (another process may win)."""
        import datasets
        import pyarrow as pa

        folder.parent.mkdir(parents=True, exist_ok=True)
        offsets = pa.array(self.offsets, type=pa.int64())
        table = pa.table({
            "input_ids": pa.LargeListArray.from_arrays(offsets, pa.array(self.ids.numpy(), type=pa.int32())),
            "prompt_length": pa.array(self.prompt_lengths, type=pa.int32()),
            "truncated": pa.array(self.truncated, type=pa.bool_()),
        })
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
        bars = datasets.is_progress_bar_enabled()
        datasets.disable_progress_bars()  # a cache write is not worth a progress bar
        try:
            datasets.Dataset(table).save_to_disk(str(tmp))
            os.rename(tmp, folder)
        except OSError:  # the folder appeared meanwhile (a concurrent run) or the disk is read-only
            if not (folder / "dataset_info.json").is_file():
                log.warning("could not write the tokenised-data cache %s", folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            if bars:
                datasets.enable_progress_bars()

    @classmethod
    def _load(cls, folder: Path, task_index: int) -> TokenizedSplit:
        import datasets

        table = datasets.load_from_disk(str(folder)).data.table
        column = table.column("input_ids").combine_chunks()
        ids = torch.from_numpy(column.flatten().to_numpy(zero_copy_only=False).astype("int32"))
        offsets = column.offsets.to_numpy()
        lengths = (offsets[1:] - offsets[:-1]).tolist()
        return cls(ids, lengths, table.column("prompt_length").to_pylist(),
                   table.column("truncated").to_pylist(), task_index)

    def __len__(self) -> int:
        return len(self.lengths)

    def example(self, index: int) -> EncodedExample:
        ids = self.ids[self.offsets[index]:self.offsets[index + 1]].tolist()
        prompt_length = self.prompt_lengths[index]
        return EncodedExample(input_ids=ids, labels=[IGNORE_INDEX] * prompt_length + ids[prompt_length:],
                              task_index=self.task_index, truncated=self.truncated[index])

    def packed(self, index: int) -> tuple[torch.Tensor, int, int]:
        """(token ids, prompt length, task index) of one example, for ``pack_rows``."""
        ids = self.ids[self.offsets[index]:self.offsets[index + 1]].long()
        return ids, self.prompt_lengths[index], self.task_index
