"""ExecuTorch exporter and backend (issue 4): .pte artifacts run by executorch.runtime vs the reference.

Exports are slow (about a minute each on 2 cores), so three artifacts cover every axis, each built once
per session: tiny fp32/fp32 ("exact"), trained mqa 8da8w + int8-stock KV + int8 embedding ("8bit": the int8 cache
in ExecuTorch's stock ops, 8-bit weights, one KV head), trained tiny 8da4w + int8 KV (our kernels) + int4
embedding through the CLI at --max-seq-len 2048 ("4bit"). The prefill chunk is 16, so the protocol's
32-token prefill is itself chunked. The two int8 artifacts also run in ExecuTorch's stock LLM runner.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import pytest

pytest.importorskip("executorch")

import torch  # noqa: E402
import runtime  # noqa: E402
from edge.checkpoint import load_model  # noqa: E402
from edge.cli import main as edge_main  # noqa: E402
from edge.errors import EdgeError  # noqa: E402
from export import export_model  # noqa: E402
from parity import assert_parity, metrics, random_ids, reference_logits, session_logits  # noqa: E402

pytestmark = pytest.mark.engine("executorch")

MAX_SEQ_LEN = 128
CHUNK = 16
# name -> (checkpoint variant, quant, kv cache, embedding quant, docs/design.md §5 bound)
VARIANTS = {
    "fp32": ("tiny", "fp32", "fp32", "none", "exact"),
    # trained too: the stock runner's Python callback needs whole UTF-8 characters, which a random model's
    # byte tokens are not
    "mqa-8da8w-int8stock": ("trained:mqa", "8da8w", "int8-stock", "int8", "8bit"),
    # trained: 4-bit rounding noise compounds through a random-weight (chaotic) model to mean cos ~0.97
    # in any engine; conftest's trained checkpoints have the peaked logits the §5 bounds describe
    "8da4w-int8kv": ("trained:tiny", "8da4w", "int8", "int4", "4bit"),
}


@pytest.fixture(scope="session")
def pte(tmp_path_factory, checkpoints, op_library):
    """variant name -> .pte path, exported once per session on first use (our op library built first)."""
    built = {}

    def get(name):
        if name not in built:
            ckpt, quant, kv, emb, _ = VARIANTS[name]
            out = tmp_path_factory.mktemp("executorch") / f"{name}.pte"
            if name == "8da4w-int8kv":  # the command line, through the CLI
                rc = edge_main(["export", "executorch", str(checkpoints(ckpt)), "-o", str(out), "--quant", quant,
                                "--kv-cache", kv, "--max-seq-len", "2048", "--embedding-quant", emb,
                                "--prefill-chunk", str(CHUNK)])
                assert rc == 0
            else:
                export_model("executorch", checkpoints(ckpt), out, quant=quant, kv_cache=kv,
                             max_seq_len=MAX_SEQ_LEN, embedding_quant=emb, prefill_chunk=CHUNK)
            built[name] = out
        return built[name]

    return get


@pytest.fixture(scope="session")
def sessions(pte):
    opened = {}

    def get(name):
        if name not in opened:
            opened[name] = runtime.load(pte(name), n_threads=1)
        return opened[name]

    return get


@pytest.mark.parametrize("name", list(VARIANTS))
def test_parity(name, sessions, checkpoints):
    ckpt, _, _, _, bound = VARIANTS[name]
    ids = random_ids(1024, seed=1)
    s = sessions(name)
    s.prefill(random_ids(1024, seed=2, n=20))  # stale state from another sequence must not leak
    got = session_logits(s, ids)  # resets, prefills 32 (2 chunks), decodes 32
    assert_parity(reference_logits(checkpoints(ckpt), ids), got, bound)


def test_chunked_prefill_matches_reference(sessions, checkpoints):
    s = sessions("fp32")
    ids = random_ids(1024, seed=3, n=5 * CHUNK + 3)  # 6 forward calls, the last one 3 tokens
    s.reset()
    got = s.prefill(ids)
    assert s.n_past == len(ids)
    ref = reference_logits(checkpoints("tiny"), ids)[-1]
    m = metrics(ref[None], got[None])
    assert m["rel"] <= 1e-3 and m["top1_match"] == 1.0, m


def _edge_metadata(path) -> dict:
    from executorch.runtime import Runtime

    program = Runtime.get().load_program(path)
    return json.loads(bytes(program.load_method("edge_metadata").execute([])[0].numpy()).decode())


def test_metadata_for_executorch_runner_and_ours(pte, sessions, tokenizer):
    from executorch.runtime import Runtime

    program = Runtime.get().load_program(pte("fp32"))
    value = {name: program.load_method(name).execute([]) for name in
             ("get_max_seq_len", "get_max_context_len", "get_vocab_size", "get_bos_id", "get_eos_ids",
              "use_kv_cache", "enable_dynamic_shape")}
    assert value["get_max_seq_len"] == [CHUNK] and value["get_max_context_len"] == [MAX_SEQ_LEN]
    assert value["get_vocab_size"] == [1024] and value["get_bos_id"] == [1] and value["get_eos_ids"] == [7]
    assert value["use_kv_cache"] == [True] and value["enable_dynamic_shape"] == [True]
    meta = _edge_metadata(pte("fp32"))
    assert (meta["quant"], meta["kv_cache"], meta["prefill_chunk"]) == ("fp32", "fp32", CHUNK)
    s = sessions("fp32")
    assert (s.quant, s.kv_cache, s.max_seq_len, s.config.num_key_value_heads) == ("fp32", "fp32", MAX_SEQ_LEN, 2)
    text = "def main(argv=None):\n    return 0\n"
    assert s.tokenizer.encode(text).ids == tokenizer.encode(text).ids
    q = sessions("8da4w-int8kv")
    assert (q.quant, q.kv_cache, q.max_seq_len, q.metadata["embedding_quant"]) == ("8da4w", "int8", 2048, "int4")


def test_int8_kv_cache_bytes(sessions):
    fp32, int8 = sessions("fp32"), sessions("8da4w-int8kv")  # same tiny config
    ids = random_ids(1024, seed=4, n=40)
    for s in (fp32, int8):
        s.reset()
        assert s.kv_cache_bytes() == 0
        s.prefill(ids)
    c = fp32.config
    assert fp32.kv_cache_bytes() == 40 * len(c.attention_layers) * 2 * c.num_key_value_heads * c.head_dim * 4
    assert int8.kv_cache_bytes() <= 0.3 * fp32.kv_cache_bytes()
    assert fp32.kv_cache_allocated_bytes() == fp32.kv_cache_bytes() * MAX_SEQ_LEN // 40


def test_quantized_file_is_smaller(pte):
    sizes = {name: pte(name).stat().st_size for name in ("fp32", "8da4w-int8kv")}
    assert sizes["8da4w-int8kv"] < 0.4 * sizes["fp32"], sizes


@pytest.mark.parametrize("name", ["mqa-8da8w-int8stock", "8da4w-int8kv"])
def test_quantized_linears_run_inside_xnnpack(pte, name):
    """The dynamically quantized linears are spelled so that XNNPACK takes each one whole: a pattern it
    stopped recognizing would leave matmuls and (de)quantize ops to the slow portable kernels, which the
    parity tests cannot see."""
    from executorch.exir._serialize._program import deserialize_pte_binary

    program = deserialize_pte_binary(pte(name).read_bytes())
    program = getattr(program, "program", program)
    plan = next(p for p in program.execution_plan if p.name == "forward")
    outside = {op.name.split("::")[-1] for op in plan.operators}  # e.g. embedding_byte, int8_sdpa, cat
    matmul_or_quant = ("linear", "mm", "addmm", "bmm", "quantize", "dequantize", "choose_qparams")
    assert not {n for n in outside if n.startswith(matmul_or_quant)}, sorted(outside)
    assert plan.delegates, "nothing was delegated to XNNPACK"


def test_context_overflow_and_bad_ids(sessions):
    s = sessions("fp32")
    s.reset()
    with pytest.raises(EdgeError, match="context overflow") as e:
        s.prefill([5] * (MAX_SEQ_LEN + 1))
    assert "\n" not in str(e.value)
    s.prefill([5] * MAX_SEQ_LEN)  # exactly full is fine ...
    with pytest.raises(EdgeError, match="context overflow"):
        s.decode(5)  # ... one more never wraps around
    s.reset()
    for bad in (1024, -1):
        with pytest.raises(EdgeError, match="out of range") as e:
            s.prefill([1, bad])
        assert "\n" not in str(e.value)
    assert s.n_past == 0


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_corrupt_pte(pte, tmp_path, damage):
    data = pte("fp32").read_bytes()
    bad = tmp_path / "bad.pte"
    bad.write_bytes({"garbage": b"\x00not a program" * 100, "truncated": data[: len(data) // 3],
                     "empty": b""}[damage])
    with pytest.raises(EdgeError) as e:
        runtime.load(bad)
    assert "\n" not in str(e.value) and "bad.pte" in str(e.value)


def test_kv_cache_option_is_fixed_at_export(pte):
    with pytest.raises(EdgeError, match="fixed at export"):
        runtime.load(pte("fp32"), kv_cache="int8")


def test_group_size_warns_for_every_unquantized_linear(checkpoints):
    from export.executorch import prepare_model

    model = load_model(checkpoints("tiny"))
    n_linear = sum(1 for m in model.modules() if isinstance(m, torch.nn.Linear))  # counted before quantization
    # hidden 128 is not a multiple of 96 but the FFN width 384 is: every linear except w2 stays fp32
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        skipped = prepare_model(model, "8da4w", group_size=96, embedding_quant="none")
    assert len(skipped) == n_linear - model.config.num_hidden_layers
    assert all(not name.endswith("w2") for name in skipped)
    messages = [str(w.message) for w in caught if "stays fp32" in str(w.message)]
    assert sorted(m.split()[2] for m in messages) == sorted(skipped)


def test_bad_export_options(checkpoints, tmp_path, capsys):
    rc = edge_main(["export", "executorch", str(checkpoints("tiny")), "-o", str(tmp_path / "x.pte"),
                    "--embedding-quant", "int3"])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and "--embedding-quant" in err and "\n" not in err
    assert not (tmp_path / "x.pte").exists()


# ExecuTorch's stock LLM runner (the Python binding of the C++ TextLLMRunner that llama_main and the demo
# apps use) in a fresh process that can import nothing of ours: ExecuTorch's own kernel libraries, then
# each given shared library loaded as a plain .so, then greedy generation. Writes JSON to argv[4].
STOCK_RUNNER = r"""
import ctypes, json, os, sys
pte, tokenizer, prompt, out, n, libraries = *sys.argv[1:5], int(sys.argv[5]), sys.argv[6:]
from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401  llama:: kernels
from executorch.kernels import quantized  # noqa: F401  quantized_decomposed:: kernels
for library in libraries:
    ctypes.CDLL(library, mode=os.RTLD_GLOBAL)
from executorch.extension.llm.runner import GenerationConfig, TextLLMRunner
from pytorch_tokenizers import CppHFTokenizer  # the C++ tokenizer the runner uses, for its prompt ids

tokens = CppHFTokenizer()
tokens.load(tokenizer)
pieces, stats = [], []
runner = TextLLMRunner(pte, tokenizer)
runner.generate(prompt, GenerationConfig(echo=False, max_new_tokens=n, temperature=0.0, num_bos=1),
                token_callback=pieces.append, stats_callback=stats.append)
ours = sorted(m for m in sys.modules if m.split(".")[0] in ("edge", "runtime", "export"))
json.dump({"pieces": pieces, "prompt_ids": tokens.encode(prompt, 1, 0), "prompt_tokens": stats[-1].num_prompt_tokens,
           "ours_imported": ours}, open(out, "w"))
"""
PROMPT = "for i in range("  # the trained tiny model continues it with several distinct tokens


def _stock_runner(pte_path, tokenizer_json, tmp_path, libraries=(), n=24) -> subprocess.CompletedProcess:
    """STOCK_RUNNER in a child process without our code on its path; its result is in tmp_path/runner.json."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # nothing of ours importable
    return subprocess.run([sys.executable, "-c", STOCK_RUNNER, str(pte_path), str(tokenizer_json), PROMPT,
                           str(tmp_path / "runner.json"), str(n), *map(str, libraries)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


def _runtime_greedy(path, ids, n=24):
    s = runtime.load(path, n_threads=1)
    s.reset()
    tokens = list(s.generate(ids, max_new_tokens=n))
    return s, tokens, [s.tokenizer.decode([t], skip_special_tokens=False) for t in tokens]


@pytest.mark.parametrize("name,ours_loaded", [("8da4w-int8kv", True), ("mqa-8da8w-int8stock", False)])
def test_stock_executorch_runner_generates_what_runtime_generates(name, ours_loaded, pte, checkpoints, op_library,
                                                                  tmp_path):
    """Issue 18's bar: the default int8-KV .pte (trained tiny, our kernels) runs in ExecuTorch's own
    TextLLMRunner with our op library loaded as a plain shared library, and the int8-stock .pte with no
    library of ours at all; both generate greedily the tokens runtime.load generates."""
    tokenizer_json = checkpoints(VARIANTS[name][0]) / "tokenizer.json"
    done = _stock_runner(pte(name), tokenizer_json, tmp_path, [op_library] if ours_loaded else [])
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads((tmp_path / "runner.json").read_text())
    assert got["ours_imported"] == []
    # the runner's prompt ids: ExecuTorch's tokenizer adds BOS only through tokenizer.json's post-processor,
    # which our tiny tokenizers lack, so the same ids are ours without BOS
    s, tokens, pieces = _runtime_greedy(pte(name), got["prompt_ids"])
    assert got["prompt_ids"] == s.encode(PROMPT, add_bos=False) and got["prompt_tokens"] == len(got["prompt_ids"])
    assert got["pieces"] == pieces, (got["pieces"], pieces)
    if name == "8da4w-int8kv":  # trained: a real continuation, not one token repeated
        assert len(set(tokens)) > 1, tokens


def test_stock_runner_without_our_library_refuses_our_kernels(pte, checkpoints, tmp_path):
    """The negative control of the test above: without libedge_ops the stock runner cannot load our .pte."""
    done = _stock_runner(pte("8da4w-int8kv"), checkpoints("trained:tiny") / "tokenizer.json", tmp_path, n=4)
    assert done.returncode != 0 and "edge::int8_sdpa" in done.stdout + done.stderr


def test_op_library_in_metadata_and_edge_info(pte, op_library, capsys):
    from edge.formats.executorch import OP_LIBRARY

    assert _edge_metadata(pte("8da4w-int8kv"))["op_library"] == OP_LIBRARY
    assert _edge_metadata(pte("mqa-8da8w-int8stock"))["op_library"] is None
    for name, expected in (("8da4w-int8kv", f"op library: {op_library}"), ("mqa-8da8w-int8stock", None)):
        assert edge_main(["info", str(pte(name))]) == 0
        lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("op library")]
        assert lines == ([expected] if expected else []), lines
    assert op_library.is_absolute()


@pytest.mark.parametrize("damage", ["missing", "stale"])
def test_missing_or_stale_op_library_is_one_line(damage, pte, op_library, tmp_path, monkeypatch):
    import shutil

    from runtime import et_kernels

    library = tmp_path / et_kernels.LIBRARY_NAME
    if damage == "stale":  # a library whose stamp says another kernel source
        shutil.copyfile(op_library, library)
        stamp = json.loads(op_library.with_suffix(".json").read_text())
        library.with_suffix(".json").write_text(json.dumps(dict(stamp, source="0" * 16)))
    monkeypatch.setattr(et_kernels, "library_path", lambda: library)
    monkeypatch.setattr(et_kernels, "_loaded", None)  # as in a fresh process
    with pytest.raises(EdgeError) as e:
        runtime.load(pte("8da4w-int8kv"))
    message = str(e.value)
    assert "\n" not in message and str(library) in message and et_kernels.BUILD_COMMAND in message


def test_build_is_idempotent_and_prints_one_line(op_library, capsys):
    from runtime import et_kernels

    before = op_library.stat().st_mtime_ns
    assert et_kernels.main(["build"]) == 0
    assert capsys.readouterr().out == f"op library: {op_library}\n"
    assert op_library.stat().st_mtime_ns == before  # up to date: not rebuilt


def _kernel_method(module, example, dynamic_shapes, out):
    """`module` exported alone (no delegation) with our kernels loaded from the CMake-built op library (the
    `op_library` fixture builds it): its forward in the ExecuTorch runtime."""
    from executorch.exir import to_edge

    from edge.formats.executorch import load_custom_ops
    from runtime.et_kernels import load_kernels
    from runtime.executorch import _runtime

    load_custom_ops()
    load_kernels()
    ep = torch.export.export(module, example, strict=False, dynamic_shapes=dynamic_shapes)
    out.write_bytes(to_edge(ep).to_executorch().buffer)
    return _runtime().load_program(out).load_method("forward")


class Int8AttentionOnly(torch.nn.Module):
    """edge::int8_sdpa alone, the caches as inputs: the kernel checked directly at chosen positions."""

    def forward(self, q, k_cache, v_cache, k_scales, v_scales, input_pos):
        start_pos = input_pos[0].item()
        torch._check_is_size(start_pos)
        torch._check(start_pos + q.shape[1] <= k_cache.shape[1])
        return torch.ops.edge.int8_sdpa(q, k_cache, v_cache, k_scales, v_scales, start_pos)


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(4, 2, 32), (6, 1, 20)])  # GQA; MQA with an odd head_dim
def test_int8_attention_kernel_matches_torch(heads, kv_heads, head_dim, tmp_path, op_library):
    """Our ExecuTorch kernel (runtime/kernels/int8_sdpa.cpp) == its torch reference, on the decode path
    (T <= 4, int8 read in place) and the prefill path (T > 4, dequantized blocks of 16 queries)."""
    from edge.formats.executorch import int8_sdpa_reference, quantize_symmetric

    S = 64
    gen = torch.Generator().manual_seed(heads)
    k, k_scales = quantize_symmetric(torch.randn(1, S, kv_heads, head_dim, generator=gen))
    v, v_scales = quantize_symmetric(torch.randn(1, S, kv_heads, head_dim, generator=gen))
    example = (torch.randn(1, 3, heads, head_dim), k, v, k_scales, v_scales, torch.tensor([0]))
    tokens = torch.export.Dim("tokens", min=1, max=S)
    method = _kernel_method(Int8AttentionOnly(), example, ({1: tokens}, None, None, None, None, None),
                            tmp_path / "attention.pte")
    for T, start_pos in [(1, 0), (1, 40), (3, 17), (5, 0), (21, 30), (64, 0)]:
        q = torch.randn(1, T, heads, head_dim, generator=gen)
        got = method.execute([q, k, v, k_scales, v_scales, torch.tensor([start_pos])])[0]
        want = int8_sdpa_reference(q, k, v, k_scales, v_scales, start_pos)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=f"T={T} start_pos={start_pos}")


def test_kernel_build_failure_is_one_line(tmp_path, monkeypatch):
    from runtime import et_kernels

    monkeypatch.setenv("CXX", "false")  # a "compiler" CMake rejects
    with pytest.raises(EdgeError, match="building the op library failed: .*CMake >= 3.19") as e:
        et_kernels.build(tmp_path / et_kernels.LIBRARY_NAME)
    assert "\n" not in str(e.value)
    assert [f.name for f in tmp_path.iterdir()] == ["build.log"]  # nothing half-written left behind


class Int8CacheWriter(torch.nn.Module):
    """edge::int8_update_cache alone over a cache held in buffers, returning copies of both buffers."""

    def __init__(self, S=16, kv_heads=2, head_dim=20):
        super().__init__()
        self.register_buffer("cache", torch.zeros(1, S, kv_heads, head_dim, dtype=torch.int8))
        self.register_buffer("scales", torch.zeros(1, S, kv_heads, 1))

    def forward(self, value, input_pos):
        start_pos = input_pos[0].item()
        torch._check_is_size(start_pos)
        torch._check(start_pos + value.shape[1] <= self.cache.shape[1])
        torch.ops.edge.int8_update_cache(value, self.cache, self.scales, start_pos)
        return self.cache.clone(), self.scales.clone()


def test_int8_cache_writer_kernel_matches_torch(tmp_path, op_library):
    """Our cache writer in the ExecuTorch runtime == its torch reference: scales to float precision, int8
    values equal up to a rounding tie (the kernel is built with -ffast-math), rows written only where asked."""
    from edge.formats.executorch import int8_update_cache_reference

    tokens = torch.export.Dim("tokens", min=1, max=16)
    method = _kernel_method(Int8CacheWriter(), (torch.randn(1, 3, 2, 20), torch.tensor([0])), ({1: tokens}, None),
                            tmp_path / "writer.pte")
    want = Int8CacheWriter()
    for T, start_pos in [(5, 0), (1, 5), (3, 9)]:
        value = torch.randn(1, T, 2, 20) * 3
        cache, scales = method.execute([value, torch.tensor([start_pos])])
        int8_update_cache_reference(value, want.cache, want.scales, start_pos)
        torch.testing.assert_close(scales, want.scales, rtol=1e-6, atol=0)
        assert (cache.int() - want.cache.int()).abs().max() <= 1
    assert not cache[:, 12:].any() and not scales[:, 12:].any()  # positions never written stay zero


def test_quant_method_and_calib_refusals(checkpoints, tmp_path):
    """ExecuTorch's quantizers need no data, and --quant-method rounds 8da4w's 4-bit weights only."""
    d, out = checkpoints("tiny"), tmp_path / "x.pte"
    for options, words in ((dict(quant="8da4w", calib=__file__), ("--calib", "drop it")),
                           (dict(quant="8da8w", quant_method="hqq"), ("--quant-method", "8da8w")),
                           (dict(quant="8da4w", quant_method="gptq"), ("'gptq'", "hqq"))):
        with pytest.raises(EdgeError) as e:
            export_model("executorch", d, out, **options)
        assert "\n" not in str(e.value) and all(w in str(e.value) for w in words), str(e.value)
    assert not out.exists()


def test_hqq_scales_fit_better_than_absmax(checkpoints):
    """torchao's hqq_scale_only (8da4w's --quant-method hqq) moves group scales off absmax / 8 where that
    lowers the rounding error: every 4-bit linear's reconstruction error is at most rtn's, and lower overall."""
    from export.executorch import prepare_model

    errors = {}
    for method in ("rtn", "hqq"):
        model = load_model(checkpoints("trained:tiny"))
        reference = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
        prepare_model(model, "8da4w", group_size=32, embedding_quant="none", method=method)
        errors[method] = {}
        for name, w in reference.items():
            q = model.get_submodule(name)
            groups = q.weight.reshape(q.weight.shape[0], -1, q.group_size).float()
            scale = q.scale.reshape(groups.shape[0], -1, 1) if q.scale.dim() == 2 else q.scale.reshape(-1, 1, 1)
            deq = (groups * scale).reshape(w.shape) if q.scale.dim() == 2 else q.weight.float() * q.scale[:, None]
            errors[method][name] = float(((deq - w) ** 2).sum())
    assert sum(errors["hqq"].values()) < sum(errors["rtn"].values())
    assert all(errors["hqq"][n] <= errors["rtn"][n] * 1.001 for n in errors["rtn"]), errors
