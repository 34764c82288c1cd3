"""Text -> ids -> windows (mxmoe_jax.data): reading, both window cutters, the tiny tokenizer."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import TINY_MODEL, require_shared

from mxmoe_jax.data import (
    load_tokenizer,
    read_texts,
    sample_windows,
    token_windows,
    tokenize_texts,
    whole_windows,
)


def test_whole_windows_drop_the_remainder_and_keep_order():
    ids = np.arange(23, dtype=np.int32)
    w = whole_windows(ids, 5)
    assert w.shape == (4, 5) and w[0, 0] == 0 and w[-1, -1] == 19
    assert whole_windows(ids, 5, max_windows=2).shape == (2, 5)
    with pytest.raises(ValueError, match="fewer than one window"):
        whole_windows(ids, 50)
    with pytest.raises(ValueError, match="seqlen"):
        whole_windows(ids, 1)
    with pytest.raises(ValueError, match="max_windows"):
        whole_windows(ids, 5, max_windows=0)


def test_sample_windows_are_seeded_slices_of_the_ids():
    ids = np.arange(100, dtype=np.int32)
    w = sample_windows(ids, 10, 6, seed=42)
    assert w.shape == (6, 10)
    assert np.all(np.diff(w, axis=1) == 1)  # each row a contiguous slice
    assert np.all(w[:, -1] < 99)  # the original's sampler never takes the last token
    np.testing.assert_array_equal(w, sample_windows(ids, 10, 6, seed=42))
    assert not np.array_equal(w, sample_windows(ids, 10, 6, seed=0))
    with pytest.raises(ValueError, match="not more than seqlen"):
        sample_windows(ids, 100, 1)
    with pytest.raises(ValueError, match="positive"):
        sample_windows(ids, 10, 0)


def test_token_windows_picks_the_cutter():
    ids = np.arange(50, dtype=np.int32)
    np.testing.assert_array_equal(token_windows(ids, seqlen=8, nsamples=3, sampling="whole"),
                                  whole_windows(ids, 8, 3))
    np.testing.assert_array_equal(token_windows(ids, seqlen=8, nsamples=3, seed=1),
                                  sample_windows(ids, 8, 3, seed=1))
    with pytest.raises(ValueError, match="sampling"):
        token_windows(ids, seqlen=8, nsamples=3, sampling="random")


def test_read_texts_joins_files_by_a_blank_line(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("one", encoding="utf-8")
    b.write_text("two", encoding="utf-8")
    assert read_texts([a]) == "one"
    assert read_texts([a, str(b)]) == "one\n\ntwo"
    with pytest.raises(ValueError, match="at least one"):
        read_texts([])
    with pytest.raises(TypeError, match="list of files"):
        read_texts(str(a))  # one path, not its characters
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_texts([tmp_path / "missing.txt"])


def test_load_tokenizer_needs_a_local_tokenizer(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer"):
        load_tokenizer(tmp_path)


def test_tiny_tokenizer_tokenizes_once_to_int32(tmp_path):
    require_shared(TINY_MODEL)
    tok = load_tokenizer(TINY_MODEL)
    f = tmp_path / "t.txt"
    f.write_text("The cat sat on the mat. " * 20, encoding="utf-8")
    ids = tokenize_texts(tok, [f])
    assert ids.dtype == np.int32 and ids.ndim == 1
    np.testing.assert_array_equal(ids, tok(f.read_text(encoding="utf-8"))["input_ids"])
