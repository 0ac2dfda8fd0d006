"""One Session conformance suite, the same tests over every engine (docs/design.md §4, issue 6).

Each engine's artifact is exported once per test session from the tiny checkpoint with unquantized
weights and cache (fp16 KV where the engine has no fp32 cache), so every engine must match the PyTorch
reference within the "exact" bound. An engine is skipped only when tests/engines.py's probe finds that
its native build cannot run on this machine (and test_engines.py then fails).
"""
from __future__ import annotations

import numpy as np
import pytest

import runtime
from edge.config import HybridConfig
from edge.errors import EdgeError
from edge.formats import ENGINES, FORMATS, REFERENCE_ENGINE
from conftest import ARTIFACT_MAX_SEQ_LEN as MAX_SEQ_LEN
from engines import needs
from parity import assert_parity, random_ids, reference_logits, session_logits

# the PyTorch reference (the checkpoint dir itself), then every format of the registry; the `engine`
# marker skips a format, with the cause, where its engine's native build cannot run here
PARAMS = [REFERENCE_ENGINE, *(pytest.param(f, marks=needs(f)) for f in FORMATS)]


@pytest.fixture(scope="module", params=PARAMS)
def session(request, tiny_dir, tiny_artifact):
    fmt = request.param
    path = tiny_dir if fmt == REFERENCE_ENGINE else tiny_artifact(fmt)
    with runtime.load(path, n_threads=1, max_seq_len=MAX_SEQ_LEN) as s:
        yield s


@pytest.fixture
def fresh(session):
    session.reset()
    return session


def test_self_sufficient_metadata(fresh, tiny_dir):
    expected = HybridConfig.load(tiny_dir)
    c = fresh.config
    assert (c.vocab_size, c.num_hidden_layers, c.attention_layers, c.hidden_size) == (
        expected.vocab_size, expected.num_hidden_layers, expected.attention_layers, expected.hidden_size)
    assert fresh.max_seq_len == MAX_SEQ_LEN
    assert fresh.n_threads == 1
    assert fresh.n_past == 0
    assert fresh.engine in ENGINES
    assert fresh.tokenizer is not None, "artifacts carry their tokenizer"


def test_prefill_decode_matches_reference(fresh, tiny_dir):
    ids = random_ids(fresh.vocab_size, seed=1)
    got = session_logits(fresh, ids)
    assert got.dtype == np.float32 and got.shape[1] == fresh.vocab_size
    assert fresh.n_past == len(ids)
    assert_parity(reference_logits(tiny_dir, ids), got, "exact")


def test_reset_gives_identical_logits(fresh):
    ids = random_ids(fresh.vocab_size, seed=2, n=12)
    first = fresh.prefill(ids)
    for t in random_ids(fresh.vocab_size, seed=3, n=5):
        fresh.decode(t)
    fresh.reset()
    assert fresh.n_past == 0
    again = fresh.prefill(ids)  # stale state from the first sequence must not leak in
    np.testing.assert_allclose(again, first, rtol=0, atol=1e-5 * float(np.abs(first).max()))
    decoded = [fresh.decode(t) for t in (5, 6)]
    fresh.reset()
    fresh.prefill(ids)
    np.testing.assert_allclose([fresh.decode(t) for t in (5, 6)], decoded, rtol=0,
                               atol=1e-5 * float(np.abs(first).max()))


def test_generate_is_deterministic_with_a_seed(fresh):
    prompt = random_ids(fresh.vocab_size, seed=4, n=6)
    kwargs = dict(max_new_tokens=12, temperature=0.9, top_k=50, top_p=0.95, stop_at_eos=False)
    first = list(fresh.generate(prompt, seed=7, **kwargs))
    fresh.reset()
    second = list(fresh.generate(prompt, seed=7, **kwargs))
    assert first == second and len(first) == 12
    assert fresh.n_past == len(prompt) + 12
    assert all(0 <= t < fresh.vocab_size for t in first)


def test_streaming_text_through_the_tokenizer(fresh):
    pieces = list(fresh.stream_text("def main():", max_new_tokens=24, stop_at_eos=False))
    assert all(isinstance(p, str) for p in pieces)
    fresh.reset()
    ids = list(fresh.generate(fresh.encode("def main():"), max_new_tokens=24, stop_at_eos=False))
    text = fresh.tokenizer.decode(ids, skip_special_tokens=True)
    # the stream holds back an incomplete UTF-8 character (random weights can end on a stray byte token)
    shown = "".join(pieces)
    assert text.startswith(shown) and (shown == text or text.endswith("\ufffd"))
    assert shown or text.endswith("\ufffd")


def test_context_overflow_is_one_line(fresh):
    fresh.prefill(random_ids(fresh.vocab_size, seed=5, n=MAX_SEQ_LEN - 2))
    with pytest.raises(EdgeError, match="context overflow") as e:
        fresh.prefill([1, 2, 3])
    assert "\n" not in str(e.value)
    assert fresh.n_past == MAX_SEQ_LEN - 2, "a refused call leaves the context as it was"
    fresh.decode(3)
    fresh.decode(4)  # the last position is usable
    with pytest.raises(EdgeError, match="context overflow"):
        fresh.decode(5)


def test_token_id_out_of_range_is_one_line(fresh):
    for bad in ([fresh.vocab_size], [1, -1]):
        with pytest.raises(EdgeError, match="out of range") as e:
            fresh.prefill(bad)
        assert "\n" not in str(e.value)
    assert fresh.n_past == 0


def test_kv_cache_bytes_grow_with_n_past(fresh):
    start = fresh.kv_cache_bytes()
    fresh.prefill(random_ids(fresh.vocab_size, seed=6, n=8))
    after_prefill = fresh.kv_cache_bytes()
    for t in range(16):
        fresh.decode(t)
    after_decode = fresh.kv_cache_bytes()
    assert 0 <= start < after_prefill < after_decode
    # the tiny model's grouped fp32/fp16 cache: 2 attention layers x K,V x 2 kv heads x 32 dims per token
    per_token = 2 * 2 * 2 * 32
    assert per_token * 2 * 16 <= after_decode - after_prefill <= per_token * 4 * 16 + 4096
    fresh.reset()
    assert fresh.kv_cache_bytes() <= start


@pytest.mark.parametrize("fmt", PARAMS)
def test_one_set_of_load_options(fmt, tiny_dir, tiny_artifact):
    """Every engine takes the same options; a KV cache fixed at export is refused in one line naming the
    engine (the registry declares which engines pick it at load), and a session is a context manager."""
    spec = FORMATS.get(fmt)
    path = tiny_dir if spec is None else tiny_artifact(fmt)
    other = next(k for k in (spec.kv_caches if spec else ("q8_0",)) if k != (spec.exact_kv_cache if spec else None))
    cls = runtime.backend_for(path)
    assert issubclass(cls, runtime.Session) and cls.format is spec
    if spec is not None and spec.kv_cache_at_load:
        with runtime.load(path, n_threads=1, kv_cache=other) as s:
            assert s.kv_cache == other
    else:
        with pytest.raises(EdgeError, match="fixed at export") as e:
            runtime.load(path, n_threads=1, kv_cache=other)
        assert "\n" not in str(e.value) and cls.engine in str(e.value)
    with pytest.raises(EdgeError, match="takes no option 'threads'"):
        runtime.load(path, threads=1)
    with runtime.load(path, n_threads=1, max_seq_len=MAX_SEQ_LEN // 2) as s:
        assert s.max_seq_len == MAX_SEQ_LEN // 2
        closed, close = [], s.close
        s.close = lambda: (closed.append(True), close())  # what __exit__ calls
    assert closed == [True]
