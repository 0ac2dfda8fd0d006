"""ONNX export: edge.HybridLM with its sequence state as explicit graph inputs and outputs.

The reference model runs unchanged; only its cache object differs (`ExplicitCache` below): it reads
the past state from graph inputs and hands the present state back as graph outputs, because the
dynamo exporter silently drops in-place buffer updates. The graph I/O follows the names
onnxruntime-genai's LFM2 builder and transformers.js use, so their loops can drive our models:

    input_ids                         int64 [1, sequence_length]
    past_key_values.{i}.key / .value  [1, n_kv_heads, past_sequence_length, head_dim]   attention layer i
    past_conv.{i}                     float32 [1, hidden, conv_L_cache]                  conv layer i
    logits                            float32 [1, 1, vocab]   (the last position only)
    present.{i}.key / .value          [1, n_kv_heads, past_sequence_length + sequence_length, head_dim]
    present_conv.{i}                  float32 [1, hidden, conv_L_cache]

`i` is the real layer index. K/V are grouped (n_kv_heads, never expanded) and stored in the artifact's
KV format: float32, float16, or int8 with a float32 scale per (position, kv head) in the extra tensors
`past_key_values.{i}.key_scale` / `.value_scale` -> `present.{i}.key_scale` / `.value_scale`
[1, n_kv_heads, seq, 1] (symmetric: value = int8 * scale). Positions come from the past length, so
there is no position input; a fresh sequence starts from empty (length-0) K/V and zero conv states.
The conv state keeps conv_L_cache columns (of which the conv uses the newest L_cache-1), as the
onnxruntime-genai builder and transformers.js do. Everything `runtime.load` needs (config, tokenizer,
quant, KV format, max_seq_len) is in the model's metadata_props under the `edge.` keys.
"""
from __future__ import annotations

import contextlib
import json
import logging
import warnings
from pathlib import Path

import torch
from torch import nn

from edge.checkpoint import load_model
from edge.config import HybridConfig
from edge.errors import EdgeError
from edge.files import atomic_path
from edge.model import causal_mask, grouped_attention
from edge.tokenizer import tokenizer_json
from runtime.onnxruntime import META_PREFIX, present_name

QUANTS = ("fp32", "int8", "int4")
KV_CACHES = ("fp32", "fp16", "int8")
DEFAULT_QUANT = "int8"
DEFAULT_KV_CACHE = "fp32"
DEFAULT_GROUP_SIZE = 32
OPSET = 18
KV_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "int8": torch.int8}


def state_names(config: HybridConfig, kv_cache: str) -> list[str]:
    """Names of the past-state inputs, in graph order (present names: see `present_name`)."""
    kinds = ("key", "value", "key_scale", "value_scale") if kv_cache == "int8" else ("key", "value")
    names = []
    for i in range(config.num_hidden_layers):
        if i in config.attention_layers:
            names += [f"past_key_values.{i}.{kind}" for kind in kinds]
        else:
            names.append(f"past_conv.{i}")
    return names


def empty_state(config: HybridConfig, kv_cache: str, past_len: int = 0) -> dict[str, torch.Tensor]:
    """The state of a fresh sequence (past_len 0); past_len > 0 gives example inputs for tracing."""
    state = {}
    for name in state_names(config, kv_cache):
        if name.startswith("past_conv."):
            state[name] = torch.zeros(1, config.hidden_size, config.conv_L_cache)
        elif name.endswith("_scale"):
            state[name] = torch.ones(1, config.num_key_value_heads, past_len, 1)
        else:
            shape = (1, config.num_key_value_heads, past_len, config.head_dim)
            state[name] = torch.zeros(shape, dtype=KV_DTYPES[kv_cache])
    return state


def quantize_int8(x: torch.Tensor):
    """Symmetric int8 over the last dim: one float32 scale per (kv head, position) (DESIGN.md §3)."""
    scale = x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-8) / 127.0
    return torch.round(x / scale).clamp(-127, 127).to(torch.int8), scale


class ExplicitCache:
    """The cache seam of edge.model for ONNX: past state in, present state out (nothing in place)."""

    def __init__(self, config: HybridConfig, past: dict[str, torch.Tensor], kv_cache: str):
        self.config, self.past, self.kv_cache = config, past, kv_cache
        self.present: dict[str, torch.Tensor] = {}

    def _append(self, layer: int, kind: str, new: torch.Tensor) -> torch.Tensor:
        """Store `new` after the past K or V of `layer`; return everything stored, as float32."""
        name = f"past_key_values.{layer}.{kind}"
        if self.kv_cache == "int8":
            q, scale = quantize_int8(new)
            stored = torch.cat([self.past[name], q], dim=2)
            scales = torch.cat([self.past[name + "_scale"], scale], dim=2)
            self.present[present_name(name)] = stored
            self.present[present_name(name + "_scale")] = scales
            return stored.float() * scales
        stored = torch.cat([self.past[name], new.to(KV_DTYPES[self.kv_cache])], dim=2)
        self.present[present_name(name)] = stored
        return stored.float()

    def attend(self, layer, q, k, v, input_pos):
        k, v = self._append(layer, "key", k), self._append(layer, "value", v)
        T, S = q.shape[2], k.shape[2]
        return grouped_attention(q, k, v, causal_mask(T, S, S - T, q.device))

    def conv_window(self, layer, bx):
        window = torch.cat([self.past[f"past_conv.{layer}"], bx], dim=-1)
        self.present[f"present_conv.{layer}"] = window[..., -self.config.conv_L_cache:]
        return window


class OnnxStep(nn.Module):
    """One forward step of the model over explicit state: (input_ids, past) -> (logits, *present)."""

    def __init__(self, model, kv_cache: str):
        super().__init__()
        self.model, self.kv_cache = model, kv_cache
        self.config = model.config

    def forward(self, input_ids, past: dict[str, torch.Tensor]):
        cache = ExplicitCache(self.config, past, self.kv_cache)
        attn = self.config.attention_layers
        n_past = past[f"past_key_values.{attn[0]}.key"].shape[2] if attn else 0
        logits = self.model(input_ids, n_past, cache, last_logits_only=True)
        return (logits, *(cache.present[present_name(n)] for n in past))


def export(model_dir: Path, out: Path, *, quant: str, kv_cache: str, max_seq_len: int,
           group_size: int | None = None, **ignored) -> Path:
    """Write `out` (.onnx, one file) from the checkpoint in model_dir; see the module docstring."""
    import onnx

    unused = [k for k, v in ignored.items() if v is not None]
    if unused:
        warnings.warn(f"onnx export ignores options {', '.join(unused)}")
    group_size = group_size or DEFAULT_GROUP_SIZE
    if quant == "int4" and (group_size < 16 or group_size & (group_size - 1)):
        raise EdgeError(f"--group-size {group_size} is invalid for onnx int4; use a power of two >= 16 (e.g. 32)")
    model = load_model(model_dir)
    config = model.config
    tokenizer_text = tokenizer_json(model_dir)
    with quiet():
        graph = trace(model, kv_cache)
        graph = quantize_weights(graph, quant, group_size)
    metadata = {"config": json.dumps(config.to_dict()), "tokenizer": tokenizer_text, "quant": quant,
                "kv_cache": kv_cache, "max_seq_len": str(max_seq_len),
                "group_size": str(group_size if quant == "int4" else 0),
                "io": "see export/onnx.py: input_ids, past_key_values.{i}.key/value(+_scale), past_conv.{i} -> "
                      "logits [1,1,vocab], present.{i}.*, present_conv.{i}"}
    del graph.metadata_props[:]
    for key, value in metadata.items():
        graph.metadata_props.add(key=META_PREFIX + key, value=value)
    if graph.ByteSize() >= 2**31:
        raise EdgeError(f"the {quant} ONNX model of {model_dir} exceeds protobuf's 2 GiB single-file limit; "
                        "export with --quant int8 or int4")
    with atomic_path(out) as tmp:
        onnx.save_model(graph, str(tmp))
    return out


@contextlib.contextmanager
def quiet():
    """The exporter and ORT's quantizers log every node at INFO; keep the console for errors."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(previous)


@torch.no_grad()
def trace(model, kv_cache: str):
    """torch.onnx.export (dynamo) of one step; returns the optimised ModelProto, checked for all state outputs."""
    config = model.config
    if config.tie_word_embeddings:  # a separate lm_head initializer, so the weight quantizers see a constant MatMul
        model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())
    past = empty_state(config, kv_cache, past_len=5)  # example sizes >= 2 keep the dims dynamic
    input_ids = torch.zeros(1, 3, dtype=torch.long)
    names = list(past)
    dynamic = {"input_ids": {1: "sequence_length"},
               "past": {n: ({} if n.startswith("past_conv.") else {2: "past_sequence_length"}) for n in names}}
    step = OnnxStep(model, kv_cache).eval()
    try:
        program = torch.onnx.export(step, (input_ids,), kwargs={"past": past}, dynamo=True, opset_version=OPSET,
                                    input_names=["input_ids", *names],
                                    output_names=["logits", *map(present_name, names)],
                                    dynamic_shapes=dynamic, optimize=True, verbose=False)
    except Exception as e:
        raise EdgeError(f"torch.onnx.export failed: {str(e).splitlines()[0]}") from e
    graph = fuse_for_ort(program.model_proto)
    if kv_cache == "fp32":
        graph = fuse_group_query_attention(graph, config)
    outputs = [o.name for o in graph.graph.output]
    missing = [present_name(n) for n in names if present_name(n) not in outputs]
    if missing or "logits" not in outputs:
        raise EdgeError(f"the exported ONNX graph lacks state outputs {missing[:3]}; the cache was not exported")
    return graph


def fuse_for_ort(graph):
    """onnxscript's transformer fusions for ONNX Runtime: RMSNorm (+ residual add) ->
    (Skip)SimplifiedLayerNormalization, the decomposed SDPA -> com.microsoft MultiHeadAttention: fewer,
    fused kernels per step (see README). Its MatMul+Transpose -> FusedMatMul rules are left out on
    purpose: they would hide weights from the quantizers (ORT applies them itself at load time)."""
    import onnx_ir as ir
    from onnxscript.rewriter.ort_fusions._core import fuse_xformers

    model, _ = fuse_xformers(ir.serde.deserialize_model(graph))
    return plain_rms_norms(ir.serde.serialize_model(model))


def plain_rms_norms(graph):
    """SimplifiedLayerNormalization is an ORT op in the ONNX domain that onnx.checker rejects; write the
    ones the fusion left standalone back as x / sqrt(mean(x^2) + eps) * w, the form ORT's own load-time
    optimizer fuses into the same kernel, so the file stays standard and the run stays fused."""
    from onnx import TensorProto, helper

    rebuilt, constants = [], {}
    for n in graph.graph.node:
        if n.op_type != "SimplifiedLayerNormalization" or n.domain not in ("", "ai.onnx"):
            rebuilt.append(n)
            continue
        eps = next((a.f for a in n.attribute if a.name == "epsilon"), 1e-5)
        for name, dtype, value in (("rms.two", TensorProto.FLOAT, 2.0), (f"rms.eps{eps:g}", TensorProto.FLOAT, eps),
                                   ("rms.axes", TensorProto.INT64, -1)):
            constants[name] = helper.make_tensor(name, dtype, [1] if name == "rms.axes" else [], [value])
        x, weight, p = n.input[0], n.input[1], f"{n.name}."
        rebuilt += [helper.make_node("Pow", [x, "rms.two"], [p + "sq"]),
                    helper.make_node("ReduceMean", [p + "sq", "rms.axes"], [p + "mean"], keepdims=1),
                    helper.make_node("Add", [p + "mean", f"rms.eps{eps:g}"], [p + "var"]),
                    helper.make_node("Sqrt", [p + "var"], [p + "std"]),
                    helper.make_node("Div", [x, p + "std"], [p + "normed"]),
                    helper.make_node("Mul", [p + "normed", weight], [n.output[0]])]
    graph.graph.initializer.extend(constants.values())
    del graph.graph.node[:]
    graph.graph.node.extend(rebuilt)
    return graph


def fuse_group_query_attention(graph, config: HybridConfig):
    """Replace each attention layer's Concat(past, new) + expanded-KV MultiHeadAttention by one
    com.microsoft GroupQueryAttention (fp32 KV only: ORT's CPU kernel wants T_CACHE == T for float).
    GQA appends to the grouped cache and attends causally without expanding K/V to n_heads, which is
    what makes it faster (README). Returns the graph unchanged if the expected pattern is absent."""
    import onnx
    from onnx import TensorProto, helper

    nodes = list(graph.graph.node)
    producer = {o: n for n in nodes for o in n.output}
    mha = [n for n in nodes if n.op_type == "MultiHeadAttention"]
    layers = config.attention_layers
    if not layers or len(mha) != len(layers):
        return graph
    H, KV, D = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    first_past = f"past_key_values.{layers[0]}.key"
    const = lambda name, values: helper.make_tensor(name, TensorProto.INT64, [len(values)], values)  # noqa: E731
    graph.graph.initializer.extend([const("gqa.one", [1]), const("gqa.scalar", []),  # shape [] -> a scalar
                                    const("gqa.kv_shape", [0, 0, KV * D])])
    prelude = [  # seqlens_k = total - 1 ([batch] int32) and total_sequence_length (int32 scalar), shared
        helper.make_node("Shape", [first_past], ["gqa.past_len"], start=2, end=3),
        helper.make_node("Shape", ["input_ids"], ["gqa.seq_len"], start=1, end=2),
        helper.make_node("Add", ["gqa.past_len", "gqa.seq_len"], ["gqa.total"]),
        helper.make_node("Sub", ["gqa.total", "gqa.one"], ["gqa.seqlens_i64"]),
        helper.make_node("Cast", ["gqa.seqlens_i64"], ["gqa.seqlens_k"], to=TensorProto.INT32),
        helper.make_node("Reshape", ["gqa.total", "gqa.scalar"], ["gqa.total_scalar"]),
        helper.make_node("Cast", ["gqa.total_scalar"], ["gqa.total_len"], to=TensorProto.INT32),
    ]
    replace, drop = {}, set()
    for layer, attn in zip(layers, mha):
        cat_k, cat_v = producer[f"present.{layer}.key"], producer[f"present.{layer}.value"]
        if cat_k.op_type != "Concat" or cat_v.op_type != "Concat":
            return graph
        new = []
        for kind, cat in (("key", cat_k), ("value", cat_v)):
            new += [helper.make_node("Transpose", [cat.input[1]], [f"gqa.{layer}.{kind}_bsnh"], perm=[0, 2, 1, 3]),
                    helper.make_node("Reshape", [f"gqa.{layer}.{kind}_bsnh", "gqa.kv_shape"],
                                     [f"gqa.{layer}.{kind}"])]
        scale = [a.f for a in attn.attribute if a.name == "scale"]
        new.append(helper.make_node(
            "GroupQueryAttention",
            [attn.input[0], f"gqa.{layer}.key", f"gqa.{layer}.value", f"past_key_values.{layer}.key",
             f"past_key_values.{layer}.value", "gqa.seqlens_k", "gqa.total_len"],
            [attn.output[0], f"present.{layer}.key", f"present.{layer}.value"],
            name=f"gqa_{layer}", domain="com.microsoft", num_heads=H, kv_num_heads=KV,
            scale=scale[0] if scale else D ** -0.5))
        replace[id(attn)] = new
        drop |= {id(cat_k), id(cat_v)}
    rebuilt = prelude + [m for n in nodes if id(n) not in drop for m in replace.get(id(n), [n])]
    del graph.graph.node[:]
    graph.graph.node.extend(remove_dead_nodes(rebuilt, [o.name for o in graph.graph.output]))
    onnx.checker.check_model(graph)
    return graph


def remove_dead_nodes(nodes, outputs):
    live, kept = set(outputs), []
    for n in reversed(nodes):
        if any(o in live for o in n.output):
            kept.append(n)
            live.update(n.input)
    return kept[::-1]


def weight_matmuls(graph) -> list[str]:
    """Names of float (Fused)MatMul/Gemm nodes with a constant initializer operand: weights left unquantized."""
    constants = {i.name for i in graph.graph.initializer}
    return [n.name for n in graph.graph.node if n.op_type in ("MatMul", "FusedMatMul", "Gemm")
            and any(i in constants for i in n.input[:2])]


def quantize_weights(graph, quant: str, group_size: int):
    """fp32 as is. int8: ORT dynamic quantization (int8 weights per output channel, activations
    quantized per call). int4: MatMulNBits, blocks of `group_size` along K with a scale and zero point
    each (asymmetric: measurably closer to fp32 than symmetric at the same size, see README), int8
    compute (accuracy_level 4, ORT's fast CPU path). Every weight MatMul is quantized, lm_head included
    (export untied it, so the embedding Gather keeps its own fp32 table)."""
    if quant == "fp32":
        return graph
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    if quant == "int4":
        quantizer = MatMulNBitsQuantizer(graph, bits=4, block_size=group_size, is_symmetric=False,
                                         accuracy_level=4)
        quantizer.process()
        quantized = quantizer.model.model
    else:
        import tempfile
        with tempfile.TemporaryDirectory() as tmp:
            dst = Path(tmp) / "int8.onnx"
            quantize_dynamic(graph, dst, op_types_to_quantize=["MatMul"], weight_type=QuantType.QInt8,
                             per_channel=True)
            quantized = onnx.load_model(str(dst))
    left = weight_matmuls(quantized)
    if left:
        raise EdgeError(f"{quant} quantization left {len(left)} weight MatMuls in float ({left[0]}, ...)")
    return quantized
