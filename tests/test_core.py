"""The model core against Hugging Face transformers, checkpoints, config validation, the reference Session."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import TINY, VARIANTS
from edge.checkpoint import load_model, save_model
from edge.config import HybridConfig, preset
from edge.errors import ConfigError, EdgeError
from edge.model import DynamicCache
from parity import random_ids

import runtime


def rel(ref, got):
    return float((ref - got).abs().max() / (ref.max() - ref.min()))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_matches_transformers(checkpoints, variant):
    from transformers import Lfm2ForCausalLM

    path = checkpoints(variant)
    ours = load_model(path)
    hf = Lfm2ForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    assert (hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()) == ours.config.tie_word_embeddings
    ids = torch.tensor([random_ids(ours.config.vocab_size, seed=1, n=48)])
    with torch.no_grad():
        ref = hf(ids, use_cache=False).logits
        got = ours(ids, 0, DynamicCache(ours.config))
    assert rel(ref, got) <= 1e-4


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_prefill_then_decode_equals_full_forward(checkpoints, variant):
    model = load_model(checkpoints(variant))
    ids = torch.tensor([random_ids(model.config.vocab_size, seed=2)])
    with torch.no_grad():
        full = model(ids, 0, DynamicCache(model.config))
        cache = DynamicCache(model.config)
        steps = [model(ids[:, :32], 0, cache)]
        steps += [model(ids[:, i:i + 1], i, cache) for i in range(32, 64)]
    assert rel(full, torch.cat(steps, dim=1)) <= 1e-5
    assert cache.n_past == (64 if model.config.attention_layers else 0)


def test_hf_saved_checkpoint_loads(tmp_path, tiny_dir):
    """A checkpoint written by transformers itself (its own config.json keys) loads bit-exactly."""
    from transformers import Lfm2ForCausalLM

    Lfm2ForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).save_pretrained(tmp_path)
    ours, theirs = load_model(tiny_dir), load_model(tmp_path)
    assert ours.config.layer_types == theirs.config.layer_types
    for (name, a), b in zip(ours.state_dict().items(), theirs.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("variant", ["tiny", "untied"])
def test_save_load_round_trip_is_bit_exact(tmp_path, checkpoints, variant):
    model = load_model(checkpoints(variant))
    save_model(model, tmp_path)
    again = load_model(tmp_path)
    assert again.config == model.config
    for (name, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name
    assert ("lm_head.weight" in load_file(tmp_path / "model.safetensors")) == (variant == "untied")


def test_sharded_checkpoint(tmp_path, tiny_dir):
    state = load_file(tiny_dir / "model.safetensors")
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for shard, keys in shards.items():
        save_file({k: state[k] for k in keys}, tmp_path / shard)
    weight_map = {k: shard for shard, keys in shards.items() for k in keys}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (tmp_path / "config.json").write_text((tiny_dir / "config.json").read_text())
    for a, b in zip(load_model(tiny_dir).state_dict().values(), load_model(tmp_path).state_dict().values()):
        assert torch.equal(a, b)


def test_pickled_weights_are_refused(tmp_path, tiny_dir):
    (tmp_path / "config.json").write_text((tiny_dir / "config.json").read_text())
    torch.save({}, tmp_path / "pytorch_model.bin")
    with pytest.raises(EdgeError, match="pickled weights .*pytorch_model.bin.* re-save them as safetensors"):
        load_model(tmp_path)


def test_truncated_weights_are_a_clear_error(tmp_path, tiny_dir):
    (tmp_path / "config.json").write_text((tiny_dir / "config.json").read_text())
    data = (tiny_dir / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(EdgeError, match="corrupt or truncated"):
        load_model(tmp_path)


def test_shape_mismatch_is_a_clear_error(tmp_path, tiny_dir):
    config = json.loads((tiny_dir / "config.json").read_text())
    config["hidden_size"] = 256
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").write_bytes((tiny_dir / "model.safetensors").read_bytes())
    with pytest.raises(EdgeError, match="has shape .* config.json implies"):
        load_model(tmp_path)


@pytest.mark.parametrize("changes, message", [
    (dict(num_key_value_heads=3), "not divisible by num_key_value_heads"),
    (dict(hidden_size=132, num_attention_heads=4, num_key_value_heads=2), "head_dim 33 .* is odd"),
    (dict(hidden_size=130), "not divisible by num_attention_heads"),
    (dict(layer_types=["conv"] * 5), "layer_types has 5 entries but num_hidden_layers is 6"),
    (dict(conv_L_cache=1), "conv_L_cache must be an integer >= 2"),
    (dict(layer_types=["conv", "mamba", "conv", "conv", "conv", "conv"]), "unknown layer type 'mamba'"),
    (dict(vocab_size=0), "vocab_size must be a positive integer"),
    (dict(eos_token_id=5000), "eos_token_id 5000 is outside the vocabulary"),
])
def test_bad_configs_are_rejected(changes, message):
    with pytest.raises(ConfigError, match=message):
        TINY.replace(**changes)


def test_legacy_config_keys_and_ffn_rule():
    legacy = dict(model_type="lfm2", hidden_size=1024, num_hidden_layers=16, num_attention_heads=16,
                  num_key_value_heads=8, block_ff_dim=6656, full_attn_idxs=[2, 5, 8, 10, 12, 14],
                  theta=1e6, tie_embedding=True, vocab_size=65536)
    config = HybridConfig.from_dict(legacy)
    assert config.ffn_dim == 4608 and config.attention_layers == [2, 5, 8, 10, 12, 14]
    assert preset("lfm2-700m").ffn_dim == 6912 and preset("lfm2-1.2b").ffn_dim == 8192
    assert preset("lfm2-350m").n_params() == 354_483_968  # the model card's count
    assert HybridConfig.from_dict({"num_hidden_layers": 2}).layer_types == ["full_attention"] * 2
    with pytest.raises(ConfigError, match="model_type is 'llama'"):
        HybridConfig.from_dict({"model_type": "llama"})


# ---- the reference Session ------------------------------------------------------------------------
def test_reference_session_api(tiny_dir):
    s = runtime.load(tiny_dir)
    ids = random_ids(s.vocab_size, seed=3, n=10)
    last = s.prefill(ids)
    assert last.shape == (s.vocab_size,) and last.dtype == np.float32
    assert s.n_past == 10 and s.kv_cache_bytes() == 2 * 2 * 10 * TINY.num_key_value_heads * TINY.head_dim * 4
    nxt = s.decode(42)
    assert nxt.shape == (s.vocab_size,) and s.n_past == 11
    s.reset()
    assert s.n_past == 0 and s.kv_cache_bytes() == 0
    np.testing.assert_allclose(s.prefill(ids), last, rtol=0, atol=1e-5)


def test_reference_session_errors(tiny_dir):
    s = runtime.load(tiny_dir, max_seq_len=8)
    with pytest.raises(EdgeError, match="token id 1024 is out of range for vocab size 1024"):
        s.prefill([1, 1024])
    with pytest.raises(EdgeError, match="context overflow: 0 cached \\+ 9 new tokens exceed max_seq_len 8"):
        s.prefill(list(range(9)))
    with pytest.raises(EdgeError, match="empty token list"):
        s.prefill([])
    with pytest.raises(EdgeError, match="unknown artifact type '.json'"):
        runtime.load(tiny_dir / "config.json")


def test_generate_greedy_and_seeded_sampling(tiny_dir):
    s = runtime.load(tiny_dir)
    prompt = s.encode("def main():")
    greedy = [list(s.generate(prompt, 8)) for _ in range(2) if s.reset() is None]
    assert greedy[0] == greedy[1] and len(greedy[0]) >= 1
    sampled = []
    for _ in range(2):
        s.reset()
        sampled.append(list(s.generate(prompt, 8, temperature=1.0, top_k=50, top_p=0.9, seed=7,
                                       stop_at_eos=False)))
    assert sampled[0] == sampled[1] and len(sampled[0]) == 8


# ---- CLI --------------------------------------------------------------------------------------------
def edge(*args):
    return subprocess.run([sys.executable, "-m", "edge.cli", *map(str, args)], capture_output=True, text=True)


def test_cli_init_info_run(tmp_path):
    out = tmp_path / "m"
    r = edge("init", out, "--preset", "tiny", "--seed", "3")
    assert r.returncode == 0, r.stderr
    assert (out / "config.json").exists() and (out / "tokenizer.json").exists()
    r = edge("info", out)
    assert r.returncode == 0 and "attention at [2, 5]" in r.stdout, r.stderr
    r1, r2 = edge("run", out, "--prompt", "import os", "-n", "5"), edge("run", out, "--prompt", "import os", "-n", "5")
    assert r1.returncode == 0 and r1.stdout == r2.stdout and r1.stdout.strip(), r1.stderr


def test_cli_errors_are_one_line(tmp_path):
    r = edge("info", tmp_path / "missing")
    assert r.returncode == 1 and r.stderr.strip().count("\n") == 0 and "does not exist" in r.stderr
    (tmp_path / "config.json").write_text('{"model_type": "lfm2", "num_attention_heads": 5}')
    r = edge("info", tmp_path)
    assert r.returncode == 1 and r.stderr.strip().count("\n") == 0
    assert "not divisible" in r.stderr and "Traceback" not in r.stderr


def test_trained_checkpoint_is_more_predictable_than_random(checkpoints):
    """The "trained:" fixtures really learned: lower loss on held-in text than the random model."""
    from edge.tokenizer import default_corpus, load_tokenizer

    random_dir, trained_dir = checkpoints("tiny"), checkpoints("trained:tiny")
    ids = torch.tensor([load_tokenizer(random_dir).encode(default_corpus()[:4000]).ids[:128]])
    losses = []
    for path in (random_dir, trained_dir):
        model = load_model(path)
        with torch.no_grad():
            logits = model(ids[:, :-1], 0, DynamicCache(model.config))
        losses.append(float(torch.nn.functional.cross_entropy(logits[0], ids[0, 1:])))
    assert losses[1] < losses[0] - 0.5, losses


def test_atomic_write_leaves_nothing_on_failure_and_normal_mode(tmp_path):
    import os

    from edge.files import atomic_path

    target = tmp_path / "a.bin"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []
    with atomic_path(target) as tmp:
        tmp.write_bytes(b"whole")
    umask = os.umask(0)
    os.umask(umask)
    assert target.read_bytes() == b"whole" and (target.stat().st_mode & 0o777) == 0o666 & ~umask
