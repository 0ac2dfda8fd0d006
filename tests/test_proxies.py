"""The quality proxies' seam (registry, interface) and the MAD tasks: each generator's own property, and
attention solving the recall tasks that a conv-only backbone cannot, at a size that runs in seconds."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from arch_search.proxies import (DEFAULT_PROXY, LMProxy, MADSuite, Proxy, ProxyContext, TaskProxy, parse_proxy, proxy_usages,
                                 register, score)
from arch_search.tasks import IGNORE, MAD_TASKS, compression, fuzzy_recall, in_context_recall, memorization, \
    noisy_recall, selective_copying
from edge.config import HybridConfig
from edge.errors import EdgeError


def backbone(layer_types, hidden=64) -> HybridConfig:
    return HybridConfig(vocab_size=1024, hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=len(layer_types),
                        num_attention_heads=2, num_key_value_heads=1, layer_types=layer_types, block_multiple_of=64)


# ---- generators -----------------------------------------------------------------------------------
def test_recall_labels_are_the_values_of_keys_seen_before():
    x, y = in_context_recall(16, np.random.default_rng(0))
    assert x.shape == y.shape == (16, 128) and x.max() < 16
    for row_x, row_y in zip(x, y):
        mapping, seen = {}, set()
        for t in range(0, 128, 2):
            k, v = row_x[t], row_x[t + 1]
            assert mapping.setdefault(k, v) == v           # one value per key within a sequence
            assert row_y[t] == (v if k in seen else IGNORE)  # scored once the key was presented
            seen.add(k)
    assert (in_context_recall(16, np.random.default_rng(0))[0] == x).all()  # seeded


def test_noisy_recall_scores_no_noise_slot():
    x, y = noisy_recall(32, np.random.default_rng(1))
    noise = x >= 16
    assert 0.1 < noise.mean() < 0.3                     # 20% of the pair slots
    assert (y[noise] == IGNORE).all() and (y[y != IGNORE] >= 8).all()


def test_fuzzy_recall_values_follow_their_keys():
    x, y = fuzzy_recall(64, np.random.default_rng(2))
    assert x.shape == (64, 64) and (y != IGNORE).any()
    scored = y != IGNORE
    assert (y[scored] >= 7).all() and (y[scored] < 14).all()  # values come from the upper half
    # a scored label is the next input token (the model predicts the value token that follows)
    assert (x[:, 1:][scored[:, :-1]] == y[:, :-1][scored[:, :-1]]).all()


def test_selective_copying_asks_for_the_tokens_in_order():
    x, y = selective_copying(8, np.random.default_rng(3))
    copy_at = int(np.argmax(x[0] == 15))
    for row_x, row_y in zip(x, y):
        assert row_x[copy_at] == 15
        body = row_x[:copy_at]
        assert (row_y[copy_at:copy_at + 8] == body[body != 14]).all()


def test_compression_and_memorization_properties():
    x, y = compression(8, np.random.default_rng(4))
    assert (x == y).all() and (x[:, -1] == 15).all() and (x[:, :-1] < 15).all()
    a, ya = memorization(8, np.random.default_rng(5))
    b, yb = memorization(8, np.random.default_rng(6))
    facts = {}
    for xs, ys in ((a, ya), (b, yb)):  # one fixed map, whatever the sequence's seed
        for k, v in zip(xs[:, 0::2].ravel(), ys[:, 1::2].ravel()):
            assert facts.setdefault(k, v) == v
    assert (a[:, 1::2] == 2047).all()


# ---- the proxies ----------------------------------------------------------------------------------
@pytest.mark.parametrize("task", ["recall", "noisy_recall"])
def test_attention_solves_recall_and_a_conv_only_backbone_does_not(task):
    proxy = parse_proxy(f"mad:{task}:120")
    attention, details = score(proxy, backbone(["conv", "full_attention"]), ProxyContext())
    conv_only, _ = score(proxy, backbone(["conv", "conv"]), ProxyContext())
    assert attention > 0.9 and conv_only < 0.5, (attention, conv_only)
    assert details["quality_s"] > 0 and details[f"mad:{task}"]["steps"] == 120


def test_every_mad_task_trains_and_scores_an_accuracy():
    for name in MAD_TASKS:
        value, _ = score(parse_proxy(f"mad:{name}:2"), backbone(["conv", "full_attention"]), ProxyContext())
        assert 0.0 <= value <= 1.0, name


def test_specs_round_trip_and_bad_specs_are_one_line(tmp_path):
    for spec in ("params", "mqar:50", "mad:30", "mad:recall:40", "lm:25"):
        proxy = parse_proxy(spec)
        assert parse_proxy(proxy.spec().replace("python-stdlib:", "")).spec() == proxy.spec()
    assert isinstance(parse_proxy("mad"), MADSuite) and isinstance(parse_proxy("mad:fuzzy_recall"), TaskProxy)
    assert isinstance(parse_proxy("lm"), LMProxy) and parse_proxy("lm").corpus is None
    corpus = tmp_path / "c.txt"
    corpus.write_text("x = 1\n" * 100)
    assert parse_proxy(f"lm:{corpus}:7").steps == 7 and parse_proxy(f"lm:{corpus}").corpus == str(corpus)
    for bad in ("bleu", "mad:spelling", "mqar:0", "params:3", "lm:/no/such/file", "mad:recall:x"):
        with pytest.raises(EdgeError) as e:
            parse_proxy(bad)
        assert "\n" not in str(e.value)
    import arch_search.derive  # noqa: F401  registers distill, as arch_search.cli does
    assert {u.split("[")[0].split(":")[0] for u in proxy_usages()} == {"lm", "mqar", "mad", "params", "distill"}


def test_a_new_proxy_is_one_registered_class():
    class Width(Proxy):
        name, direction, label, trains, cost = "width", "maximize", "width", False, "free"

        def evaluate(self, config, ctx):
            return float(config.hidden_size), {}

    register("width", "width")(lambda argument, spec: Width())
    try:
        value, details = score(parse_proxy("width"), backbone(["conv", "full_attention"]), ProxyContext())
        assert value == 64 and "quality_s" in details
    finally:
        from arch_search import proxies
        proxies._REGISTRY.pop("width")


def test_lm_proxy_worst_is_a_uniform_guess():
    assert LMProxy().worst(ProxyContext(vocab_size=1024)) == pytest.approx(math.log(1024))
    assert parse_proxy("mqar").worst(ProxyContext()) == 0.0


def test_the_stdlib_corpus_splits_by_module():
    from edge.corpus import describe, stdlib_files

    train, heldout = set(stdlib_files("train")), set(stdlib_files("heldout"))
    assert train and heldout and not train & heldout
    assert train | heldout == set(stdlib_files("all"))
    assert 0.03 < len(heldout) / len(train | heldout) < 0.2   # HELDOUT_SHARE = 0.1 by path hash
    assert not any("site-packages" in p.parts or "test" in p.parts for p in train)
    assert describe()["heldout_files"] == len(heldout)


def test_the_search_default_is_the_proxy_the_validation_chose():
    """`edge search` without --quality runs the proxy that benchmarks/proxy_validation.py's committed records
    choose (`choose_default`): changing the default means re-measuring and committing the records."""
    from edge.cli import build_parser

    records = Path(__file__).resolve().parents[1] / "benchmarks/results/proxy_validation/report.json"
    assert parse_proxy(DEFAULT_PROXY).spec() == json.loads(records.read_text())["default"]
    args = build_parser().parse_args(["search", "--target", "gguf", "--out", "x"])
    assert args.quality is None   # arch_search/cli.py resolves it to DEFAULT_PROXY
    search = build_parser()._subparsers._group_actions[0].choices["search"]
    assert f"default {DEFAULT_PROXY}" in " ".join(search.format_help().split())
