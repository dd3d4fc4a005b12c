"""What `oscar-eval` and `oscar-calibrate` share: argument types that refuse bad values while parsing, checks of token
files and output paths made before any model is loaded, and one way of turning a user error into a message and exit
status 2 (argparse's own convention: `PROG: error: MESSAGE` on stderr)."""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

# Errors that describe bad input (a missing file, a value out of range, a model that cannot be used): reported as a
# message and exit status 2 instead of a traceback.
USER_ERRORS = (ValueError, OSError, RuntimeError)


def int_at_least(low: int, what: str) -> Callable[[str], int]:
    """An argparse `type` for integers >= `low`; `what` describes them in the error ("a positive integer")."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer; expected {what}.") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} is out of range; expected {what}.")
        return value

    parse.__name__ = what  # argparse names the type in some messages
    return parse


positive_int = int_at_least(1, "a positive integer")
non_negative_int = int_at_least(0, "a non-negative integer (0 or more)")


def non_negative_float(text: str) -> float:
    """An argparse `type` for finite floats >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number; expected a non-negative number.") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text} is out of range; expected a finite non-negative number.")
    return value


def run_main(parser: argparse.ArgumentParser, argv: list[str] | None, run: Callable[[argparse.Namespace], int]) -> int:
    """Parse `argv` and call `run(args)`; returns the exit status instead of raising `SystemExit`: 0 for `--help`,
    2 with argparse's message for a bad argument, 2 with `PROG: error: MESSAGE` for a `USER_ERRORS` from `run`."""
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else 2
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return run(args)
    except USER_ERRORS as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 2


def load_token_array(path: str | os.PathLike, flag: str) -> np.ndarray:
    """The token ids of a `.npy` file, memory-mapped: a 1-D array of an integer dtype (bool, float and 2-D arrays are
    refused rather than truncated or flattened; pickled objects are never loaded). Raises `ValueError` /
    `FileNotFoundError` naming `flag` (the option that gave the path)."""
    path = Path(path)
    if path.suffix.lower() != ".npy":
        raise ValueError(f"{flag} {path}: expected a .npy file of token ids (tokenize text first).")
    if not path.is_file():
        raise FileNotFoundError(f"{flag} {path}: no such file.")
    try:
        ids = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as err:  # object arrays (pickles), a broken header
        raise ValueError(
            f"{flag} {path} is not a plain array of token ids ({err}); Python objects are never loaded."
        ) from err
    check_token_array(ids, f"{flag} {path}")
    return ids


def check_token_array(ids: np.ndarray, where: str) -> None:
    """`ids` must be a 1-D array of an integer dtype."""
    if ids.dtype == np.bool_ or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(
            f"{where} holds {ids.dtype} values; token ids are integers. Save them with an integer dtype "
            "(np.save(path, ids.astype(np.int32)))."
        )
    if ids.ndim != 1:
        raise ValueError(
            f"{where} has shape {ids.shape}; token ids must be one 1-D sequence (documents concatenated, separated by "
            "the EOS id). Flatten it yourself if that is what it means."
        )


def check_token_ids(ids, vocab_size: int | None, where: str) -> None:
    """Every id in `ids` must lie in [0, vocab_size): an id outside would index past the embedding table."""
    ids = np.asarray(ids)
    if ids.size == 0 or vocab_size is None:
        return
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= vocab_size:
        raise ValueError(
            f"{where} holds token ids in [{low}, {high}], outside the model's vocabulary [0, {vocab_size}): the file "
            "was tokenized for another model."
        )


def vocab_size(config) -> int | None:
    """The vocabulary size of a model config (the text config's, for multimodal models)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    size = getattr(text, "vocab_size", None)
    return size if isinstance(size, int) and size > 0 else None


def check_writable_file(path: str | os.PathLike, flag: str) -> None:
    """`path` can be created as a file: not a directory, under a folder that exists or can be created."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{flag} {path} is a directory; pass a file name.")
    _check_creatable(path.parent, flag, path)


def check_output_dir(path: str | os.PathLike, flag: str) -> None:
    """`path` is or can become a writable directory (not an existing file)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {path} exists and is not a directory; pass a directory (new or existing).")
    _check_creatable(path, flag, path)


def _check_creatable(directory: Path, flag: str, target: Path) -> None:
    existing = directory.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{flag} {target}: {existing} is a file, so nothing can be created under it.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {target}: {existing} is not writable.")
