"""`edge bench` and runtime.bench: llama-bench conventions, JSON fields, interleaving, bad input."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import runtime
from edge.cli import main as edge
from edge.errors import EdgeError
from runtime.bench import bench_session, cpu_info, format_table, peak_rss_mb

LLAMA_BENCH_FIELDS = ["model_filename", "model_size", "model_n_params", "n_prompt", "n_gen", "n_depth",
                      "n_threads", "type_k", "avg_ns", "stddev_ns", "avg_ts", "stddev_ts", "samples_ns",
                      "samples_ts"]
OUR_FIELDS = ["engine", "quant", "kv_cache", "ttft_ms", "load_ms", "peak_rss_mb", "kv_cache_bytes", "cpu",
              "median_ns", "median_ts"]


def check_record(r, *, reps):
    for field in LLAMA_BENCH_FIELDS + OUR_FIELDS:
        assert field in r, f"missing {field}"
    assert len(r["samples_ns"]) == len(r["samples_ts"]) == reps
    assert all(ns > 0 for ns in r["samples_ns"])
    tokens = r["n_prompt"] + r["n_gen"]
    for ns, ts in zip(r["samples_ns"], r["samples_ts"]):
        assert ts == pytest.approx(tokens * 1e9 / ns)
    assert min(r["samples_ts"]) <= r["avg_ts"] <= max(r["samples_ts"])
    assert min(r["samples_ts"]) <= r["median_ts"] <= max(r["samples_ts"])
    assert (r["n_prompt"] == 0) != (r["n_gen"] == 0), "a record is either a pp or a tg test"
    assert r["kv_cache_bytes"] > 0 and r["peak_rss_mb"] > 0 and r["ttft_ms"] > 0


def test_bench_session_on_reference(tiny_dir):
    session = runtime.load(tiny_dir, n_threads=1)
    labels = []
    records = bench_session(session, n_prompt=16, n_gen=8, depth=4, repetitions=3, progress=labels.append)
    assert [r["test"] for r in records] == ["pp16 @ d4", "tg8 @ d4"]
    pp, tg = records
    check_record(pp, reps=3)
    check_record(tg, reps=3)
    assert (pp["n_prompt"], pp["n_gen"], pp["n_depth"]) == (16, 0, 4)
    assert (tg["n_prompt"], tg["n_gen"], tg["n_depth"]) == (0, 8, 4)
    assert pp["engine"] == "pytorch" and pp["n_threads"] == 1
    assert pp["model_n_params"] == session.config.n_params()
    # KV bytes at the end of each test: depth + prompt vs depth + 1 + generated tokens, linear in tokens
    assert tg["kv_cache_bytes"] * 20 == pp["kv_cache_bytes"] * 13
    assert pp["ttft_ms"] * 1e6 == pytest.approx(pp["median_ns"])
    assert labels == ["warm-up", "pp 1/3", "pp 2/3", "pp 3/3", "tg 1/3", "tg 2/3", "tg 3/3"]
    assert session.n_past == 0, "the session is left reset"


def test_only_decode_and_only_prefill(tiny_dir):
    session = runtime.load(tiny_dir)
    assert [r["test"] for r in bench_session(session, n_prompt=0, n_gen=4, repetitions=1)] == ["tg4"]
    assert [r["test"] for r in bench_session(session, n_prompt=8, n_gen=0, repetitions=1)] == ["pp8"]
    with pytest.raises(EdgeError, match="nothing to measure"):
        bench_session(session, n_prompt=0, n_gen=0)


def test_test_longer_than_the_context_is_one_line(tiny_dir):
    session = runtime.load(tiny_dir, max_seq_len=32)
    with pytest.raises(EdgeError, match="max-seq-len") as e:
        bench_session(session, n_prompt=16, n_gen=8, depth=20)
    assert "\n" not in str(e.value)


def test_a_failing_session_closes_every_session_of_the_run(tiny_dir):
    """An opener or a session that fails mid-run must not leave the others' engines loaded."""
    from runtime.bench import bench_depths, bench_interleaved

    closed = []

    def opener():
        session = runtime.load(tiny_dir, n_threads=1)
        close = session.close
        session.close = lambda: (closed.append(session), close())
        return session

    def broken():
        raise EdgeError("cannot load b")

    for run in (lambda o: bench_interleaved(o, n_prompt=4, n_gen=2, repetitions=1, progress=False),
                lambda o: bench_depths(o, depths=[0], n_gen=2, repetitions=1, progress=False)):
        closed.clear()
        with pytest.raises(EdgeError, match="cannot load b"):
            run([("a", opener), ("b", broken)])
        assert len(closed) == 1
    closed.clear()
    with pytest.raises(EdgeError, match="deepest test"):  # opened, then refused: too short for the depth
        bench_depths([("a", opener)], depths=[10 ** 6], n_gen=2, progress=False)
    assert len(closed) == 1


def test_cli_two_artifacts_interleaved(tiny_dir, tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(tiny_dir, a)
    shutil.copytree(tiny_dir, b)
    out = tmp_path / "bench.json"
    assert edge(["bench", str(a), str(b), "-p", "16", "-n", "4", "-r", "3", "-t", "1", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "| model" in table and "t/s" in table and "pp16" in table and "tg4" in table and "machine:" in table
    assert table.count("| a ") == 2 and table.count("| b ") == 2
    records = json.loads(out.read_text())
    assert [(r["model_filename"].split("/")[-1], r["test"]) for r in records] == [
        ("a", "pp16"), ("a", "tg4"), ("b", "pp16"), ("b", "tg4")]
    for r in records:
        check_record(r, reps=3)
        assert r["load_ms"] > 0 and r["n_threads"] == 1
    assert [r["label"] for r in records] == ["a", "a", "b", "b"]  # the opener's label, for scripts to match on
    # A B A B: repetition i of b starts after repetition i of a and before repetition i+1 of a
    a_pp, _, b_pp, _ = (r["samples_start_ns"] for r in records)
    for i in range(3):
        assert a_pp[i] < b_pp[i]
        if i + 1 < 3:
            assert b_pp[i] < a_pp[i + 1]


def test_cli_bad_input_is_one_line(tiny_dir, tmp_path, capsys):
    assert edge(["bench", str(tiny_dir), str(tmp_path / "missing.gguf"), "-r", "1"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "missing.gguf" in err and "\n" not in err
    assert edge(["bench", str(tiny_dir), "-r", "0"]) == 1
    assert "-r" in capsys.readouterr().err
    assert edge(["bench", str(tiny_dir), "--kv-cache", "q8_0", "-r", "1", "-p", "4", "-n", "1"]) == 1
    assert "--kv-cache" in capsys.readouterr().err


def test_help_documents_every_option(capsys):
    with pytest.raises(SystemExit):
        edge(["bench", "--help"])
    text = capsys.readouterr().out
    for option in ["ARTIFACT", "-p", "--n-prompt", "-n", "--n-gen", "-d", "--depth", "-r", "--repetitions",
                   "-t", "--threads", "--kv-cache", "--json", "--seed"]:
        assert option in text, option


def test_table_and_machine():
    info = cpu_info()
    assert info["model"] and info["cores"] >= 1
    if Path("/proc/cpuinfo").exists() and "avx2" in Path("/proc/cpuinfo").read_text():
        assert "avx2" in info["isa"]
    assert peak_rss_mb() > 10
    record = dict(model_filename="m.gguf", model_size=3 * 2**20, model_n_params=1_500_000, engine="llamacpp",
                  quant="q4_0", kv_cache="q8_0", n_threads=2, test="pp512 @ d4096", avg_ts=100.0, stddev_ts=1.5,
                  median_ts=99.0, ttft_ms=5120.0, load_ms=12.0, peak_rss_mb=300.0, kv_cache_bytes=2**21,
                  samples_ns=[1] * 5, cpu="Some CPU (2 cores)")
    table = format_table([record])
    assert "pp512 @ d4096" in table and "100.00 ± 1.50" in table and "Some CPU (2 cores)" in table
    assert "3.00 MiB" in table and "1.50 M" in table and "2.00 MiB" in table


@pytest.mark.engine("llamacpp")
def test_cli_two_ggufs(tiny_dir, tmp_path, capsys):
    from export import export_model

    q8 = export_model("gguf", tiny_dir, tmp_path / "q8.gguf", quant="q8_0", max_seq_len=128)
    f32 = export_model("gguf", tiny_dir, tmp_path / "f32.gguf", quant="f32", max_seq_len=128)
    out = tmp_path / "bench.json"
    assert edge(["bench", str(q8), str(f32), "-p", "32", "-n", "8", "-r", "2", "--json", str(out)]) == 0
    assert "q8.gguf" in capsys.readouterr().out
    records = json.loads(out.read_text())
    assert [r["test"] for r in records] == ["pp32", "tg8"] * 2
    for r in records:
        check_record(r, reps=2)
    assert records[0]["model_size"] < records[2]["model_size"]


# ---- benchmarks/: one harness, peers as Sessions ------------------------------------------------------
def test_benchmark_scripts_import_as_modules_without_path_edits():
    import importlib
    import sys

    before = list(sys.path)
    for name in ("common", "peers", "compare", "bench_gguf", "bench_onnx", "bench_executorch",
                 "bench_executorch_attention", "bench_llama_build", "bench_search", "profile_onnx"):
        module = importlib.import_module(f"benchmarks.{name}")
        assert f"python -m benchmarks.{name}" in (module.__doc__ or "") or name in ("common", "peers"), name
    assert sys.path == before, "a benchmark module edited sys.path"


def test_each_system_is_reported_at_its_best_harness():
    from benchmarks.compare import best_per_system

    def rec(system, harness, test, ts):
        return dict(system=system, harness=harness, ours=system.startswith("ours"), label=f"{system} {harness}",
                    n_prompt=16 if test == "pp" else 0, n_gen=0 if test == "pp" else 8, median_ts=ts)

    records = [rec("peer: x", {"hold": "on"}, "pp", 100.0), rec("peer: x", {"hold": "on"}, "tg", 20.0),
               rec("peer: x", {"hold": "off"}, "pp", 90.0), rec("peer: x", {"hold": "off"}, "tg", 40.0),
               rec("ours: y", {"threads": "2"}, "tg", 30.0)]
    search = best_per_system(records)
    assert search["peer: x"]["best"]["pp"]["harness"] == {"hold": "on"}
    assert search["peer: x"]["best"]["tg"] == {"harness": {"hold": "off"}, "median_ts": 40.0,
                                                "label": "peer: x {'hold': 'off'}"}
    assert search["peer: x"]["settings"] == {"hold on": {"pp": 100.0, "tg": 20.0}, "hold off": {"pp": 90.0, "tg": 40.0}}
    assert search["ours: y"]["ours"] and not search["peer: x"]["ours"]


@pytest.mark.engine("llamacpp")
def test_llama_c_api_peer_times_like_ours(tiny_artifact):
    """The C API peer joins runtime.bench's rotation as a Session: same records, same KV bytes as ours."""
    from benchmarks.peers import RawLlamaSession
    from runtime.bench import bench_interleaved

    path = tiny_artifact("gguf")
    records = bench_interleaved([("ours", lambda: runtime.load(path, n_threads=1, max_seq_len=64, kv_cache="f16")),
                                 ("raw", lambda: RawLlamaSession(path, 1, 64))],
                                n_prompt=16, n_gen=4, repetitions=2, progress=False)
    assert [(r["label"], r["test"]) for r in records] == [("ours", "pp16"), ("ours", "tg4"), ("raw", "pp16"),
                                                          ("raw", "tg4")]
    for r in records:
        check_record(r, reps=2)
    assert records[2]["engine"] == "llama.cpp (C API)" and records[2]["n_threads"] == 1
    assert records[0]["kv_cache_bytes"] == records[2]["kv_cache_bytes"]


def test_depth_test_reports_each_quantized_cache_against_its_own_unquantized_one():
    from benchmarks.compare import best_per_system, kv_ratios

    def rec(system, threads, ts, kv, kv_bytes):
        return dict(system=system, harness={"threads": threads}, ours=system.startswith("ours"), n_prompt=0, n_gen=8,
                    label=f"{system} [{threads}]", median_ts=ts, kv_cache=kv, kv_cache_bytes=kv_bytes)

    records = [rec("ours: llamacpp q4_0.gguf kv f16", "2", 10.0, "f16", 1000),
               rec("ours: llamacpp q4_0.gguf kv q8_0", "2", 15.0, "q8_0", 531),
               rec("ours: llamacpp q4_0.gguf kv q8_0", "1", 18.0, "q8_0", 531),  # its best harness counts
               rec("peer: llama.cpp C API q4_0 kv f16", "2", 12.0, "f16", 1000),
               rec("peer: llama.cpp C API q4_0 kv q8_0", "2", 6.0, "q8_0", 531)]
    ratios = kv_ratios(best_per_system(records), records)
    assert ratios == {
        "ours: llamacpp q4_0.gguf: kv q8_0 vs f16": {"kv_bytes_ratio": 0.531, "decode_speed_ratio": 1.8},
        "peer: llama.cpp C API q4_0: kv q8_0 vs f16": {"kv_bytes_ratio": 0.531, "decode_speed_ratio": 0.5}}


def test_summary_ranks_peers_with_and_without_settings_under_the_4bit_bound():
    """A peer setting measured under §5's 4-bit bound (UNDER_4BIT_BOUND) is the best peer, but the
    fidelity-matched ratio skips it, at depth 0 and in the depth test (names ending in "kv TYPE")."""
    from benchmarks.compare import UNDER_4BIT_BOUND, best_per_system, summarize

    fast = next(iter(UNDER_4BIT_BOUND))
    for suffix in ("", " kv fp32"):
        records = [dict(system=s + suffix, harness={"threads": "2"}, ours=s.startswith("ours"), n_prompt=0,
                        n_gen=8, label=s, median_ts=ts)
                   for s, ts in (("ours: onnxruntime int4.onnx", 60.0), (fast, 80.0), ("peer: other", 40.0))]
        tg = summarize(best_per_system(records))["tg"]
        assert tg["best_peer"]["system"] == fast + suffix and tg["best_ours_over_best_peer"] == 0.75
        assert tg["best_peer_within_4bit_bound"]["system"] == "peer: other" + suffix
        assert tg["best_ours_over_best_peer_within_4bit_bound"] == 1.5


def test_results_and_export_llama_names_per_preset():
    from benchmarks.compare import results_name
    from benchmarks.peers import EXPORT_LLAMA_MODELS, export_llama_flags
    from edge.config import PRESETS

    assert [results_name(p) for p in ("lfm2-350m", "lfm2-700m", "lfm2-1.2b")] == [
        "compare", "compare-700m", "compare-1.2b"]
    assert set(EXPORT_LLAMA_MODELS) == set(PRESETS)
    flags = export_llama_flags(4608, quantize_kv=True)
    assert "--quantize_kv_cache" in flags and "--use_sdpa_with_kv_cache" in flags and "-kv" in flags
    assert flags[flags.index("--max_context_length") + 1] == "4608"
    assert "--quantize_kv_cache" not in export_llama_flags()


@pytest.mark.engine("llamacpp")
def test_llama_c_api_peer_with_a_q8_0_cache(tiny_artifact):
    """q8_0 K and V through llama_context_params (flash attention on): it runs, and its KV bytes are ours
    (34 bytes per 32 values)."""
    from benchmarks.peers import RawLlamaSession

    path = tiny_artifact("gguf")
    raw = RawLlamaSession(path, 1, 64, "q8_0")
    ours = runtime.load(path, n_threads=1, max_seq_len=64, kv_cache="q8_0")
    try:
        for s in (raw, ours):
            s.prefill(list(range(1, 17)))
        assert raw.kv_cache == "q8_0"
        assert raw.kv_cache_bytes() == ours.kv_cache_bytes() == raw.config.kv_vectors(16) * raw.config.head_dim * 34 // 32
    finally:
        raw.close()
        ours.close()
