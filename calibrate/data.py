"""Calibration data: `.npy` token ids, or `.txt` / `.jsonl` text tokenized with the model's tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

_TEXT_KEYS = ("text", "content", "prompt", "question")


def _jsonl_texts(path: Path) -> list[str]:
    texts = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{lineno} is not valid JSON ({err}).") from err
        if isinstance(record, str):
            texts.append(record)
        elif isinstance(record, dict) and any(isinstance(record.get(k), str) for k in _TEXT_KEYS):
            texts.append(next(record[k] for k in _TEXT_KEYS if isinstance(record.get(k), str)))
        elif isinstance(record, dict) and isinstance(record.get("messages"), list):
            texts.append("\n".join(str(m.get("content", "")) for m in record["messages"] if isinstance(m, dict)))
        else:
            raise ValueError(f"{path}:{lineno} has no text field (expected one of {_TEXT_KEYS} or 'messages').")
    return texts


def load_calibration_tokens(path, tokenizer=None, num_tokens: int | None = None, offset: int = 0) -> torch.Tensor:
    """Token ids `[N]` (int64) from `path`, starting at `offset`, at most `num_tokens` of them.

    Text documents are tokenized one by one and joined with the tokenizer's EOS token, so that no document bleeds
    into the next without a separator.
    """
    # A negative offset would count from the end (Python slicing) and be recorded as if it counted from the start.
    if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
        raise ValueError(f"offset must be a non-negative integer (the first token used), got {offset!r}.")
    if num_tokens is not None and (not isinstance(num_tokens, int) or isinstance(num_tokens, bool) or num_tokens < 1):
        raise ValueError(f"num_tokens must be a positive integer or None, got {num_tokens!r}.")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Calibration data {path} does not exist.")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        ids = np.load(path, mmap_mode="r", allow_pickle=False)
        if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"{path} must hold a 1-D integer array of token ids, got {ids.dtype} {ids.shape}.")
        end = None if num_tokens is None else offset + num_tokens
        tokens = torch.from_numpy(np.array(ids[offset:end], dtype=np.int64))
    elif suffix in (".txt", ".jsonl"):
        if tokenizer is None:
            raise ValueError(f"{path} is text: a tokenizer is needed to turn it into token ids.")
        texts = [path.read_text()] if suffix == ".txt" else _jsonl_texts(path)
        eos = tokenizer.eos_token_id
        ids: list[int] = []
        needed = None if num_tokens is None else offset + num_tokens
        for text in texts:
            ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
            if eos is not None:
                ids.append(eos)
            if needed is not None and len(ids) >= needed:
                break
        tokens = torch.tensor(ids[offset:needed], dtype=torch.long)
    else:
        raise ValueError(f"Unsupported calibration data {path}: use .npy token ids, or .txt / .jsonl text.")
    if num_tokens is not None and tokens.numel() < num_tokens:
        raise ValueError(f"{path} holds {tokens.numel()} tokens from offset {offset}; {num_tokens} were requested.")
    return tokens
