"""Tests for loading documents and packing calibration sequences."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import datasets
import huggingface_hub.constants
import pandas as pd
import pytest
import torch
from transformers import AutoTokenizer

from moa_search.data import load_calibration_data, load_documents, pack_token_stream
from moa_search.errors import CalibrationDataError

BOS = 1

# A comma, quotes and a newline check that every format keeps the text exactly.
DOCUMENTS = [
    "Once upon a time, a cat sat on a mat.",
    'Tom said, "Hi, Mom!"\nThen he ran home.',
    "The end.",
]


@pytest.fixture(scope="module", autouse=True)
def offline_datasets(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Keep `datasets` off the network and its cache out of the home folder."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
        patch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        patch.setattr(
            datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.mktemp("datasets_cache")
        )
        yield


@pytest.fixture(scope="session")
def tokenizer(stories_path: Path) -> Any:
    return AutoTokenizer.from_pretrained(stories_path)


def write_jsonl(path: Path, texts: list[Any], column: str = "text") -> Path:
    lines = [json.dumps({column: text, "id": index}) for index, text in enumerate(texts)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def jsonl_docs(tmp: Path) -> Path:
    return write_jsonl(tmp / "docs.jsonl", DOCUMENTS)


def write_text_files(folder: Path, texts: list[str], suffixes: list[str] | None = None) -> Path:
    folder.mkdir()
    suffixes = suffixes or [".txt"] * len(texts)
    for index, (text, suffix) in enumerate(zip(texts, suffixes, strict=True)):
        (folder / f"{index:02d}{suffix}").write_text(text, encoding="utf-8")
    return folder


def write_jsonl_folder(folder: Path) -> Path:
    folder.mkdir()
    write_jsonl(folder / "part-1.jsonl", DOCUMENTS[2:])
    write_jsonl(folder / "part-0.jsonl", DOCUMENTS[:2])
    return folder


def write_text_file(path: Path) -> Path:
    path.write_text(DOCUMENTS[1], encoding="utf-8")
    return path


def write_table(path: Path) -> Path:
    """Write DOCUMENTS with an extra id column in the format that the suffix names."""
    frame = pd.DataFrame({"id": range(len(DOCUMENTS)), "text": DOCUMENTS})
    if path.suffix == ".json":
        frame.to_json(path, orient="records")  # a JSON array of objects
    elif path.suffix == ".csv":
        frame.to_csv(path, index=False)
    else:
        frame.to_parquet(path)
    return path


@pytest.mark.parametrize(
    ("writer", "expected"),
    [
        # One JSON object per line.
        pytest.param(jsonl_docs, DOCUMENTS, id="jsonl"),
        pytest.param(lambda tmp: write_table(tmp / "docs.json"), DOCUMENTS, id="json"),
        pytest.param(lambda tmp: write_table(tmp / "docs.csv"), DOCUMENTS, id="csv"),
        pytest.param(lambda tmp: write_table(tmp / "docs.parquet"), DOCUMENTS, id="parquet"),
        # A plain-text file is one document, newlines included.
        pytest.param(lambda tmp: write_text_file(tmp / "doc.txt"), DOCUMENTS[1:2], id="text"),
        # One document per file, in sorted name order.
        pytest.param(
            lambda tmp: write_text_files(tmp / "docs", DOCUMENTS), DOCUMENTS, id="text-dir"
        ),
        # .txt, .md and .text are one kind.
        pytest.param(
            lambda tmp: write_text_files(tmp / "docs", DOCUMENTS, [".txt", ".md", ".text"]),
            DOCUMENTS,
            id="text-suffixes-dir",
        ),
        # Files are read in sorted name order, not creation order.
        pytest.param(lambda tmp: write_jsonl_folder(tmp / "docs"), DOCUMENTS, id="jsonl-dir"),
    ],
)
def test_load_documents_formats(
    tmp_path: Path, writer: Callable[[Path], Path], expected: list[str]
) -> None:
    path = writer(tmp_path)

    assert load_documents(str(path)) == expected


def test_load_documents_null_is_empty(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "docs.jsonl", ["a", None])

    assert load_documents(str(path)) == ["a", ""]


def test_load_documents_other_column(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "docs.jsonl", DOCUMENTS, column="content")

    assert load_documents(str(path), text_column="content") == DOCUMENTS


def test_load_documents_skips_other_files(tmp_path: Path) -> None:
    folder = write_text_files(tmp_path / "docs", DOCUMENTS)
    (folder / "LICENSE").write_text("not a document", encoding="utf-8")
    (folder / ".hidden.txt").write_text("not a document", encoding="utf-8")

    assert load_documents(str(folder)) == DOCUMENTS


# Hand-built stream for seq_len 4 with BOS: documents with fewer than 2 tokens are dropped, and a
# sequence that starts inside a document gets BOS plus 3 stream tokens.
PACK_DOCUMENTS = [
    [BOS, 10, 11, 12, 13],
    [],  # empty: dropped
    [BOS],  # BOS only: dropped
    [BOS, 20, 21],
    [BOS, 30, 31, 32, 33, 34, 35, 36],  # longer than seq_len: spans two sequences
]
PACK_EXPECTED_WITH_BOS = [
    [BOS, 10, 11, 12],  # starts at a document boundary, so BOS comes from the stream
    [BOS, 13, BOS, 20],  # continues document 0
    [BOS, 21, BOS, 30],
    [BOS, 31, 32, 33],
    [BOS, 34, 35, 36],
]
# Without a BOS token the stream is cut as is.
PACK_EXPECTED_WITHOUT_BOS = [
    [BOS, 10, 11, 12],
    [13, BOS, 20, 21],
    [BOS, 30, 31, 32],
    [33, 34, 35, 36],
]


@pytest.mark.parametrize(
    ("bos_token_id", "expected"),
    [
        pytest.param(BOS, PACK_EXPECTED_WITH_BOS, id="bos"),
        pytest.param(None, PACK_EXPECTED_WITHOUT_BOS, id="no-bos"),
    ],
)
def test_pack_exact_ids(bos_token_id: int | None, expected: list[list[int]]) -> None:
    packed = pack_token_stream(
        PACK_DOCUMENTS, seq_len=4, num_sequences=len(expected), bos_token_id=bos_token_id
    )

    assert packed.dtype == torch.int64
    assert packed.tolist() == expected


def test_pack_prefix_of_stream() -> None:
    packed = pack_token_stream(PACK_DOCUMENTS, seq_len=4, num_sequences=2, bos_token_id=BOS)

    assert packed.tolist() == PACK_EXPECTED_WITH_BOS[:2]


def test_pack_stops_reading_documents() -> None:
    pulled: list[int] = []

    def documents() -> Iterator[list[int]]:
        for index, ids in enumerate(PACK_DOCUMENTS):
            pulled.append(index)
            yield ids

    pack_token_stream(documents(), seq_len=4, num_sequences=1, bos_token_id=BOS)

    assert pulled == [0]


@pytest.mark.parametrize(
    ("documents_ids", "seq_len", "num_sequences", "match"),
    [
        # The hand-built stream gives 5 sequences, not 6.
        pytest.param(PACK_DOCUMENTS, 4, 6, r"give 5 sequences .* num_sequences is 6", id="short"),
        # Only empty and BOS-only documents.
        pytest.param([[], [BOS]], 4, 1, r"no usable documents", id="no-documents"),
        pytest.param(PACK_DOCUMENTS, 1, 1, r"seq_len must be at least 2, got 1", id="seq-len"),
        pytest.param(PACK_DOCUMENTS, 4, 0, r"num_sequences must be at least 1", id="count"),
    ],
)
def test_pack_errors(
    documents_ids: list[list[int]], seq_len: int, num_sequences: int, match: str
) -> None:
    with pytest.raises(CalibrationDataError, match=match):
        pack_token_stream(
            documents_ids, seq_len=seq_len, num_sequences=num_sequences, bos_token_id=BOS
        )


def test_calibration_exact_ids(tmp_path: Path, tokenizer: Any) -> None:
    short_text = "Hello world."
    long_text = "Once upon a time, there was a little dog named Max."
    path = write_jsonl(tmp_path / "docs.jsonl", ["", short_text, long_text])
    short = tokenizer(short_text)["input_ids"]
    long = tokenizer(long_text)["input_ids"]
    assert short[0] == BOS
    assert len(short) == 8
    assert long[0] == BOS
    assert len(long) >= 9

    data = load_calibration_data(tokenizer, str(path), seq_len=5, num_samples=2, holdout=2)

    # The empty document tokenises to BOS alone and is dropped.
    assert data.calibration.tolist() == [short[0:5], [BOS, *short[5:8], long[0]]]
    assert data.holdout.tolist() == [[BOS, *long[1:5]], [BOS, *long[5:9]]]
    assert data.documents == 2
    assert data.tokens_available == len(short) + len(long)


def test_calibration_zero_holdout(tmp_path: Path, tokenizer: Any) -> None:
    path = write_jsonl(tmp_path / "docs.jsonl", DOCUMENTS)

    data = load_calibration_data(tokenizer, str(path), seq_len=4, num_samples=3, holdout=0)

    assert data.calibration.shape == (3, 4)
    assert data.holdout.shape == (0, 4)
    assert data.holdout.dtype == torch.int64


def write_mixed_folder(folder: Path) -> Path:
    folder.mkdir()
    (folder / "a.txt").write_text(DOCUMENTS[0], encoding="utf-8")
    write_jsonl(folder / "b.jsonl", DOCUMENTS[1:])
    return folder


def write_bad_jsonl(path: Path) -> Path:
    path.write_text('{"text": "unterminated\n', encoding="utf-8")
    return path


def write_unsupported(path: Path) -> Path:
    path.write_text("<doc>text</doc>", encoding="utf-8")
    return path


def make_dir(path: Path) -> Path:
    path.mkdir()
    return path


@pytest.mark.parametrize(
    ("make_dataset", "options", "match"),
    [
        # An absolute path that does not exist cannot be a hub id either.
        pytest.param(
            lambda tmp: str(tmp / "missing.txt"),
            {},
            r"not found: no such local file or folder, and it is not a valid hub id",
            id="missing-file",
        ),
        # A valid hub id with the hub unreachable (offline mode here).
        pytest.param(
            lambda tmp: "nobody/no-such-dataset",
            {},
            r"'nobody/no-such-dataset' could not be loaded: no such local file or folder, "
            r"and loading it as a hub dataset failed \(ConnectionError: ",
            id="missing-hub-id",
        ),
        pytest.param(
            jsonl_docs,
            {"text_column": "body"},
            r"column 'body' not found in .*; available columns: text, id; pass one with",
            id="missing-column",
        ),
        pytest.param(
            jsonl_docs,
            {"text_column": "id"},
            r"column 'id' in .* has type int64, not string",
            id="int-column",
        ),
        pytest.param(
            jsonl_docs,
            {"split": "validation"},
            r"split 'validation' not found in .*; available splits: \['train'\]",
            id="missing-split",
        ),
        pytest.param(
            jsonl_docs,
            {"dataset_config": "default"},
            r"--dataset-config 'default' applies only to hub datasets",
            id="config-for-local",
        ),
        # The three documents give 16 + 24 + 5 = 45 tokens, less than one sequence of 64.
        pytest.param(
            jsonl_docs,
            {"seq_len": 64},
            r"too little text in .*: 45 tokens in 3 documents do not fill one sequence of "
            r"--seq-len 64 tokens",
            id="no-sequence",
        ),
        # Documents 0 and 1 fill one sequence each, and the 13 tokens left fill no third.
        pytest.param(
            jsonl_docs,
            {"seq_len": 16, "num_samples": 2, "holdout": 1},
            r"it gives 2 sequences of 16 tokens, but --num-samples 2 \+ --holdout 1 need 3; "
            r"lower --num-samples, --holdout or --seq-len",
            id="too-few-sequences",
        ),
        pytest.param(
            lambda tmp: str(write_jsonl(tmp / "docs.jsonl", ["", None])),
            {},
            r"no usable documents in .*: every document \(2 read from split",
            id="no-usable-documents",
        ),
        pytest.param(
            jsonl_docs,
            {"seq_len": 600, "max_positions": 512},
            r"--seq-len 600 is above the model's maximum of 512 positions; lower --seq-len",
            id="seq-len-above-max",
        ),
        pytest.param(jsonl_docs, {"seq_len": 1}, r"--seq-len must be at least 2", id="seq-len"),
        pytest.param(
            jsonl_docs, {"num_samples": 0}, r"--num-samples must be at least 1", id="num-samples"
        ),
        pytest.param(jsonl_docs, {"holdout": -1}, r"--holdout must be 0 or more", id="holdout"),
        pytest.param(
            lambda tmp: write_mixed_folder(tmp / "docs"),
            {},
            r"mixes file kinds \(1 text, 1 json\)",
            id="mixed-folder",
        ),
        pytest.param(lambda tmp: make_dir(tmp / "docs"), {}, r"no data files", id="empty-folder"),
        pytest.param(
            lambda tmp: write_unsupported(tmp / "docs.xml"),
            {},
            r"unsupported file type '.xml'",
            id="unsupported-file",
        ),
        pytest.param(
            lambda tmp: write_bad_jsonl(tmp / "docs.jsonl"),
            {},
            r"could not read .* as json: .*; check the file format",
            id="malformed-jsonl",
        ),
    ],
)
def test_calibration_errors(
    tmp_path: Path,
    tokenizer: Any,
    make_dataset: Callable[[Path], Any],
    options: dict[str, Any],
    match: str,
) -> None:
    dataset = str(make_dataset(tmp_path))
    arguments: dict[str, Any] = {"seq_len": 4, "num_samples": 1, "holdout": 0, **options}

    with pytest.raises(CalibrationDataError, match=match) as raised:
        load_calibration_data(tokenizer, dataset, **arguments)

    assert "\n" not in str(raised.value)


def test_calibration_tinystories(tinystories_path: Path, tokenizer: Any) -> None:
    data = load_calibration_data(
        tokenizer, str(tinystories_path), seq_len=512, num_samples=4, holdout=2, max_positions=512
    )

    assert data.calibration.shape == (4, 512)
    assert data.holdout.shape == (2, 512)
    assert data.calibration.dtype == torch.int64
    assert data.holdout.dtype == torch.int64
    assert data.calibration[:, 0].tolist() == [BOS] * 4
    assert data.holdout[:, 0].tolist() == [BOS] * 2

    # The file is one document, so the first row is the start of its token stream.
    text = tinystories_path.read_text(encoding="utf-8")[:4000]
    assert data.calibration[0].tolist() == tokenizer(text)["input_ids"][:512]

    provenance = data.provenance()
    digest = hashlib.sha256(
        data.calibration.numpy().tobytes() + data.holdout.numpy().tobytes()
    ).hexdigest()
    assert json.loads(json.dumps(provenance)) == provenance
    assert provenance["source"] == str(tinystories_path)
    assert provenance["seq_len"] == 512
    assert provenance["num_samples"] == 4
    assert provenance["num_holdout"] == 2
    assert provenance["documents"] == 1
    assert provenance["tokens_available"] > 6 * 512
    assert provenance["token_ids_sha256"] == digest
