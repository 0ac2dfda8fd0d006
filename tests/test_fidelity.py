"""Each format's default 4-bit export meets docs/design.md §5's 4-bit bound against transformers (issues 15, 27).

The checkpoints are parity.GQA_8_2 (4 layers, 8 query heads, 2 KV heads) with random weights from
transformers' own `Lfm2ForCausalLM` init, and the same after a short training on text; the reference is
transformers' logits over the §5 protocol (prefill + decode).
Every export takes the format's defaults (group/block size, embedding quant) with only the 4-bit weight
format named, and the format's 8-bit KV cache — except GGUF, whose q8_0 cache needs head_dim % 32 and keeps
f16 at this head_dim 16. benchmarks/bench_fidelity.py measures the frontier these defaults were chosen on.
"""
from __future__ import annotations

import pytest

import runtime
from conftest import ARTIFACT_MAX_SEQ_LEN, TINY
from engines import needs
from edge.formats import FORMATS
from export import export_model
from parity import GQA_8_2, assert_parity, random_ids, session_logits, transformers_checkpoint, transformers_logits

# format -> (its default 4-bit weights, the KV cache): GGUF's is iq4_xs, the fewest bytes per token of llama.cpp's
# 4-bit types within the bound (benchmarks/RESULTS.md, issue 27; at this width of 128 llama.cpp stores it as
# IQ4_NL, its 32-value form); q4_0 (with the importance matrix by default) is held to the bound too
FOUR_BIT = {"gguf": ("iq4_xs", "f16"), "gguf-q4_0": ("q4_0", "f16"), "executorch": ("8da4w", "int8"),
            "onnx": ("int4", "int8")}
IDS = random_ids(TINY.vocab_size)


@pytest.fixture(scope="module")
def gqa_checkpoints(tmp_path_factory, tokenizer):
    """kind -> checkpoint: "random" (transformers' init) and "trained" (that one after TRAIN_STEPS of
    edge.train on the default corpus), the two kinds docs/design.md §5 holds every 4-bit default to."""
    pytest.importorskip("transformers")
    from conftest import TRAIN_STEPS
    from edge.checkpoint import load_model, save_model
    from edge.tokenizer import default_corpus, save_tokenizer
    from edge.train import train_on_text

    random_dir = transformers_checkpoint(tmp_path_factory.mktemp("gqa_8_2"), tokenizer, TINY.replace(**GQA_8_2))
    model = load_model(random_dir)
    train_on_text(model.train(), tokenizer, default_corpus(), TRAIN_STEPS, seed=0, threads=1)
    trained_dir = tmp_path_factory.mktemp("gqa_8_2_trained")
    save_model(model, trained_dir)
    save_tokenizer(tokenizer, trained_dir)
    return {"random": random_dir, "trained": trained_dir}


@pytest.fixture(scope="module")
def transformers_reference(gqa_checkpoints):
    cache = {}

    def get(kind):
        if kind not in cache:
            cache[kind] = transformers_logits(gqa_checkpoints[kind], IDS)
        return cache[kind]

    return get


@pytest.mark.parametrize("kind", ["random", "trained"])
@pytest.mark.parametrize("setting", [pytest.param(f, marks=needs(f.split("-")[0])) for f in FOUR_BIT])
def test_default_4bit_export_meets_the_bound(setting, kind, gqa_checkpoints, transformers_reference, tmp_path):
    fmt, (quant, kv_cache) = setting.split("-")[0], FOUR_BIT[setting]
    artifact = export_model(fmt, gqa_checkpoints[kind], tmp_path / f"gqa{FORMATS[fmt].suffix}", quant=quant,
                            kv_cache=kv_cache, max_seq_len=ARTIFACT_MAX_SEQ_LEN)
    session = runtime.load(artifact, n_threads=1)
    try:
        assert_parity(transformers_reference(kind), session_logits(session, IDS), "4bit")
    finally:
        session.close()
