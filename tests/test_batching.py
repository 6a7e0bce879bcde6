"""Data to batches: formats, masks, truncation, the token cache, packing, resumable order."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mlx_tune.data.batching import PAD_SEGMENT, BatchStream, pack
from mlx_tune.data.cache import load_dataset, load_splits
from mlx_tune.data.tokenize import tokenize_record
from mlx_tune.errors import UserError
from mlx_tune.testing.tiny import tiny_tokenizer

# Backend-sensitive: `make test-accelerator` runs this file on the Metal/CUDA code path too.
pytestmark = pytest.mark.accelerator

TWO_TURNS = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "yo"},
        {"role": "user", "content": "and?"},
        {"role": "assistant", "content": "done"},
    ]
}


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def load(path, tok, tmp_path, **kw):
    kw.setdefault("max_seq_length", 256)
    return load_dataset(path, tok, cache_dir=tmp_path / "cache", **kw)


def test_formats_detected(tok, tmp_path):
    cases = {
        "chat": [TWO_TURNS],
        "completions": [{"prompt": "2+2=", "completion": "4"}],
        "text": [{"text": "plain words"}],
    }
    for fmt, rows in cases.items():
        ds = load(write_jsonl(tmp_path / f"{fmt}.jsonl", rows), tok, tmp_path)
        assert ds.stats.format == fmt
        assert len(ds) == 1


def test_bad_lines_named_with_file_and_line(tok, tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [{"text": "ok"}, "{not json", {"text": "fine"}, {"foo": 1}])
    with pytest.raises(UserError) as err:
        load(path, tok, tmp_path)
    msg = str(err.value)
    assert f"{path}:2:" in msg and f"{path}:4:" in msg
    assert f"{path}:1:" not in msg and f"{path}:3:" not in msg


def _segments(tok, parts):
    """ids and expected train mask from (text, trained) pieces rendered one by one."""
    ids, mask = [], []
    for text, trained in parts:
        piece = tok.encode(text, add_special_tokens=False)
        ids += piece
        mask += [trained] * len(piece)
    return ids, mask


def test_chat_mask_every_assistant_turn_token_by_token(tok):
    ids, train, ok = tokenize_record(tok, TWO_TURNS, "chat", mask_prompt=True)
    want_ids, want_mask = _segments(tok, [
        ("<|im_start|>system\nBe brief.<|im_end|>\n", False),
        ("<|im_start|>user\nhi<|im_end|>\n", False),
        ("<|im_start|>assistant\n", False),
        ("yo<|im_end|>", True),  # the end-of-turn token is trained: the model learns to stop
        ("\n", False),
        ("<|im_start|>user\nand?<|im_end|>\n", False),
        ("<|im_start|>assistant\n", False),
        ("done<|im_end|>", True),
        ("\n", False),
    ])
    assert ok
    assert ids == want_ids
    assert train == want_mask
    assert tok.decode([i for i, t in zip(ids, train) if t]) == "yo<|im_end|>done<|im_end|>"

    ids2, train2, _ = tokenize_record(tok, TWO_TURNS, "chat", mask_prompt=False)
    assert ids2 == ids and all(train2)


def test_completions_mask(tok):
    ids, train, _ = tokenize_record(tok, {"prompt": "2+2=", "completion": "4"}, "completions")
    # rendered as a user/assistant chat (the tokenizer has a template), completion + eos trained
    assert tok.decode([i for i, t in zip(ids, train) if t]) == "4<|im_end|>"
    assert "2+2=" in tok.decode([i for i, t in zip(ids, train) if not t])

    from mlx_lm.tokenizer_utils import TokenizerWrapper

    from mlx_tune.testing.tiny import tiny_hf_tokenizer

    hf = tiny_hf_tokenizer()
    hf.chat_template = None
    plain = TokenizerWrapper(hf, eos_token_ids=[2])
    ids, train, _ = tokenize_record(plain, {"prompt": "Q: a", "completion": " b"}, "completions")
    assert ids == plain.encode("Q: a") + plain.encode(" b") + [2]
    assert train == [False] * 4 + [True] * 3


def test_text_trains_all_tokens_with_eos(tok):
    ids, train, _ = tokenize_record(tok, {"text": "abc"}, "text")
    assert ids[-1] == 2 and all(train)


def test_truncation_counted_or_dropped(tok, tmp_path):
    rows = [{"text": "x" * 100}, {"text": "short"}, {"text": "y" * 50}]
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    ds = load(path, tok, tmp_path, max_seq_length=20)
    assert ds.stats.truncated == 2 and ds.stats.dropped_long == 0 and len(ds) == 3
    assert max(len(x) - 1 for x in ds.ids) == 20
    assert "2 truncated" in ds.stats.summary()
    ds = load(path, tok, tmp_path, max_seq_length=20, truncation="drop")
    assert ds.stats.dropped_long == 2 and len(ds) == 1
    assert "dropped" in ds.stats.summary()


def test_prompt_only_after_truncation_is_dropped_and_counted(tok, tmp_path):
    chat = {"messages": [{"role": "user", "content": "z" * 80}, {"role": "assistant", "content": "ok"}]}
    path = write_jsonl(tmp_path / "c.jsonl", [chat, TWO_TURNS])
    ds = load(path, tok, tmp_path, max_seq_length=40)
    assert ds.stats.dropped_untrained == 1 and len(ds) == 1


def test_cache_hit_and_invalidation(tok, tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [TWO_TURNS, {"messages": TWO_TURNS["messages"][:3]}])
    a = load(path, tok, tmp_path)
    b = load(path, tok, tmp_path)
    assert not a.stats.cache_hit and b.stats.cache_hit
    assert all((x == y).all() for x, y in zip(a.ids, b.ids))
    assert all((x == y).all() for x, y in zip(a.train, b.train))
    assert list((tmp_path / "cache").glob("*.npz"))
    assert not list((tmp_path / "cache").glob(".tmp-*"))
    write_jsonl(path, [TWO_TURNS])  # the file changes: tokenised again
    c = load(path, tok, tmp_path)
    assert not c.stats.cache_hit and len(c) == 1
    d = load(path, tok, tmp_path, mask_prompt=False)  # other options: another cache entry
    assert not d.stats.cache_hit


def test_load_splits(tok, tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [TWO_TURNS])
    write_jsonl(tmp_path / "valid.jsonl", [TWO_TURNS])
    out = load_splits(tmp_path, tok, max_seq_length=128, cache_dir=tmp_path / "cache")
    assert set(out) == {"train", "valid"}
    with pytest.raises(UserError, match="train.jsonl"):
        load_splits(tmp_path / "cache", tok, max_seq_length=128)


def _random_dataset(tok, tmp_path, n=60, seed=0):
    rng = np.random.default_rng(seed)
    rows = [{"text": "".join(rng.choice(list("abcdef "), size=int(rng.integers(3, 90))))} for _ in range(n)]
    return load(write_jsonl(tmp_path / f"r{seed}.jsonl", rows), tok, tmp_path, max_seq_length=64)


def test_pack_respects_capacity_and_uses_every_example():
    rng = np.random.default_rng(1)
    lengths = rng.integers(1, 65, size=500)
    rows = pack(lengths, 64)
    assert sorted(i for r in rows for i in r) == list(range(500))
    assert all(sum(lengths[i] for i in r) <= 64 for r in rows)
    assert len(rows) <= int(np.ceil(lengths.sum() / 64 * 1.1)) + 1  # near the lower bound


def test_packed_batches(tok, tmp_path):
    ds = _random_dataset(tok, tmp_path)
    stream = BatchStream(ds, 4, 64, seed=3)
    seen = 0
    for _ in range(len(stream)):
        b = next(stream)
        seg, pos = np.array(b.segment_ids), np.array(b.positions)
        inputs, targets, mask = np.array(b.inputs), np.array(b.targets), np.array(b.loss_mask)
        assert inputs.shape == (4, 64) and mask.dtype == np.float32
        assert b.n_tokens == int((seg != PAD_SEGMENT).sum()) and b.n_trained == int(mask.sum())
        assert not mask[seg == PAD_SEGMENT].any()
        for r in range(4):
            for s in set(seg[r].tolist()) - {PAD_SEGMENT}:
                where = np.flatnonzero(seg[r] == s)
                assert (np.diff(where) == 1).all() and (pos[r, where] == np.arange(len(where))).all()
                # targets are the inputs shifted by one inside each example
                assert (targets[r, where[:-1]] == inputs[r, where[1:]]).all()
        seen += b.n_tokens
    assert seen <= ds.stats.tokens


def test_unpacked_batches_group_similar_lengths(tok, tmp_path):
    ds = _random_dataset(tok, tmp_path)
    stream = BatchStream(ds, 4, 64, packing=False, seed=0)
    lengths = np.sort(ds.lengths())
    for _ in range(len(stream)):
        b = next(stream)
        assert b.segment_ids is None and b.positions is None
        rows = np.array(b.loss_mask).sum(axis=1)
        assert b.inputs.shape[1] % 32 == 0 and b.inputs.shape[1] <= 64
        assert rows.max() - rows[rows > 0].min() <= np.diff(lengths).max() * 4 + 1


def _batches(stream, n):
    return [np.array(next(stream).inputs) for _ in range(n)]


def test_determinism_and_exact_resume(tok, tmp_path):
    ds = _random_dataset(tok, tmp_path)
    a = BatchStream(ds, 2, 64, seed=7)
    n = 2 * len(a) + 3  # crosses two epoch boundaries
    ref = _batches(a, n)
    assert all((x == y).all() for x, y in zip(ref, _batches(BatchStream(ds, 2, 64, seed=7), n)))
    assert not all((x == y).all() for x, y in zip(ref, _batches(BatchStream(ds, 2, 64, seed=8), n)))
    for cut in (1, len(a), len(a) + 2):
        s = BatchStream(ds, 2, 64, seed=7)
        _batches(s, cut)
        state = json.loads(json.dumps(s.state_dict()))  # survives a JSON checkpoint
        r = BatchStream(ds, 2, 64, seed=7)
        r.load_state_dict(state)
        assert all((x == y).all() for x, y in zip(ref[cut:], _batches(r, n - cut)))
    with pytest.raises(UserError, match="cannot resume"):
        BatchStream(ds, 3, 64, seed=7).load_state_dict(state)


def test_two_ranks_partition_the_batches(tok, tmp_path):
    ds = _random_dataset(tok, tmp_path)
    one = _batches(BatchStream(ds, 2, 64, seed=1), 12)
    r0 = _batches(BatchStream(ds, 2, 64, seed=1, rank=0, world_size=2), 6)
    r1 = _batches(BatchStream(ds, 2, 64, seed=1, rank=1, world_size=2), 6)
    assert all((x == y).all() for x, y in zip(one[0::2], r0))
    assert all((x == y).all() for x, y in zip(one[1::2], r1))


def test_validation_pass_is_ordered_and_complete(tok, tmp_path):
    ds = _random_dataset(tok, tmp_path)
    stream = BatchStream(ds, 4, 64, shuffle=False, loop=False)
    batches = list(stream)
    assert len(batches) == len(stream)
    assert sum(b.n_tokens for b in batches) == ds.stats.tokens
    assert len({b.inputs.shape for b in batches}) == 1
