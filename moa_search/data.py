"""Calibration data: documents from a local file, folder or hub dataset, packed into sequences.

Every packed sequence starts with the tokenizer's BOS token when it has one, because windowed
heads keep the first token as the attention sink.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import datasets
import torch
from datasets.exceptions import DatasetGenerationError
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from moa_search.errors import CalibrationDataError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

# File suffix -> `datasets` packaged builder that reads it.
BUILDER_BY_SUFFIX: dict[str, str] = {
    ".txt": "text",
    ".text": "text",
    ".md": "text",
    ".jsonl": "json",
    ".json": "json",
    ".csv": "csv",
    ".parquet": "parquet",
}

# Documents tokenised per tokenizer call. Packing stops pulling batches once it has enough
# sequences, so at most one batch is tokenised beyond what the sequences use.
_TOKENIZE_BATCH_DOCUMENTS = 64

# Column that the "text" builder writes. Plain-text files have no other column.
_TEXT_BUILDER_COLUMN = "text"


@dataclass(frozen=True, eq=False)
class CalibrationData:
    """Packed token sequences for profiling (calibration) and for perplexity checks (holdout).

    The holdout sequences follow the calibration sequences in the token stream, so the two never
    share a stream token. Rows that continue a document start with a BOS token that is not in the
    stream.

    Attributes:
        calibration: int64 ``[num_samples, seq_len]``; every row starts with BOS when the
            tokenizer has one.
        holdout: int64 ``[num_holdout, seq_len]``; 0 rows when no holdout was requested.
        source: The ``dataset`` argument as given: a local path or a hub id.
        documents: Documents packed, i.e. those with at least 2 tokens, read until enough
            sequences were full.
        tokens_available: Tokens in the packed documents, including the unused tail of the last
            document read. It covers the whole dataset only when packing read all of it.
        dataset_config: Hub dataset configuration, None for local data.
        split: Split that was read.
        text_column: Column that was read; ``"text"`` for plain-text files.
    """

    calibration: torch.Tensor
    holdout: torch.Tensor
    source: str
    documents: int
    tokens_available: int
    dataset_config: str | None = None
    split: str = "train"
    text_column: str = "text"

    @property
    def seq_len(self) -> int:
        """Tokens per sequence."""
        return int(self.calibration.shape[1])

    def token_ids_sha256(self) -> str:
        """Hash the calibration ids, then the holdout ids, as little-endian int64 bytes."""
        digest = hashlib.sha256()
        for ids in (self.calibration, self.holdout):
            digest.update(ids.detach().cpu().contiguous().numpy().astype("<i8").tobytes())
        return digest.hexdigest()

    def provenance(self) -> dict[str, Any]:
        """Describe the data as a JSON-serialisable dict that runs compare to check their ids."""
        return {
            "source": self.source,
            "dataset_config": self.dataset_config,
            "split": self.split,
            "text_column": self.text_column,
            "seq_len": self.seq_len,
            "num_samples": int(self.calibration.shape[0]),
            "num_holdout": int(self.holdout.shape[0]),
            "documents": self.documents,
            "tokens_available": self.tokens_available,
            "token_ids_sha256": self.token_ids_sha256(),
        }


def load_documents(
    dataset: str,
    *,
    dataset_config: str | None = None,
    split: str = "train",
    text_column: str = "text",
) -> list[str]:
    """Read the text of every document, in dataset order.

    Args:
        dataset: A local file (``.txt``/``.text``/``.md`` as plain text, ``.jsonl``/``.json``,
            ``.csv``, ``.parquet``), a local folder whose files are all of one of those kinds
            (read in sorted name order), or a ``datasets`` hub id.
        dataset_config: Hub dataset configuration name; rejected for local paths.
        split: Split to read. Local files have only ``"train"``.
        text_column: Column that contains the text. Ignored for plain-text files, where each
            file is one document.

    Returns:
        One string per row; a missing (null) value becomes ``""``.

    Raises:
        CalibrationDataError: The path or hub id cannot be loaded, the split or column is missing,
            or the column does not hold text.
    """
    table, column = _load_table(dataset, dataset_config, split, text_column)
    return [text or "" for text in table[column]]


def pack_token_stream(
    documents_ids: Iterable[list[int]],
    *,
    seq_len: int,
    num_sequences: int,
    bos_token_id: int | None,
) -> torch.Tensor:
    """Concatenate tokenised documents into one stream and cut it into equal-length sequences.

    Documents with fewer than 2 tokens are dropped. When ``bos_token_id`` is set, every sequence
    starts with it: a sequence whose first stream token is already BOS (a document start for
    tokenizers that add BOS) takes ``seq_len`` stream tokens, any other sequence gets BOS prepended
    and takes ``seq_len - 1``. Documents longer than a sequence continue into the next one. The
    iterable is consumed lazily and no further once ``num_sequences`` sequences are full, and the
    stream tokens after the last full sequence are discarded.

    Args:
        documents_ids: Token ids of each document, e.g. a tokenizer's ``input_ids``.
        seq_len: Tokens per sequence, at least 2.
        num_sequences: Sequences to return, at least 1.
        bos_token_id: Token that starts every sequence, or None to cut the stream as is.

    Returns:
        int64 ``[num_sequences, seq_len]``, in stream order.

    Raises:
        CalibrationDataError: An argument is out of range, or the documents give fewer than
            ``num_sequences`` sequences.
    """
    if seq_len < 2:
        raise CalibrationDataError(f"seq_len must be at least 2, got {seq_len}")
    if num_sequences < 1:
        raise CalibrationDataError(f"num_sequences must be at least 1, got {num_sequences}")

    packed = _pack_sequences(
        documents_ids, seq_len=seq_len, num_sequences=num_sequences, bos_token_id=bos_token_id
    )
    if packed.documents == 0:
        raise CalibrationDataError(
            f"no usable documents: all {packed.skipped_documents} documents have fewer than "
            "2 tokens; pass documents with text"
        )
    if len(packed.sequences) < num_sequences:
        raise CalibrationDataError(
            f"too few tokens: {packed.tokens} tokens in {packed.documents} documents give "
            f"{len(packed.sequences)} sequences of {seq_len} tokens, but num_sequences is "
            f"{num_sequences}; pass more documents or lower seq_len or num_sequences"
        )
    return torch.tensor(packed.sequences, dtype=torch.int64)


def load_calibration_data(
    tokenizer: PreTrainedTokenizerBase,
    dataset: str,
    *,
    seq_len: int,
    num_samples: int,
    holdout: int,
    max_positions: int | None = None,
    dataset_config: str | None = None,
    split: str = "train",
    text_column: str = "text",
) -> CalibrationData:
    """Load documents, tokenise them in batches and pack calibration and holdout sequences.

    Documents are tokenised with the tokenizer's defaults (Llama tokenizers add BOS to each) and
    packed by :func:`pack_token_stream` with ``tokenizer.bos_token_id``. Tokenisation stops once
    ``num_samples + holdout`` sequences are full. Calibration takes the first ``num_samples``
    sequences of the stream and holdout the next ``holdout``.

    NOTE: Tokenisation stops only between documents, so a plain-text file, which is one
    document, is always tokenised whole. Tokenizers that add no BOS (e.g. Qwen2) get their
    documents joined with no separator token.

    Args:
        tokenizer: Tokenizer of the model that will read the sequences.
        dataset: Local file, local folder or hub id, as for :func:`load_documents`.
        seq_len: Tokens per sequence, at least 2 and at most ``max_positions``.
        num_samples: Calibration sequences, at least 1.
        holdout: Holdout sequences, 0 or more.
        max_positions: The model's position limit, e.g. ``config.max_position_embeddings``;
            None skips the check.
        dataset_config, split, text_column: As for :func:`load_documents`.

    Raises:
        CalibrationDataError: An argument is out of range, the data cannot be loaded, or it is
            too short for ``num_samples + holdout`` sequences.
    """
    _check_sizes(
        seq_len=seq_len, num_samples=num_samples, holdout=holdout, max_positions=max_positions
    )
    table, column = _load_table(dataset, dataset_config, split, text_column)
    logger.info("Read %d rows from %s (split %r, column %r)", len(table), dataset, split, column)

    num_sequences = num_samples + holdout
    packed = _pack_sequences(
        _tokenize_documents(tokenizer, table, column),
        seq_len=seq_len,
        num_sequences=num_sequences,
        bos_token_id=tokenizer.bos_token_id,
    )
    if packed.documents == 0:
        raise CalibrationDataError(
            f"no usable documents in {dataset!r}: every document ({packed.skipped_documents} read "
            f"from split {split!r}, column {column!r}) is empty or tokenises to fewer than 2 "
            "tokens; check the file's content, --text-column and --split"
        )
    if not packed.sequences:
        raise CalibrationDataError(
            f"too little text in {dataset!r}: {packed.tokens} tokens in {packed.documents} "
            f"documents do not fill one sequence of --seq-len {seq_len} tokens; "
            "lower --seq-len or add more text"
        )
    if len(packed.sequences) < num_sequences:
        raise CalibrationDataError(
            f"too little text in {dataset!r}: it gives {len(packed.sequences)} sequences of "
            f"{seq_len} tokens, but --num-samples {num_samples} + --holdout {holdout} need "
            f"{num_sequences}; lower --num-samples, --holdout or --seq-len"
        )

    sequences = torch.tensor(packed.sequences, dtype=torch.int64)  # [num_sequences, seq_len]
    logger.info(
        "Packed %d calibration and %d holdout sequences of %d tokens from %d documents "
        "(%d tokens read, %d short documents dropped)",
        num_samples,
        holdout,
        seq_len,
        packed.documents,
        packed.tokens,
        packed.skipped_documents,
    )
    return CalibrationData(
        calibration=sequences[:num_samples],
        holdout=sequences[num_samples:],
        source=dataset,
        documents=packed.documents,
        tokens_available=packed.tokens,
        dataset_config=dataset_config,
        split=split,
        text_column=column,
    )


def _check_sizes(
    *, seq_len: int, num_samples: int, holdout: int, max_positions: int | None
) -> None:
    if seq_len < 2:
        raise CalibrationDataError(f"--seq-len must be at least 2, got {seq_len}")
    if max_positions is not None and seq_len > max_positions:
        raise CalibrationDataError(
            f"--seq-len {seq_len} is above the model's maximum of {max_positions} positions; "
            f"lower --seq-len to {max_positions} or less"
        )
    if num_samples < 1:
        raise CalibrationDataError(f"--num-samples must be at least 1, got {num_samples}")
    if holdout < 0:
        raise CalibrationDataError(f"--holdout must be 0 or more, got {holdout}")


@dataclass
class _PackedSequences:
    sequences: list[list[int]] = field(default_factory=list)
    documents: int = 0  # documents with at least 2 tokens read from the input
    tokens: int = 0  # tokens in those documents
    skipped_documents: int = 0  # documents with fewer than 2 tokens


def _pack_sequences(
    documents_ids: Iterable[list[int]],
    *,
    seq_len: int,
    num_sequences: int,
    bos_token_id: int | None,
) -> _PackedSequences:
    packed = _PackedSequences()
    current: list[int] = []
    for ids in documents_ids:
        if len(ids) < 2:
            packed.skipped_documents += 1
            continue
        packed.documents += 1
        packed.tokens += len(ids)

        position = 0
        while position < len(ids):
            if not current and bos_token_id is not None and ids[position] != bos_token_id:
                # The sequence continues a document, so it needs its own BOS as the sink.
                current.append(bos_token_id)
            take = min(seq_len - len(current), len(ids) - position)
            current.extend(ids[position : position + take])
            position += take
            if len(current) == seq_len:
                packed.sequences.append(current)
                current = []
                if len(packed.sequences) == num_sequences:
                    return packed
    return packed


def _tokenize_documents(
    tokenizer: PreTrainedTokenizerBase, table: datasets.Dataset, column: str
) -> Iterator[list[int]]:
    for batch in table.select_columns([column]).iter(batch_size=_TOKENIZE_BATCH_DOCUMENTS):
        texts = [text or "" for text in batch[column]]
        # verbose=False silences the warning about documents longer than the model, because
        # packing splits them.
        yield from tokenizer(texts, verbose=False)["input_ids"]


def _load_table(
    dataset: str, dataset_config: str | None, split: str, text_column: str
) -> tuple[datasets.Dataset, str]:
    """Load one split and return it with the name of its text column."""
    path = Path(dataset).expanduser()
    if path.exists():
        if dataset_config is not None:
            raise CalibrationDataError(
                f"--dataset-config {dataset_config!r} applies only to hub datasets, but "
                f"{dataset!r} is a local path; drop --dataset-config"
            )
        builder, files = _local_files(path)
        table = _load_local(builder, files, split, source=dataset)
        column = _TEXT_BUILDER_COLUMN if builder == "text" else text_column
    else:
        table = _load_hub(dataset, dataset_config, split)
        column = text_column
    _check_text_column(table, column, source=dataset)
    return table, column


def _local_files(path: Path) -> tuple[str, list[Path]]:
    """Return the builder name and the files to read for a local file or folder."""
    if path.is_file():
        builder = BUILDER_BY_SUFFIX.get(path.suffix.lower())
        if builder is None:
            raise CalibrationDataError(
                f"unsupported file type {path.suffix!r} for {str(path)!r}; "
                f"use one of {', '.join(BUILDER_BY_SUFFIX)}"
            )
        return builder, [path]

    files_by_builder: dict[str, list[Path]] = {}
    skipped: list[str] = []
    for file in sorted(path.iterdir()):
        if not file.is_file() or file.name.startswith("."):
            continue
        builder = BUILDER_BY_SUFFIX.get(file.suffix.lower())
        if builder is None:
            skipped.append(file.name)
        else:
            files_by_builder.setdefault(builder, []).append(file)
    if skipped:
        logger.warning(
            "Skipping %d files of unsupported type in %s: %s", len(skipped), path, skipped
        )

    if not files_by_builder:
        raise CalibrationDataError(
            f"no data files in folder {str(path)!r}; add files of one kind "
            f"({', '.join(BUILDER_BY_SUFFIX)}) or pass a file"
        )
    if len(files_by_builder) > 1:
        found = ", ".join(f"{len(files)} {builder}" for builder, files in files_by_builder.items())
        raise CalibrationDataError(
            f"folder {str(path)!r} mixes file kinds ({found}); keep files of one kind in it "
            "or pass one file"
        )
    [(builder, files)] = files_by_builder.items()
    logger.info("Reading %d %s files from %s", len(files), builder, path)
    return builder, files


def _load_local(builder: str, files: list[Path], split: str, *, source: str) -> datasets.Dataset:
    # sample_by="document" makes each text file one row instead of one row per line.
    options = {"sample_by": "document"} if builder == "text" else {}
    try:
        return datasets.load_dataset(
            builder, data_files=[str(file) for file in files], split=split, **options
        )
    except (OSError, ValueError, DatasetGenerationError) as error:
        if isinstance(error, ValueError):
            _raise_if_unknown_split(error, split, source)
        raise CalibrationDataError(
            f"could not read {source!r} as {builder}: {_one_line(error)}; check the file format"
        ) from error


def _load_hub(dataset: str, dataset_config: str | None, split: str) -> datasets.Dataset:
    try:
        validate_repo_id(dataset)
    except HFValidationError as error:
        raise CalibrationDataError(
            f"dataset {dataset!r} not found: no such local file or folder, and it is not a valid "
            "hub id; check the path"
        ) from error

    try:
        return datasets.load_dataset(dataset, dataset_config, split=split)
    except (OSError, ValueError, DatasetGenerationError) as error:
        if isinstance(error, ValueError):
            _raise_if_unknown_split(error, split, dataset)
        raise CalibrationDataError(
            f"dataset {dataset!r} could not be loaded: no such local file or folder, and loading "
            f"it as a hub dataset failed ({_one_line(error)}); check the path, or the hub id and "
            "the network"
        ) from error


def _raise_if_unknown_split(error: ValueError, split: str, source: str) -> None:
    # `datasets` 5.2 reports 'Unknown split "x". Should be one of [...]' from its arrow reader.
    message = str(error)
    if not message.startswith("Unknown split"):
        return
    available = re.search(r"Should be one of (\[.*\])", message)
    listed = available.group(1) if available else "see the dataset card"
    raise CalibrationDataError(
        f"split {split!r} not found in {source!r}; available splits: {listed}; "
        "pass one of them with --split"
    ) from error


def _check_text_column(table: datasets.Dataset, column: str, *, source: str) -> None:
    if column not in table.column_names:
        raise CalibrationDataError(
            f"column {column!r} not found in {source!r}; available columns: "
            f"{', '.join(table.column_names)}; pass one with --text-column"
        )
    feature = table.features[column]
    if not (isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")):
        type_name = feature.dtype if isinstance(feature, datasets.Value) else repr(feature)
        raise CalibrationDataError(
            f"column {column!r} in {source!r} has type {type_name}, not string; "
            "pass a text column with --text-column"
        )


def _one_line(error: BaseException, max_chars: int = 200) -> str:
    lines = str(error).strip().splitlines()
    text = f"{type(error).__name__}: {lines[0] if lines else ''}"
    return text if len(text) <= max_chars else text[: max_chars - 3] + "..."
