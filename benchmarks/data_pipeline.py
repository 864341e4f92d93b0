"""Shipyard's corpus pipeline against Hugging Face `datasets`, and a worker's memory against the
corpus's size, in one run.

1. Tokenize and pack a generated JSONL corpus of about 100 MB (this machine's Python library
   sources, repeated with a unique first line) with the same tokenizer: Shipyard's Ray Data
   pipeline (read, split by document, tokenize and pack in tasks, write the token files) against
   `datasets.load_dataset("json")` + `.map(batched=True, num_proc=2)` tokenizing and appending
   the end token. Prints tokens per second of each and the ratio (goal ≥ 1.0).
2. Train the tiny GPT for a few steps on the default corpus and on one ten times larger, and
   print rank 0's peak resident memory of each and the ratio (goal ≤ 1.2).

    .venv/bin/python benchmarks/data_pipeline.py [--megabytes 100]
"""

from __future__ import annotations

import argparse
import json
import sysconfig
import tempfile
import time
from pathlib import Path

from shipyard.data.corpus import prepare_corpus
from shipyard.data.tokenizer import train_bpe
from shipyard.runtime.local import ray_runtime
from shipyard.spec.job import JobSpec
from shipyard.spec.load import validate

VOCABULARY = 8192


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=int, default=100, help="size of the JSONL corpus")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="shipyard-data-bench-"))
    corpus = write_corpus(folder / "corpus.jsonl", args.megabytes * 1_000_000)
    tokenizer_folder = folder / "tokenizer"
    train_bpe(sample_texts(corpus, 5_000_000), VOCABULARY, 2).save(tokenizer_folder)
    size = corpus.stat().st_size / 1e6
    print(f"corpus: {size:.0f} MB of JSONL, BPE of {VOCABULARY} tokens")

    # Three times each, interleaved: this machine's neighbours move either side by a fifth.
    shipyard_runs, datasets_runs = [], []
    for attempt in range(3):
        with ray_runtime():
            shipyard_runs.append(
                shipyard_pipeline(corpus, tokenizer_folder, folder / f"runs-{attempt}")
            )
        datasets_runs.append(datasets_pipeline(corpus, tokenizer_folder, folder / f"hf-{attempt}"))
    tokens = shipyard_runs[0][1]
    assert all(count == tokens for _, count in shipyard_runs + datasets_runs), "same tokens"
    shipyard_seconds = min(seconds for seconds, _ in shipyard_runs)
    datasets_seconds = min(seconds for seconds, _ in datasets_runs)
    shown = lambda runs: " / ".join(f"{seconds:.1f} s" for seconds, _ in runs)  # noqa: E731
    print(f"shipyard (Ray Data)       : {tokens:,} tokens in {shown(shipyard_runs)}")
    print(f"datasets (map, num_proc=2): {tokens:,} tokens in {shown(datasets_runs)}")
    print(
        f"ratio shipyard/datasets   : {datasets_seconds / shipyard_seconds:.2f}  (best of "
        "each; goal >= 1.0)"
    )

    default, larger = worker_peaks(folder)
    print(f"worker peak RSS, default corpus: {default[0]:.0f} MiB ({default[1]:.1f} MB corpus)")
    print(f"worker peak RSS, 10x corpus    : {larger[0]:.0f} MiB ({larger[1]:.1f} MB corpus)")
    print(f"ratio 10x/default              : {larger[0] / default[0]:.3f}  (goal <= 1.2)")


def write_corpus(path: Path, size: int) -> Path:
    """JSONL documents of the Python library's sources, each copy with a unique first line."""
    root = Path(sysconfig.get_paths()["stdlib"])
    sources = [p.read_text(encoding="utf-8", errors="replace") for p in sorted(root.glob("*.py"))]
    written, copy = 0, 0
    with path.open("w") as file:
        while written < size:
            for text in sources:
                line = json.dumps({"text": f"# copy {copy}\n{text}"}) + "\n"
                file.write(line)
                written += len(line)
                if written >= size:  # the sizes asked for, not whole copies of the library
                    break
            copy += 1
    return path


def sample_texts(path: Path, size: int):
    total = 0
    with path.open() as file:
        for line in file:
            text = json.loads(line)["text"]
            yield text
            total += len(text)
            if total > size:
                return


def shipyard_pipeline(corpus: Path, tokenizer: Path, storage: Path) -> tuple[float, int]:
    job = validate(
        JobSpec,
        {
            "name": "data-bench",
            "storage": str(storage),
            "data": {"source": str(corpus), "validation_fraction": 0.01},
            "tokenizer": {"path": str(tokenizer)},
            "model": {"vocabulary_size": VOCABULARY},
        },
        source="<benchmark>",
    )
    started = time.perf_counter()
    prepared = prepare_corpus(job)
    seconds = time.perf_counter() - started
    return seconds, sum(prepared.tokens.values())


def datasets_pipeline(corpus: Path, tokenizer: Path, folder: Path) -> tuple[float, int]:
    """`datasets` reading the same JSONL and tokenizing it with the same tokenizer, batched,
    on two processes, appending the end-of-text token to every document."""
    import datasets
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer / "tokenizer.json"))
    end = fast.convert_tokens_to_ids("<|endoftext|>")

    def tokenize(batch):
        ids = fast(batch["text"], add_special_tokens=False)["input_ids"]
        return {"input_ids": [[*each, end] for each in ids]}

    started = time.perf_counter()
    loaded = datasets.load_dataset(
        "json", data_files=str(corpus), split="train", cache_dir=str(folder / "hf-cache")
    )
    tokenized = loaded.map(tokenize, batched=True, num_proc=2, remove_columns=["text"])
    tokens = sum(len(ids) for ids in tokenized["input_ids"])
    return time.perf_counter() - started, tokens


def worker_peaks(folder: Path) -> tuple[tuple[float, float], tuple[float, float]]:
    """Rank 0's peak resident memory training on the default corpus and on one ten times it."""
    from shipyard.train.trainer import run_training

    peaks = []
    for scale in (1, 10):
        corpus = write_corpus(folder / f"scaled-{scale}.jsonl", scale * 2_000_000)
        job = validate(
            JobSpec,
            {
                "name": f"memory-{scale}",
                "storage": str(folder / "runs"),
                "data": {"source": str(corpus)},
                "train": {"max_steps": 30, "eval_every": 30, "checkpoint_every": 30},
            },
            source="<benchmark>",
        )
        with ray_runtime():
            result = run_training(job)
        peak = max(row["rss_mib"] for row in result.history)
        peaks.append((peak, corpus.stat().st_size / 1e6))
    return peaks[0], peaks[1]


if __name__ == "__main__":
    main()
