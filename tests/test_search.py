"""`edge search`: the space, real measurements (GGUF through llama.cpp), the study's resume and dedupe,
two workers on a real PostgreSQL server, and the quality proxies."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import optuna
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import runtime
from arch_search.budgets import parse_budget
from arch_search.candidates import RandomBackbones
from arch_search.measure import MeasureSettings, measure, summary
from arch_search.proxies import ProxyContext, parse_proxy, score
from arch_search.space import LFM2_ATTENTION, SPACES, Candidate, distributions, lfm2_layout, seed_params, suggest
from arch_search.tasks import multiquery_ar
from edge.cli import main as edge
from edge.config import HybridConfig
from runtime.isolate import MeasureFailed

VOCAB = 1024  # the conftest tokenizer's
FAST = dict(prefill_tokens=(128,), decode_depth=64, n_gen=16, repetitions=3)
# budgets of the CLI searches below: the small seeded LFM2 layouts prefill 64 tokens in ~1-3 ms, the
# d8 one in ~15 ms; 6 ms splits them by a factor of 2 either way
SEARCH = ["--target", "gguf", "--quality", "params", "--space", "tiny", "--budget", "prefill_ms@64=6",
          "--budget", "decode_ms@64=50", "-t", "1"]


@pytest.fixture(scope="session")
def tokenizer_file(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("search_tok") / "tokenizer.json"
    tokenizer.save(str(path))
    return path


# ---- the space ------------------------------------------------------------------------------------
def params_of(space: str):
    """A hypothesis strategy over every parameter value the space's distributions allow."""
    strategies = {}
    for name, dist in distributions(space).items():
        if isinstance(dist, optuna.distributions.CategoricalDistribution):
            strategies[name] = st.sampled_from(dist.choices)
        elif isinstance(dist, optuna.distributions.IntDistribution):
            strategies[name] = st.integers(dist.low, dist.high)
        else:
            n = round((dist.high - dist.low) / dist.step)
            strategies[name] = st.integers(0, n).map(lambda i, d=dist: d.low + i * d.step)
    return st.fixed_dictionaries(strategies)


def check_valid(c: Candidate, space: str):
    b = SPACES[space]
    config = c.to_config()  # HybridConfig validates on construction
    assert isinstance(config, HybridConfig)
    assert config.vocab_size == VOCAB
    assert b.depth[0] <= c.depth <= b.depth[1] and config.num_hidden_layers == c.depth
    assert c.hidden == c.heads * c.head_dim and c.head_dim % 32 == 0  # llama.cpp KV blocks of 32
    assert c.heads % c.kv_heads == 0 and 1 <= c.kv_heads <= c.heads
    assert config.ffn_dim == c.ffn and c.ffn % 32 == 0 and c.ffn >= b.ffn_multiple_of
    assert 1 <= len(c.attention) < c.depth and all(0 <= i < c.depth for i in c.attention)  # a hybrid
    assert config.attention_layers == list(c.attention)
    assert c.l_cache in b.l_cache and config.conv_L_cache == c.l_cache
    assert len(c.hash) == 16 and c.hash == Candidate.from_dict(c.to_dict(), space).hash


@pytest.mark.parametrize("space", list(SPACES))
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_space_never_yields_an_invalid_config(space, data):
    params = data.draw(params_of(space))
    candidate = suggest(optuna.trial.FixedTrial(params), space, VOCAB)
    check_valid(candidate, space)
    # the same parameters always give the same candidate, the same hash
    assert suggest(optuna.trial.FixedTrial(params), space, VOCAB).hash == candidate.hash


@pytest.mark.parametrize("space", list(SPACES))
def test_random_and_nsga2_samplers_stay_in_the_space(space):
    for sampler in (optuna.samplers.RandomSampler(seed=1), optuna.samplers.NSGAIISampler(seed=2, population_size=4)):
        study = optuna.create_study(directions=["maximize", "minimize"], sampler=sampler)
        for i in range(40):
            trial = study.ask()
            c = suggest(trial, space, VOCAB)
            check_valid(c, space)
            study.tell(trial, [c.hidden * c.depth, i % 7])


def test_hash_is_the_model_not_the_parameters():
    base = {"depth": 4, "heads": 4, "head_dim": 32, "ffn_mult": 3.0, "l_cache": 3,
            **{f"layer_{i}": t for i, t in enumerate(["conv", "attention", "conv", "attention"])}}
    # kv_group 4 and 3 both give 1 KV head for 4 heads: one model, one hash
    a = suggest(optuna.trial.FixedTrial({**base, "kv_group": 4}), "tiny", VOCAB)
    b = suggest(optuna.trial.FixedTrial({**base, "kv_group": 4, "layer_7": "attention"}), "tiny", VOCAB)
    c = suggest(optuna.trial.FixedTrial({**base, "kv_group": 2}), "tiny", VOCAB)
    assert a.hash == b.hash and a.hash != c.hash
    # picks are repaired into hybrids (llama.cpp runs neither conv-only nor attention-only lfm2 models)
    conv_only = suggest(optuna.trial.FixedTrial({**base, "kv_group": 1, "layer_1": "conv", "layer_3": "conv"}),
                        "tiny", VOCAB)
    assert conv_only.attention == (3,)
    attention_only = suggest(optuna.trial.FixedTrial({**base, "kv_group": 1, "layer_0": "attention",
                                                      "layer_2": "attention"}), "tiny", VOCAB)
    assert attention_only.attention == (1, 2, 3)


def test_lfm2_layouts_seed_the_space():
    assert lfm2_layout(16) == LFM2_ATTENTION
    for space in SPACES:
        seeds = seed_params(space)
        assert seeds
        for params in seeds:
            c = suggest(optuna.trial.FixedTrial(params), space, VOCAB)
            check_valid(c, space)
            assert c.attention == lfm2_layout(c.depth)
    # the full space holds LFM2-350M's shape exactly
    c = suggest(optuna.trial.FixedTrial(seed_params("full")[0]), "full", 65536)
    real = HybridConfig.from_dict({**c.to_config().to_dict()})
    assert (real.hidden_size, real.ffn_dim, real.num_attention_heads, real.num_key_value_heads,
            real.attention_layers) == (1024, 4608, 16, 8, list(LFM2_ATTENTION))


# ---- measurements ----------------------------------------------------------------------------------
SMALL = Candidate(depth=3, hidden=64, heads=2, kv_heads=1, ffn=128, attention=(1,), l_cache=3, vocab_size=VOCAB)
SMALL_2ATTN = Candidate(depth=3, hidden=64, heads=2, kv_heads=1, ffn=128, attention=(1, 2), l_cache=3,
                        vocab_size=VOCAB)
# the largest model of the tiny space: depth 8, width 256, FFN 4.5x
LARGEST_TINY = Candidate(depth=8, hidden=256, heads=8, kv_heads=2, ffn=1152, attention=(1, 4, 7), l_cache=4,
                         vocab_size=VOCAB)


def measure_candidate(c: Candidate, tokenizer_file, settings: MeasureSettings, workdir: Path) -> dict:
    checkpoint = RandomBackbones("tiny", tokenizer_file, VOCAB).write_checkpoint(c, workdir / "checkpoint")
    return measure(checkpoint, settings, workdir)


@pytest.fixture(scope="session")
def measured(tokenizer_file, tmp_path_factory):
    work = tmp_path_factory.mktemp("measure")
    s = MeasureSettings(target="gguf", **FAST)
    out = {}
    # 600 MiB in this (parent) process: a child's peak RSS must not include it (ru_maxrss would)
    ballast = bytearray(600 * 2**20)
    ballast[::4096] = b"x" * len(ballast[::4096])
    for name, c in (("small", SMALL), ("small_2attn", SMALL_2ATTN), ("largest", LARGEST_TINY)):
        started = time.perf_counter()
        result = measure_candidate(c, tokenizer_file, s, work / name)
        out[name] = (result, summary(result, s), time.perf_counter() - started)
    del ballast
    return out


@pytest.mark.engine("llamacpp")
def test_measured_figures_are_plausible(measured):
    (small, small_fig, _), (big, big_fig, big_s) = measured["small"], measured["largest"]
    # decode latency grows with depth and width (8 layers x 256 wide vs 3 x 64: several times the work)
    assert big_fig["decode_ms"] > 1.5 * small_fig["decode_ms"], (big_fig, small_fig)
    assert big_fig["prefill_ms@128"] > 1.5 * small_fig["prefill_ms@128"]
    assert big_fig["artifact_mb"] > 4 * small_fig["artifact_mb"]
    for result, fig in ((small, small_fig), (big, big_fig)):
        assert result["engine"] == "llamacpp"
        for test in (result["decode"], *result["prefill"].values()):
            assert len(test["samples_ms"]) == 3 and all(x > 0 for x in test["samples_ms"])
            assert test["cv"] >= 0 and 1 <= test["attempts"] <= 3
            assert min(test["samples_ms"]) <= test["median_ms"] <= max(test["samples_ms"])
        assert 10 < fig["peak_rss_mb"] < 500  # the child's own memory, not the 600 MiB of its parent
    # measuring a candidate of the tiny space (build, export, bench) takes under 20 s, the largest included
    assert big_s < 20, f"measuring the largest tiny candidate took {big_s:.1f} s"


@pytest.mark.engine("llamacpp")
def test_kv_bytes_grow_with_attention_blocks_and_context(measured):
    one, two = measured["small"][0], measured["small_2attn"][0]
    assert one["kv_bytes_at"]["64"] > 0
    assert two["kv_bytes_at"]["64"] == 2 * one["kv_bytes_at"]["64"]  # twice the attention layers
    assert one["kv_bytes_at"]["128"] == 2 * one["kv_bytes_at"]["64"]  # twice the context
    assert one["kv_bytes"] == one["kv_bytes_at"]["64"]  # at the budget (decode) context


@pytest.mark.engine("llamacpp")
def test_a_hung_or_failing_child_costs_one_candidate(tokenizer_file, tmp_path):
    # a time limit the export cannot meet: the child is killed and the reason reported
    with pytest.raises(MeasureFailed, match="export timed out"):
        measure_candidate(SMALL, tokenizer_file, MeasureSettings(timeout_s=0.5, **FAST), tmp_path / "a")
    # an engine error in the child comes back as one line, not a traceback
    with pytest.raises(MeasureFailed, match="export failed: .*quant"):
        measure_candidate(SMALL, tokenizer_file, MeasureSettings(quant="q9_9", **FAST), tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# ---- the search (CLI) -------------------------------------------------------------------------------
def run_edge(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edge.cli", *args], capture_output=True, text=True, timeout=600)


def finished_trials(storage: str, study: str) -> list:
    s = optuna.load_study(study_name=study, storage=storage)
    return [t for t in s.get_trials() if t.state == optuna.trial.TrialState.COMPLETE
            or (t.state == optuna.trial.TrialState.FAIL and "failure" in t.user_attrs)]


def measured_hashes(*outs: Path) -> list[str]:
    return [json.loads(line)["hash"] for out in outs for line in (out / "measurements.jsonl").read_text().splitlines()]


@pytest.mark.engine("llamacpp")
def test_search_front_holds_only_feasible_candidates(tmp_path, tokenizer_file):
    out, best = tmp_path / "out", tmp_path / "best"
    r = run_edge("search", *SEARCH, "--trials", "5", "--out", str(out), "--export-best", str(best),
                 "--tokenizer", str(tokenizer_file))
    assert r.returncode == 0, r.stderr
    trials = json.loads((out / "trials.json").read_text())
    front = json.loads((out / "front.json").read_text())["front"]
    assert len(trials) == 5
    assert any(t["feasible"] for t in trials) and any(not t["feasible"] for t in trials), \
        [(t["candidate"], t.get("figures")) for t in trials]
    assert front and all(f["feasible"] for f in front)
    for f in front:  # within every budget, by the recorded measurement
        assert f["figures"]["prefill_ms@64"] <= 6 and f["figures"]["decode_ms"] <= 50
    infeasible = {t["hash"] for t in trials if not t["feasible"]}
    assert not infeasible & {f["hash"] for f in front}
    # the first trials are LFM2's layouts scaled to the tiny space
    assert sum(bool(t["seed_layout"]) for t in trials) == len(seed_params("tiny"))
    assert (out / "front.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| trial | candidate |" in (out / "front.md").read_text() and "| trial | candidate |" in r.stdout
    # --export-best: the best-quality feasible candidate's checkpoint and artifact, loadable
    winner = max(front, key=lambda f: f["quality"])
    session = runtime.load(best / "model.gguf", n_threads=1)
    assert session.config.hidden_size == winner["candidate"]["hidden"]
    assert session.config.attention_layers == winner["candidate"]["attention"]
    assert (best / "checkpoint" / "config.json").exists() and (best / "checkpoint" / "tokenizer.json").exists()


@pytest.mark.engine("llamacpp")
def test_no_feasible_candidate_names_the_closest_budget(tmp_path, tokenizer_file):
    r = run_edge("search", "--target", "gguf", "--space", "tiny", "--budget", "prefill_ms@64=0.0001",
                 "--budget", "mem_mb=100000", "--trials", "2", "--out", str(tmp_path), "--tokenizer",
                 str(tokenizer_file))
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: no candidate meets every budget; closest: prefill_ms@64")
    assert (tmp_path / "front.png").exists() and json.loads((tmp_path / "front.json").read_text())["closest_miss"]


@pytest.mark.parametrize("budget, message", [
    ("decode_ms", "has no '='"), ("latency=3", "unknown budget"), ("decode_ms=fast", "not a number"),
    ("prefill_ms=5", "how many prompt tokens"), ("mem_mb@4=5", "'@' takes"), ("decode_ms=-1", "positive"),
])
def test_bad_budget_is_one_line(tmp_path, capsys, budget, message):
    assert edge(["search", "--target", "gguf", "--budget", budget, "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err
    with pytest.raises(Exception, match=message):
        parse_budget(budget)


def test_bad_quality_and_target_options_are_one_line(tmp_path, capsys):
    for args in (["--quality", "bleu"], ["--quality", "lm:/no/such/file"], ["--quant", "q9"], ["--trials", "0"]):
        assert edge(["search", "--target", "gguf", "--out", str(tmp_path), *args]) == 1
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("error:"), err


def processes_mentioning(text: str) -> list[str]:
    found = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if text in cmd:
                found.append(cmd)
    return found


@pytest.mark.engine("llamacpp")
def test_killed_search_resumes_without_losing_or_remeasuring(tmp_path, tokenizer_file):
    out = tmp_path / "out"
    args = [sys.executable, "-m", "edge.cli", "search", *SEARCH, "--trials", "4", "--out", str(out),
            "--tokenizer", str(tokenizer_file)]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = out / "measurements.jsonl"
    deadline = time.time() + 300
    # wait until the first trial finished and the second one is being measured, then SIGKILL
    while time.time() < deadline and (not log.exists() or len(log.read_text().splitlines()) < 2):
        time.sleep(0.2)
    time.sleep(1.0)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # the measurement child it had started dies with it (no orphan measuring on)
    deadline = time.time() + 10
    while processes_mentioning(str(out / "work")) and time.time() < deadline:
        time.sleep(0.2)
    assert not processes_mentioning(str(out / "work"))
    storage = f"sqlite:///{out / 'study.db'}"
    before = {t.number: (t.values, t.user_attrs["hash"]) for t in finished_trials(storage, "edge-search")}
    assert 1 <= len(before) < 4
    killed = optuna.load_study(study_name="edge-search", storage=storage).get_trials(
        states=(optuna.trial.TrialState.RUNNING,))
    assert len(killed) == 1

    r = run_edge("search", *SEARCH, "--trials", "4", "--out", str(out), "--tokenizer", str(tokenizer_file))
    assert r.returncode == 0, r.stderr
    assert "holds" in r.stdout
    after = finished_trials(storage, "edge-search")
    assert len(after) == 4  # the total asked for, not 4 more
    by_number = {t.number: t for t in after}
    for number, (values, h) in before.items():  # no finished trial lost or changed
        assert by_number[number].values == values and by_number[number].user_attrs["hash"] == h
    hashes = measured_hashes(out)
    for _, h in before.values():  # nor measured again
        assert hashes.count(h) == 1
    assert len({t.user_attrs["hash"] for t in after}) == 4
    # the interrupted candidate was re-queued and measured, not dropped
    study = optuna.load_study(study_name="edge-search", storage=storage)
    assert study.get_trials(states=(optuna.trial.TrialState.RUNNING,)) == []
    retried = [t for t in after if t.user_attrs.get("retry_of") == killed[0].number]
    assert retried and retried[0].params == killed[0].params


# ---- many workers on PostgreSQL -------------------------------------------------------------------
@pytest.fixture(scope="session")
def postgres_url():
    url = os.environ.get("EDGE_TEST_POSTGRES_URL")
    in_ci = os.environ.get("CI", "").lower() in ("1", "true", "yes")
    if not url:
        if in_ci:
            pytest.fail("EDGE_TEST_POSTGRES_URL is not set; .ci/run starts PostgreSQL and sets it")
        pytest.skip("EDGE_TEST_POSTGRES_URL not set (see .ci/run for the PostgreSQL setup)")
    import sqlalchemy

    try:
        with sqlalchemy.create_engine(url).connect() as c:
            c.execute(sqlalchemy.text("SELECT 1"))
    except Exception as e:  # noqa: BLE001
        pytest.fail(f"PostgreSQL at EDGE_TEST_POSTGRES_URL is unreachable: {str(e).splitlines()[0]}")
    return url


@pytest.mark.engine("llamacpp")
def test_two_workers_on_postgres_finish_n_trials_without_duplicates(tmp_path, tokenizer_file, postgres_url):
    study = f"test-{uuid.uuid4().hex[:8]}"
    outs = [tmp_path / "w1", tmp_path / "w2"]
    procs = [subprocess.Popen([sys.executable, "-m", "edge.cli", "search", *SEARCH, "--trials", "5",
                               "--storage", postgres_url, "--study", study, "--out", str(o), "--tokenizer",
                               str(tokenizer_file)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for o in outs]
    try:
        results = [p.communicate(timeout=500) for p in procs]
        for p, (_, err) in zip(procs, results):
            assert p.returncode == 0, err
        after = finished_trials(postgres_url, study)
        assert len(after) == 5
        assert len({t.user_attrs["hash"] for t in after}) == 5  # no duplicate candidate
        hashes = measured_hashes(*outs)
        assert len(hashes) == len(set(hashes)) >= 5  # none measured twice, by either worker
        workers = {t.user_attrs["worker"] for t in after}
        assert len(workers) == 2, workers  # both took part
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        optuna.delete_study(study_name=study, storage=postgres_url)


# ---- quality proxies -------------------------------------------------------------------------------
def test_mqar_generator_matches_zoology_layout():
    x, y = multiquery_ar(vocab_size=256, num_examples=8, seq_len=64, num_kv_pairs=8, seed=0)
    assert x.shape == y.shape == (8, 64)
    for row_x, row_y in zip(x, y):
        keys, values = row_x[0:16:2], row_x[1:16:2]
        assert (keys < 128).all() and (values >= 128).all()
        queried = [(i, t) for i, t in enumerate(row_y) if t != -100]
        assert len(queried) == 8
        for i, value in queried:  # the label after a query is the value stored with that key
            assert value == dict(zip(keys, values))[row_x[i]]
    again, _ = multiquery_ar(vocab_size=256, num_examples=8, seq_len=64, num_kv_pairs=8, seed=0)
    assert (again == x).all()


def test_mqar_separates_attention_from_conv_only():
    def config(layer_types):
        return HybridConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                            num_attention_heads=2, num_key_value_heads=1, layer_types=layer_types,
                            block_multiple_of=64)

    proxy = parse_proxy("mqar:150")
    attention, details = score(proxy, config(["conv", "full_attention"]), ProxyContext())
    conv_only, _ = score(proxy, config(["conv", "conv"]), ProxyContext())
    assert attention > conv_only + 0.2, (attention, conv_only)
    assert details["quality_s"] > 0 and details["mqar"]["steps"] == 150
    params, d = score(parse_proxy("params"), config(["conv", "full_attention"]), ProxyContext())
    assert params == config(["conv", "full_attention"]).n_params(include_embeddings=False) / 1e6


@pytest.mark.engine("llamacpp")
def test_lm_proxy_reports_a_validation_loss(tmp_path, tokenizer_file):
    import inspect

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(inspect.getsource(json) * 3)
    proxy = parse_proxy(f"lm:{corpus}:3")
    assert proxy.direction == "minimize" and proxy.steps == 3
    loss, details = score(proxy, SMALL.to_config(), ProxyContext(tokenizer_path=tokenizer_file, vocab_size=VOCAB))
    assert math.isfinite(loss) and 0 < loss < math.log(VOCAB) + 1
    assert details["lm"]["steps"] == 3 and details["quality_s"] > 0
