"""ONNX export: edge.HybridLM with its sequence state as explicit graph inputs and outputs.

The reference model runs unchanged; only its cache object differs (`ExplicitCache` below): it reads
the past state from graph inputs and hands the present state back as graph outputs, because the
dynamo exporter silently drops in-place buffer updates. The graph I/O follows the names
onnxruntime-genai's LFM2 builder and transformers.js use, so their loops can drive our models:

    input_ids                         int64 [1, sequence_length]
    attention_mask                    int64 [1, past_sequence_length + sequence_length], all ones (*)
    past_key_values.{i}.key / .value  [1, n_kv_heads, past_sequence_length, head_dim]   attention layer i
    past_conv.{i}                     float32 [1, hidden, conv_L_cache - 1]              conv layer i
    logits                            float32 [1, 1, vocab]   (the last position only)
    present.{i}.key / .value          [1, n_kv_heads, past_sequence_length + sequence_length, head_dim]
    present_conv.{i}                  float32 [1, hidden, conv_L_cache - 1]

`i` is the real layer index. K/V are grouped (n_kv_heads, never expanded) and stored in the artifact's
KV format: float32, float16, or int8. int8 is ONNX Runtime's native GroupQueryAttention int8 cache
(docs/design.md §3's "native format, documented"): symmetric, value = int8 * scale with one float32 scale per
(kv head, channel) per layer, calibrated at export on a short text (`calibrate_kv_scales`) and stored as
constants in the graph, so the state I/O is the same K/V tensors as fp32, in int8; K is cached after
RoPE, as in fp32. Measured against per-(position, kv head) scales applied with plain ops, it is nearly
as faithful on the §5 protocol and 4-5x faster at long context (benchmarks/RESULTS.md). There is no
position input; a fresh sequence starts from empty (length-0) K/V and zero conv states.
(*) Graphs with GroupQueryAttention (fp32 and int8 KV) take the context length from `attention_mask`, as
the builder's do, not from the past's shape, so a runtime may also bind past and present to one buffer
of max length that GQA appends to in place (ORT's past_present_share_buffer: no cache copy per step;
runtime/onnxruntime.py does). The fp16 graph (MultiHeadAttention over concatenated K/V) has no mask
input: its positions come from the past length.
The conv state keeps the newest conv_L_cache-1 columns of B*x (docs/design.md §3), as the onnxruntime-genai
builder's `past.{i}.conv` does. Everything `runtime.load` needs (config, tokenizer,
quant, KV format, max_seq_len, chat template) is in the model's metadata_props under the `edge.` keys.
An output path without the .onnx suffix gets an onnxruntime-genai model folder around the same graph
(export/genai.py), which `og.Model(DIR)` and `runtime.load(DIR)` both open.
"""
from __future__ import annotations

import contextlib
import json
import logging
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edge.chat import read_chat_template
from edge.checkpoint import load_model
from edge.config import HybridConfig
from edge.errors import EdgeError
from edge.files import atomic_path
from edge.model import causal_mask, grouped_attention, rope_cos_sin
from edge.tokenizer import tokenizer_json
from export.genai import SINGLE_FILE_LIMIT, write_model_folder
from edge.formats.onnx import ATTENTION_MASK, FORMAT, META_PREFIX, present_name, state_names

# int4 block size by default: 64 (the first of GROUP_SIZES dividing the hidden size), symmetric, with the lm_head
# (and the tied embedding reading its blocks) at 8 bits, as llama.cpp's q4_0 keeps its output matrix at q8_0 and
# our ExecuTorch 8da4w keeps its lm_head int8: a 4-bit head misses docs/design.md §5's 4-bit bound on a random
# transformers-made checkpoint with every quantizer ORT ships except hqq, whose float zero points its CPU kernel
# runs ~40x slower. Block 64 is within the bound on the random, trained and text-trained checkpoints, close to
# block 32 on the trained ones (less faithful at LFM2-350M's random shapes, still more than the genai builder's
# default), for 10% fewer bytes per token in the 4-bit body (benchmarks/bench_fidelity.py; RESULTS.md issue 27);
# 32 (the onnxruntime-genai builder's) and 16 remain --group-size options, 128 misses the bound.
GROUP_SIZES = (64, 32, 16)
HEAD_BITS, HEAD_BLOCKS = 8, (128, 64, 32, 16)  # 8-bit head: block 128 as fast as any here (3.2 ms vs 3.6 at 32)
CALIBRATED_METHODS = ("gptq",)  # int4 methods that read calibration activations (--calib)
OPSET = 18
KV_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "int8": torch.int8}


def empty_state(config: HybridConfig, kv_cache: str, past_len: int = 0) -> dict[str, torch.Tensor]:
    """The state of a fresh sequence (past_len 0); past_len > 0 gives example inputs for tracing."""
    state = {}
    for name in state_names(config):
        if name.startswith("past_conv."):
            state[name] = torch.zeros(1, config.hidden_size, config.conv_L_cache - 1)
        else:
            shape = (1, config.num_key_value_heads, past_len, config.head_dim)
            state[name] = torch.zeros(shape, dtype=KV_DTYPES[kv_cache])
    return state


class ExplicitCache:
    """The cache seam of edge.model for ONNX: past state in, present state out (nothing in place)."""

    def __init__(self, config: HybridConfig, past: dict[str, torch.Tensor], kv_cache: str):
        self.config, self.past, self.kv_cache = config, past, kv_cache
        self.present: dict[str, torch.Tensor] = {}

    def _append(self, layer: int, kind: str, new: torch.Tensor) -> torch.Tensor:
        """Store `new` after the past K or V of `layer`; return everything stored, as float32."""
        name = f"past_key_values.{layer}.{kind}"
        stored = torch.cat([self.past[name], new.to(KV_DTYPES[self.kv_cache])], dim=2)
        self.present[present_name(name)] = stored
        return stored.float()

    def attend(self, layer, q, k, v, input_pos):
        k, v = self._append(layer, "key", k), self._append(layer, "value", v)
        T, S = q.shape[2], k.shape[2]
        return grouped_attention(q, k, v, causal_mask(T, S, S - T, q.device))

    def conv_window(self, layer, bx):
        window = torch.cat([self.past[f"past_conv.{layer}"], bx], dim=-1)
        self.present[f"present_conv.{layer}"] = window[..., -(self.config.conv_L_cache - 1):]
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
           group_size: int | None = None, quant_method: str | None = None, calib=None, head_bits: int = HEAD_BITS,
           **ignored) -> Path:
    """Write `out` from the checkpoint in model_dir: one .onnx file, or, for a path without the .onnx
    suffix, an onnxruntime-genai model folder (export/genai.py); see the module docstring.
    quant_method: int4's rounding (FORMAT.quant_methods, `quantize_matmul_nbits`); calib: the text file
    gptq and the int8 KV scales calibrate on (export/calib.py); head_bits: int4's lm_head, 8 or 4."""
    import onnx

    unused = [k for k, v in ignored.items() if v is not None]
    if unused:  # refused, as the GGUF exporter does: a flag that changes nothing must not look like it did
        raise EdgeError(f"onnx export takes no {'/'.join('--' + k.replace('_', '-') for k in unused)}; they are "
                        "ExecuTorch options; drop them")
    if quant == "int4" and group_size and (group_size < 16 or group_size & (group_size - 1)):
        raise EdgeError(f"--group-size {group_size} is invalid for onnx int4; use a power of two >= 16 (e.g. 128)")
    if quant_method is not None and quant != "int4":
        raise EdgeError(f"--quant-method applies to onnx's 4-bit weights (--quant int4), not {quant}; drop it")
    method = quant_method or FORMAT.quant_methods[0]
    if calib is not None and not (quant == "int4" and method in CALIBRATED_METHODS) and kv_cache != "int8":
        raise EdgeError("--calib is read by onnx int4's --quant-method gptq and by --kv-cache int8's scales; "
                        "this export uses neither; drop it")
    if head_bits not in (4, 8):
        raise EdgeError(f"head_bits must be 4 or 8, got {head_bits}")
    model = load_model(model_dir)
    config = model.config
    group_size = group_size or next((g for g in GROUP_SIZES if config.hidden_size % g == 0), GROUP_SIZES[-1])
    tokenizer_text = tokenizer_json(model_dir)
    with quiet():
        scales = (calibrate_kv_scales(model, tokenizer_text, calib) if kv_cache == "int8" and config.attention_layers
                  else None)
        inputs = None
        if quant == "int4" and method in CALIBRATED_METHODS:  # the rows each MatMul's weight multiplies
            from export.calib import calibration_ids, linear_inputs

            inputs = linear_inputs(model, calibration_ids(tokenizer_text, calib))
        # the int8 graph is the fp32 one whose GroupQueryAttention nodes then store int8 (quantize_kv_cache)
        graph = trace(model, "fp32" if kv_cache == "int8" else kv_cache, max_seq_len)
        # the graph's weights are placeholders (optimize_with_lazy_weights): from here on they are read from the checkpoint
        # one at a time, so the fp32 model is not kept next to the quantized graph (issue 15: peak memory)
        del model
        from edge.checkpoint import return_freed_memory
        return_freed_memory()
        bind_weights(graph, model_dir)
        if scales is not None:
            graph = quantize_kv_cache(graph, config, scales)
        graph = quantize_weights(graph, quant, group_size, config, method, head_bits, inputs)
        del inputs
    chat_template = read_chat_template(model_dir)
    metadata = {"config": json.dumps(config.to_dict()), "tokenizer": tokenizer_text, "quant": quant,
                "kv_cache": kv_cache, "max_seq_len": str(max_seq_len),
                "group_size": str(group_size if quant == "int4" else 0),
                "quant_method": method if quant == "int4" else "", "head_bits": str(head_bits if quant == "int4" else 0),
                "io": "see export/onnx.py: input_ids, attention_mask (GQA graphs), past_key_values.{i}.key/value, "
                      "past_conv.{i} -> logits [1,1,vocab], present.{i}.*, present_conv.{i}"}
    if chat_template:
        metadata["chat_template"] = chat_template
    del graph.metadata_props[:]
    for key, value in metadata.items():
        graph.metadata_props.add(key=META_PREFIX + key, value=value)
    if out.suffix != ".onnx":
        return write_model_folder(out, graph, model_dir=model_dir, config=config, tokenizer_text=tokenizer_text,
                                  kv_cache=kv_cache, max_seq_len=max_seq_len, chat_template=chat_template)
    if graph.ByteSize() >= SINGLE_FILE_LIMIT:
        raise EdgeError(f"the {quant} ONNX model of {model_dir} exceeds protobuf's 2 GiB single-file limit; "
                        "export to a folder (an output path without .onnx) or with --quant int8 or int4")
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
def trace(model, kv_cache: str, max_seq_len: int):
    """torch.onnx.export (dynamo) of one step; returns the optimised ModelProto, checked for all state outputs."""
    config = model.config
    tied = config.tie_word_embeddings
    if tied:  # a separate lm_head initializer, so the weight quantizers see a constant MatMul; its values are
        # never read (the graph's weights are placeholders, optimize_with_lazy_weights), so no copy of the table is made
        model.lm_head.weight = nn.Parameter(torch.empty_like(model.lm_head.weight))
    try:
        return _trace(model, kv_cache, max_seq_len)
    finally:
        if tied:
            model.lm_head.weight = model.model.embed_tokens.weight


def _trace(model, kv_cache: str, max_seq_len: int):
    config = model.config
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
                                    dynamic_shapes=dynamic, optimize=False, verbose=False)
    except Exception as e:
        raise EdgeError(f"torch.onnx.export failed: {str(e).splitlines()[0]}") from e
    graph = optimize_with_lazy_weights(program.model, {f"model.{n}" for n, p in model.named_parameters() if p.dim() == 2})
    del program
    graph = fuse_for_ort(graph)
    graph = fuse_causal_conv(graph, config)
    graph = pack_parallel_matmuls(graph)
    if kv_cache == "fp32":
        graph = fuse_group_query_attention(graph, config, max_seq_len)
    outputs = [o.name for o in graph.graph.output]
    missing = [present_name(n) for n in names if present_name(n) not in outputs]
    if missing or "logits" not in outputs:
        raise EdgeError(f"the exported ONNX graph lacks state outputs {missing[:3]}; the cache was not exported")
    return graph


CALIBRATION_TOKENS = 512


@torch.no_grad()
def calibrate_kv_scales(model, tokenizer_text: str, calib=None) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Per attention layer, the int8 scales of K and V, each [n_kv_heads, head_dim]: the largest |value|
    of that channel over a forward pass on CALIBRATION_TOKENS tokens of the calibration text (export/calib.py:
    --calib, or the Python standard library's source), / 127. K is seen after RoPE, which rotates channel
    pairs (d, d + D/2), so a K pair shares the larger of its two maxima: a rotation never carries a value
    past its scale."""
    from edge.model import DynamicCache
    from export.calib import calibration_ids

    ids = calibration_ids(tokenizer_text, calib, CALIBRATION_TOKENS)
    seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    class Recording(DynamicCache):
        def attend(self, layer, q, k, v, input_pos):  # k, v: [1, n_kv_heads, T, head_dim]
            seen[layer] = (k.abs().amax(dim=(0, 2)), v.abs().amax(dim=(0, 2)))
            return super().attend(layer, q, k, v, input_pos)

    model(torch.tensor([ids]), 0, Recording(model.config))
    scales = {}
    for layer, (k_max, v_max) in seen.items():
        half = k_max.shape[-1] // 2
        k_max = torch.maximum(k_max[:, :half], k_max[:, half:]).repeat(1, 2)
        scales[layer] = tuple((m.clamp(min=1e-6) / 127.0).numpy().astype(np.float32) for m in (k_max, v_max))
    return scales


def quantize_kv_cache(graph, config: HybridConfig, scales: dict[int, tuple[np.ndarray, np.ndarray]]):
    """Make every GroupQueryAttention store its cache in int8 (ORT's native quantized KV cache, CPU
    kernel in ORT >= 1.32): past/present K/V become int8 tensors, each GQA gets the layer's calibrated
    per-(kv head, channel) scales as constant inputs 12/13 (k_scale, v_scale, shape [1, KV, 1, D])."""
    from onnx import TensorProto, helper, numpy_helper

    gqa = {n.name: n for n in graph.graph.node if n.op_type == "GroupQueryAttention"}
    if len(gqa) != len(config.attention_layers):
        raise EdgeError("the int8 KV cache needs GroupQueryAttention in every attention layer, which the "
                        "graph lacks; export with --kv-cache fp32 or fp16")
    KV, D = config.num_key_value_heads, config.head_dim
    for layer in config.attention_layers:
        node = gqa[f"gqa_{layer}"]
        names = []
        for kind, scale in zip(("k", "v"), scales[layer]):
            names.append(f"kv_scale.{layer}.{kind}")
            graph.graph.initializer.append(numpy_helper.from_array(scale.reshape(1, KV, 1, D), names[-1]))
        node.input.extend([""] * (12 - len(node.input)) + names)
        node.attribute.extend([helper.make_attribute("k_quant_type", "PER_CHANNEL"),
                               helper.make_attribute("v_quant_type", "PER_CHANNEL"),
                               helper.make_attribute("kv_cache_bit_width", 8)])
    state = {f"{io}.{layer}.{kind}" for layer in config.attention_layers for kind in ("key", "value")
             for io in ("past_key_values", "present")}
    for value in [*graph.graph.input, *graph.graph.output]:
        if value.name in state:
            value.type.tensor_type.elem_type = TensorProto.INT8
    return graph


def fuse_for_ort(graph):
    """onnxscript's transformer fusions for ONNX Runtime: RMSNorm (+ residual add) ->
    (Skip)SimplifiedLayerNormalization, the decomposed SDPA -> com.microsoft MultiHeadAttention: fewer,
    fused kernels per step (see benchmarks/RESULTS.md). Its MatMul+Transpose -> FusedMatMul rules are left out on
    purpose: they would hide weights from the quantizers (ORT applies them itself at load time)."""
    import onnx_ir as ir
    # private module on purpose: onnxscript 0.7.2's public ort_fusions has only optimize_for_ort, which adds
    # those FusedMatMul rules (tiny fp32 graph: 4 MatMul+Transpose -> com.microsoft:FusedMatMul)
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


def node_index(nodes) -> tuple[dict, dict]:
    """tensor name -> the node producing it, and -> the nodes reading it (the pattern matchers' two maps)."""
    producer = {o: n for n in nodes for o in n.output}
    consumers = {}
    for n in nodes:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    return producer, consumers


def fuse_causal_conv(graph, config: HybridConfig):
    """Replace each conv layer's Concat(past_conv, B*x) + depthwise Conv (+ Slice of the new state, + Slice
    of the output) by one com.microsoft CausalConvWithState, ORT's fused kernel for stateful short convs
    (the onnxruntime-genai builder's LFM2 graph uses it too): a generic grouped Conv over a 3-column window
    costs several times more per decode step (benchmarks/RESULTS.md). Its state is the newest L_cache-1 columns, as ours.
    Returns the graph unchanged if the expected pattern is absent."""
    from onnx import helper

    nodes = list(graph.graph.node)
    producer, consumers = node_index(nodes)
    replace, drop = {}, set()
    for layer in config.conv_layers:
        past = f"past_conv.{layer}"
        state_slice = producer.get(present_name(past))
        window = producer.get(state_slice.input[0]) if state_slice is not None else None
        if window is None or window.op_type != "Concat" or list(window.input[:1]) != [past]:
            return graph
        convs = [c for c in consumers[window.output[0]] if c.op_type == "Conv"]
        if len(convs) != 1:
            return graph
        conv = convs[0]
        after = consumers.get(conv.output[0], [])
        trim = after[0] if len(after) == 1 and after[0].op_type == "Slice" else None  # [-T:]: a no-op now
        output = trim.output[0] if trim else conv.output[0]
        bias = conv.input[2] if len(conv.input) > 2 else ""
        replace[id(conv)] = [helper.make_node(
            "CausalConvWithState", [window.input[1], conv.input[1], bias, past], [output, present_name(past)],
            name=f"causal_conv_{layer}", domain="com.microsoft", activation="none")]
        drop |= {id(window), id(state_slice)} | ({id(trim)} if trim else set())
    return rebuild(graph, nodes, replace, drop)


def pack_parallel_matmuls(graph):
    """The three MatMuls that read the same activation with constant weights (attention q/k/v) become
    one MatMul over the weights concatenated along N, then a Split: fewer GEMVs per step, as the
    onnxruntime-genai builder packs qkv_proj; the quantizers then see one wider weight. The FFN's w1/w3
    pair is left apart on purpose: packed (N = 2*ffn) it decoded 5% slower in ORT 1.32 (benchmarks/RESULTS.md)."""
    from onnx import TensorProto, helper, numpy_helper

    inits = {i.name: i for i in graph.graph.initializer}
    nodes = list(graph.graph.node)
    siblings = {}
    for n in nodes:
        if n.op_type == "MatMul" and n.input[1] in inits and len(inits[n.input[1]].dims) == 2:
            siblings.setdefault(n.input[0], []).append(n)
    replace, drop = {}, set()
    for x, group in siblings.items():
        if len(group) != 3:
            continue
        packed = f"packed.{group[0].name or group[0].output[0]}"
        tensors = [inits[n.input[1]] for n in group]
        if all(map(is_lazy, tensors)):  # placeholders (optimize_with_lazy_weights): concatenated when read
            pieces = [piece for t in tensors for piece in lazy_pieces(t)]
            widths = [t.dims[1] for t in tensors]
            weight = lazy_placeholder(packed, [tensors[0].dims[0], sum(widths)], pieces)
        else:
            weights = [weight_array(t) for t in tensors]
            widths = [w.shape[1] for w in weights]
            weight = numpy_helper.from_array(np.concatenate(weights, axis=1), packed)
        graph.graph.initializer.extend([
            weight, helper.make_tensor(packed + ".split", TensorProto.INT64, [len(group)], widths)])
        replace[id(group[0])] = [helper.make_node("MatMul", [x, packed], [packed + ".out"], name=packed),
                                 helper.make_node("Split", [packed + ".out", packed + ".split"],
                                                  [n.output[0] for n in group], axis=-1)]
        drop |= {id(n) for n in group[1:]}
    return rebuild(graph, nodes, replace, drop)


def rebuild(graph, nodes: list, replace: dict, drop: set, prelude: list = ()):
    """The graph with `nodes` (a list of its nodes, whose ids the keys refer to) replaced (id -> new nodes,
    in place) or dropped, `prelude` first, then dead nodes and initializers nothing reads removed."""
    nodes = [*prelude, *(m for n in nodes if id(n) not in drop for m in replace.get(id(n), [n]))]
    nodes = remove_dead_nodes(nodes, [o.name for o in graph.graph.output])
    del graph.graph.node[:]
    graph.graph.node.extend(nodes)
    used = {i for n in nodes for i in n.input}
    for index in reversed(range(len(graph.graph.initializer))):  # in place: copying them would double the RAM
        if graph.graph.initializer[index].name not in used:
            del graph.graph.initializer[index]
    return graph


def unroped(producer, roped: str):
    """The [B, S, heads, D] tensor that RoPE was applied to, if `roped` is the exporter's rotate-half form
    Add(Mul(x, cos), Mul(rotate_half(x), sin)) with x = Transpose(it, [0, 2, 1, 3]); else None."""
    add = producer.get(roped)
    if add is None or add.op_type != "Add":
        return None
    for term in add.input:
        mul = producer.get(term)
        for factor in (mul.input if mul is not None and mul.op_type == "Mul" else []):
            t = producer.get(factor)
            if t is not None and t.op_type == "Transpose" and list(t.attribute[0].ints) == [0, 2, 1, 3]:
                return t.input[0]
    return None


def fuse_group_query_attention(graph, config: HybridConfig, max_seq_len: int):
    """Replace each attention layer's RoPE + Concat(past, new) + expanded-KV MultiHeadAttention by one
    com.microsoft GroupQueryAttention (fp32 KV only: ORT's CPU kernel wants T_CACHE == T for float).
    GQA appends to the grouped cache, applies RoPE itself (do_rotary, from cos/sin tables of
    max_seq_len positions) and attends causally without expanding K/V to n_heads: fewer kernels per
    step (benchmarks/RESULTS.md). Adds the `attention_mask` input its lengths come from (module docstring). Returns
    the graph unchanged if the expected pattern is absent."""
    from onnx import TensorProto, helper, numpy_helper

    nodes = list(graph.graph.node)
    producer, consumers = node_index(nodes)
    inits = {i.name: i for i in graph.graph.initializer}
    mha = [n for n in nodes if n.op_type == "MultiHeadAttention"]
    layers = config.attention_layers
    if not layers or len(mha) != len(layers):
        return graph
    H, KV, D = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    const = lambda name, values: helper.make_tensor(name, TensorProto.INT64, [len(values)], values)  # noqa: E731
    cos, sin = rope_cos_sin(torch.arange(max_seq_len), D, config.rope_theta)  # [S, D]: two equal halves
    graph.graph.initializer.extend([const("gqa.one", [1]), const("gqa.scalar", []),  # shape [] -> a scalar
                                    const("gqa.kv_shape", [0, 0, KV * D]), const("gqa.q_shape", [0, 0, H * D]),
                                    numpy_helper.from_array(cos[:, : D // 2].numpy(), "gqa.cos_cache"),
                                    numpy_helper.from_array(sin[:, : D // 2].numpy(), "gqa.sin_cache")])
    # seqlens_k = ones in the mask - 1 ([batch] int32) and total_sequence_length = the mask's length (int32
    # scalar), as the builder computes them: taken from the mask, not from the past's shape, so a runtime
    # may bind past and present to one max-length buffer that GQA appends to in place (share buffer)
    prelude = [
        helper.make_node("ReduceSum", [ATTENTION_MASK, "gqa.one"], ["gqa.total"], keepdims=0),
        helper.make_node("Sub", ["gqa.total", "gqa.one"], ["gqa.seqlens_i64"]),
        helper.make_node("Cast", ["gqa.seqlens_i64"], ["gqa.seqlens_k"], to=TensorProto.INT32),
        helper.make_node("Shape", [ATTENTION_MASK], ["gqa.mask_len"], start=1, end=2),
        helper.make_node("Reshape", ["gqa.mask_len", "gqa.scalar"], ["gqa.total_scalar"]),
        helper.make_node("Cast", ["gqa.total_scalar"], ["gqa.total_len"], to=TensorProto.INT32),
    ]
    replace, drop = {}, set()
    for layer, attn in zip(layers, mha):
        cat_k, cat_v = producer[f"present.{layer}.key"], producer[f"present.{layer}.value"]
        if cat_k.op_type != "Concat" or cat_v.op_type != "Concat":
            return graph
        # the query arrives as Reshape(Transpose(roped q)) [B, S, H*D]; GQA takes q and k before RoPE
        q_packed = producer.get(attn.input[0])
        q_bhsd = producer.get(q_packed.input[0]) if q_packed is not None else None
        q, k = (unroped(producer, q_bhsd.input[0]) if q_bhsd is not None else None,
                unroped(producer, cat_k.input[1]))
        if q is None or k is None:
            return graph
        v = producer.get(cat_v.input[1])  # Transpose([B, S, KV, D] -> BHSD), undone here
        if v is None or v.op_type != "Transpose" or list(v.attribute[0].ints) != [0, 2, 1, 3]:
            return graph
        new = [helper.make_node("Reshape", [q, "gqa.q_shape"], [f"gqa.{layer}.query"]),
               helper.make_node("Reshape", [k, "gqa.kv_shape"], [f"gqa.{layer}.key"])]
        value = f"gqa.{layer}.value"
        heads = producer.get(v.input[0])  # v_proj's [B, S, KV*D] output viewed as [B, S, KV, D]: take it as is
        if heads is not None and heads.op_type == "Reshape":
            value = heads.input[0]
        else:
            new.append(helper.make_node("Reshape", [v.input[0], "gqa.kv_shape"], [value]))
        # the exporter reshapes the [B, S, H*D] result to [B, S, H, D] and back: GQA writes the final tensor
        output, reshapes = attn.output[0], []
        while len(consumers.get(output, [])) == 1 and consumers[output][0].op_type == "Reshape":
            reshapes.append(consumers[output][0])
            output = reshapes[-1].output[0]
        shape = inits.get(reshapes[-1].input[1]) if reshapes else None
        if shape is None or numpy_helper.to_array(shape).tolist()[1:] != [-1, H * D]:
            output, reshapes = attn.output[0], []
        scale = [a.f for a in attn.attribute if a.name == "scale"]
        new.append(helper.make_node(
            "GroupQueryAttention",
            [f"gqa.{layer}.query", f"gqa.{layer}.key", value, f"past_key_values.{layer}.key",
             f"past_key_values.{layer}.value", "gqa.seqlens_k", "gqa.total_len", "gqa.cos_cache", "gqa.sin_cache"],
            [output, f"present.{layer}.key", f"present.{layer}.value"],
            name=f"gqa_{layer}", domain="com.microsoft", num_heads=H, kv_num_heads=KV,
            scale=scale[0] if scale else D ** -0.5, do_rotary=1, rotary_interleaved=0))
        replace[id(attn)] = new
        drop |= {id(cat_k), id(cat_v)} | {id(r) for r in reshapes}
    mask = helper.make_tensor_value_info(ATTENTION_MASK, TensorProto.INT64, ["batch", "total_sequence_length"])
    graph.graph.input.insert(1, mask)
    return rebuild(graph, nodes, replace, drop, prelude)  # onnx.checker runs on every artifact in the tests


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


def quantize_weights(graph, quant: str, group_size: int, config: HybridConfig, method: str = "rtn",
                     head_bits: int = HEAD_BITS, inputs: dict[str, np.ndarray] | None = None):
    """fp32 as is. int8: ORT dynamic quantization (int8 weights per output channel, activations
    quantized per call). int4: MatMulNBits, blocks of `group_size` along K rounded by `method`
    (`quantize_matmul_nbits`), int8 compute (accuracy_level 4, ORT's fast CPU path). Every weight MatMul
    is quantized, lm_head included (export untied it so the quantizer sees a constant MatMul), the lm_head
    to `head_bits` (8: symmetric rtn in blocks of HEAD_BLOCKS). int4 with tied embeddings: the embedding reads
    the lm_head's blocks where their layout allows (`share_quantized_embedding`); otherwise it keeps an fp32
    table. `inputs`: each linear's calibration input rows (export/calib.py), which gptq needs.

    The graph ORT's quantize_dynamic / MatMulNBitsQuantizer would write, node for node and with their
    arithmetic (`quantize_matmul_int8`, `quantize_matmul_nbits`), but one weight at a time, each read
    when its turn comes (placeholders, optimize_with_lazy_weights): those tools hold the whole fp32 model, and
    quantize_dynamic a second copy of it, which made a 350M int8 export peak at 10 GB (issue 15)."""
    if quant == "fp32":
        return materialize_weights(graph)
    inits = {i.name: i for i in graph.graph.initializer}
    nodes = list(graph.graph.node)
    replace, quantized_inputs = {}, {}
    for n in nodes:
        weight = inits.get(n.input[1]) if n.op_type == "MatMul" and len(n.input) == 2 else None
        if weight is None or len(weight.dims) != 2 or weight.data_type != onnx_float():
            continue
        if quant == "int4" and "logits" in n.output and head_bits == 8:
            K = weight.dims[0]
            block = next((b for b in HEAD_BLOCKS if K % b == 0), HEAD_BLOCKS[-1])
            replace[id(n)], new = quantize_matmul_nbits(n, weight, block, bits=8)
        elif quant == "int4":
            rows = inputs[linear_name(weight)] if inputs is not None else None
            replace[id(n)], new = quantize_matmul_nbits(n, weight, group_size, method=method, inputs=rows)
        else:
            replace[id(n)], new = quantize_matmul_int8(n, weight, quantized_inputs)
        graph.graph.initializer.extend(new)
    graph = rebuild(graph, nodes, replace, set())  # drops each fp32 weight (placeholder or data) now unused
    if quant == "int4" and config.tie_word_embeddings:
        graph = share_quantized_embedding(graph)
    left = weight_matmuls(graph)
    if left:
        raise EdgeError(f"{quant} quantization left {len(left)} weight MatMuls in float ({left[0]}, ...)")
    return materialize_weights(graph)  # what stays float (an untied or int8-graph embedding table)


def linear_name(weight) -> str:
    """The edge.model module name of the linear a weight placeholder holds (of its first piece: the pieces of
    a packed MatMul read one input), as export.calib.linear_inputs keys it."""
    return lazy_pieces(weight)[0]["name"].removeprefix("model.").removesuffix(".weight")


def onnx_float() -> int:
    from onnx import TensorProto

    return TensorProto.FLOAT


def quantize_matmul_nbits(node, weight, group_size: int, bits: int = 4, method: str = "rtn", inputs=None):
    """MatMul(x, W) -> com.microsoft MatMulNBits over W's `bits`-bit blocks along K, int8 compute
    (accuracy_level 4). Returns (nodes, initializers). The methods are onnxruntime's quantizers
    (onnxruntime.quantization.matmul_nbits_quantizer), each run as ORT runs it, on W alone:
    - rtn: ORT's default quantizer (DefaultWeightOnlyQuantizer, C++ quantize_matmul_4bits), symmetric:
      scale = signed absmax / -8 per block (llama.cpp q4_0's rule), no zero points, which MLAS's
      int8-compute GEMV runs 1.2x faster than asymmetric blocks on AVX2 (1024 x 4608, block 32: 176 vs
      228 us), the onnxruntime-genai builder's choice too. Data-free, fast.
    - k_quant: its port of llama.cpp's make_qkx2_quants (per block a weighted least-squares search of scale and
      minimum over 20 candidates), asymmetric: uint8 zero points. Data-free; ~10x rtn's time.
    - hqq: its Half-Quadratic Quantization (20 rounds of a proximal solver on the zero point), asymmetric with
      float zero points; needs torch. Data-free.
    - gptq: its GPTQ (neural_compressor.gptq_quantize): error-compensating rounding column by column with the
      Hessian X^T X of the rows `inputs` (the calibration activations of this MatMul, export/calib.py),
      symmetric, as ORT packs it. Cubic in K: minutes per GB of weights."""
    from onnx import helper, numpy_helper

    w = weight_array(weight)
    K, N = w.shape
    if method != "rtn":
        nodes, tensors = _ort_weight_only(node, w, group_size, bits, method, inputs)
        del w
        return nodes, tensors
    from onnxruntime.quantization.matmul_nbits_quantizer import (DefaultWeightOnlyQuantConfig,
                                                                 DefaultWeightOnlyQuantizer)

    quantizer = DefaultWeightOnlyQuantizer(DefaultWeightOnlyQuantConfig(
        block_size=group_size, is_symmetric=True, accuracy_level=4, bits=bits))
    packed, scales, _ = quantizer.qbits_block_quant(w)  # symmetric: the kernel's implied zero point 2^(bits-1)
    del w
    name = weight.name
    tag = f"_Q{bits}"
    tensors = [numpy_helper.from_array(packed, name + tag), numpy_helper.from_array(scales, name + "_scales")]
    matmul = helper.make_node("MatMulNBits", [node.input[0], *(t.name for t in tensors)], [node.output[0]],
                              name=node.name + tag if node.name else "", domain="com.microsoft",
                              K=K, N=N, bits=bits, block_size=group_size, accuracy_level=4)
    return [matmul], tensors


def _ort_weight_only(node, w: np.ndarray, group_size: int, bits: int, method: str, inputs):
    """ORT's MatMulNBitsQuantizer on a one-MatMul model holding W: its own code path for `method` (the
    graph-level quantizers read every weight of a model at once; here they see one). Returns the
    MatMulNBits node, renamed to read and write what `node` does, and its initializers."""
    import contextlib
    import io

    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization import matmul_nbits_quantizer as mnq

    K, N = w.shape
    weight_name = node.input[1]
    mini = helper.make_model(helper.make_graph(
        [helper.make_node("MatMul", ["x", weight_name], ["y"], name="matmul")], "one_matmul",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", K])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", N])],
        [numpy_helper.from_array(w, weight_name)]), opset_imports=[helper.make_opsetid("", OPSET)])
    symmetric = method == "gptq"  # k_quant and hqq are asymmetric by construction
    if method == "k_quant" and -(-K // group_size) % 2:
        # onnxruntime 1.32's neural_compressor packs two 4-bit zero points per byte across columns, which for an
        # odd number of blocks per column is not MatMulNBits' per-column layout (it fails, or misplaces them)
        raise EdgeError(f"onnx k_quant needs an even number of blocks per column; {node.input[1]} has {K} rows, "
                        f"{-(-K // group_size)} block(s) of {group_size}; use a smaller --group-size or another "
                        "--quant-method")
    if method == "k_quant":
        config = mnq.KQuantWeightOnlyQuantConfig(customized_weight_config={"matmul": {"bits": bits}})
    elif method == "hqq":
        config = mnq.HQQWeightOnlyQuantConfig(block_size=group_size, bits=bits)
    elif method == "gptq":
        if bits != 4:
            raise EdgeError("internal: ORT's gptq writes 4-bit MatMulNBits only")

        class Rows(mnq.CalibrationDataReader):  # one batch: every calibration row of this MatMul's input
            def get_next(self):
                return None

            def __iter__(self):  # what ORT's gptq reads (it iterates a deep copy of the reader)
                return iter([{"x": inputs}])

        config = mnq.GPTQWeightOnlyQuantConfig(calibration_data_reader=Rows())
    else:
        raise EdgeError(f"unknown onnx --quant-method {method!r}; choose one of {', '.join(FORMAT.quant_methods)}")
    quantizer = mnq.MatMulNBitsQuantizer(mini, bits=bits, block_size=group_size, is_symmetric=symmetric,
                                         accuracy_level=4, algo_config=config)
    with contextlib.redirect_stdout(io.StringIO()):  # its neural_compressor code prints a progress bar
        quantizer.process()
    graph = quantizer.model.model.graph
    (matmul,) = [n for n in graph.node if n.op_type == "MatMulNBits"]
    matmul.input[0], matmul.output[0] = node.input[0], node.output[0]
    matmul.name = node.name + f"_Q{bits}" if node.name else ""
    if not any(a.name == "accuracy_level" for a in matmul.attribute):  # hqq writes none
        matmul.attribute.append(helper.make_attribute("accuracy_level", 4))
    used = set(matmul.input)
    return [matmul], [t for t in graph.initializer if t.name in used]


def quantize_matmul_int8(node, weight, quantized_inputs: dict):
    """MatMul(x, W) -> DynamicQuantizeLinear(x) (once per x), MatMulInteger, Cast, Mul by the scales: the
    nodes ORT's quantize_dynamic(per_channel, reduce_range, QInt8) writes, W quantized per output column
    by its own quant_utils.quantize_data (symmetric, 7-bit). `quantized_inputs` remembers the x already quantized. Returns (nodes, initializers).
    reduce_range: 7-bit weights, because on x86 CPUs without VNNI (AVX2, AVX-512F) MLAS multiplies u8
    activations by s8 weights with vpmaddubsw, whose int16 pair sums saturate at full range (ORT's
    quantization guide): tiny int8 mean cos 0.988 there, under the 8-bit bound."""
    from onnx import TensorProto, helper, numpy_helper

    w = weight_array(weight)
    q, scales = quantize_columns_int8(w)
    zero_points = np.zeros(w.shape[1], dtype=np.int8)
    del w
    name, x, out = weight.name, node.input[0], node.output[0]
    tensors = [numpy_helper.from_array(q, name + "_quantized"), numpy_helper.from_array(scales, name + "_scale"),
               numpy_helper.from_array(zero_points, name + "_zero_point")]
    new = []
    if x not in quantized_inputs:
        quantized_inputs[x] = [x + "_quantized", x + "_scale", x + "_zero_point"]
        new.append(helper.make_node("DynamicQuantizeLinear", [x], quantized_inputs[x], name=x + "_QuantizeLinear"))
    xq, xs, xz = quantized_inputs[x]
    new += [helper.make_node("Mul", [xs, name + "_scale"], [out + "_scales"], name=out + "_quant_scales_mul"),
            helper.make_node("MatMulInteger", [xq, name + "_quantized", xz, name + "_zero_point"],
                             [out + "_output_quantized"], name=out + "_quant"),
            helper.make_node("Cast", [out + "_output_quantized"], [out + "_output_float"], to=TensorProto.FLOAT,
                             name=out + "_output_cast"),
            helper.make_node("Mul", [out + "_output_float", out + "_scales"], [out], name=out + "_output_scale_mul")]
    return new, tensors


def quantize_columns_int8(w: np.ndarray, rows_per_step: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """W [K, N] -> (int8 [K, N], float32 scales [N]): per column, symmetric, 7-bit range (reduce_range),
    the arithmetic of ORT's quant_utils.quantize_data(col, INT8, symmetric=True, reduce_range=True),
    vectorized (a Python loop over 65536 columns cost minutes): range [min(col, 0), max(col, 0)] made
    symmetric, scale = 2 * absmax / (64 - -64) (exact in float32: a power-of-two divisor; 1.0 for an
    all-zero column), q = clip(round_half_even(w / scale), -128, 127). tests/test_export_memory.py
    checks it byte for byte against ORT's function. Rows in steps: one float temporary of K/steps."""
    absmax = np.maximum(np.abs(np.minimum(w.min(axis=0), 0)), np.abs(np.maximum(w.max(axis=0), 0)))
    scales = (absmax.astype(np.float64) * 2 / 128).astype(np.float32)
    scales[scales < np.finfo(np.float32).tiny] = 1.0
    q = np.empty(w.shape, dtype=np.int8)
    for r in range(0, w.shape[0], rows_per_step):
        part = np.round(w[r:r + rows_per_step] / scales)
        q[r:r + rows_per_step] = np.clip(part, -128, 127, out=part)
    return q, scales


def share_quantized_embedding(graph):
    """Tied embeddings, int4: replace the embedding's fp32 Gather by a com.microsoft GatherBlockQuantized
    over the lm_head MatMulNBits' own blocks, scales and (uint8) zero points (one table in the file, as
    the onnxruntime-genai builder does: the fp32 table was half of an int4 lfm2-350m file). Returns the
    graph unchanged where the blocks do not tile the rows exactly (hidden not a multiple of the block) or
    the zero points are float (hqq's), which GatherBlockQuantized does not take."""
    from onnx import TensorProto, helper

    nodes = list(graph.graph.node)
    inits = {i.name: i for i in graph.graph.initializer}
    lm_head = next((n for n in nodes if "logits" in n.output), None)
    gather = next((n for n in nodes if n.op_type == "Gather" and n.input[0] in inits), None)
    if lm_head is None or lm_head.op_type != "MatMulNBits" or gather is None:
        return graph
    attrs = {a.name: a.i for a in lm_head.attribute}
    vocab, hidden, block, bits = attrs["N"], attrs["K"], attrs["block_size"], attrs["bits"]
    zero_points = lm_head.input[3] if len(lm_head.input) > 3 and lm_head.input[3] else None
    if (hidden % block or list(inits[gather.input[0]].dims) != [vocab, hidden]
            or (zero_points and inits[zero_points].data_type != TensorProto.UINT8)):
        return graph
    blocks, scales = lm_head.input[1], lm_head.input[2]
    graph.graph.initializer.extend([
        helper.make_tensor("embedding.rows", TensorProto.INT64, [2], [vocab, hidden * bits // 8]),
        helper.make_tensor("embedding.scale_rows", TensorProto.INT64, [2], [vocab, hidden // block])])
    # without zero points (symmetric blocks) the op's implied 2^(bits-1), as in MatMulNBits; MatMulNBits also
    # takes its scales flat (hqq writes them so), GatherBlockQuantized only as [rows, blocks]
    new = [helper.make_node("Reshape", [blocks, "embedding.rows"], ["embedding.blocks"]),  # [vocab, K*bits/8] uint8
           helper.make_node("Reshape", [scales, "embedding.scale_rows"], ["embedding.scales"]),
           helper.make_node("GatherBlockQuantized",
                            ["embedding.blocks", gather.input[1], "embedding.scales", *([zero_points] * bool(zero_points))],
                            list(gather.output), name=f"embedding_q{bits}", domain="com.microsoft", bits=bits,
                            block_size=block, gather_axis=0, quantize_axis=1)]
    return rebuild(graph, nodes, {id(gather): new}, set())


# ---- weights as placeholders -----------------------------------------------------------------------
# The traced graph does not carry the model's weight matrices: each is a placeholder initializer (shape,
# dtype, and where its values come from: checkpoint tensors, maybe transposed, maybe several side by
# side), read when the quantizer reaches it or when the graph is written. The exporter and ORT's
# quantizers would otherwise hold the fp32 model several times over (issue 15). A placeholder is an
# external-data tensor whose location names no file (lazy_location() + JSON): if one ever reached a
# saved model, ONNX Runtime would refuse it rather than run with wrong weights.
def lazy_location() -> str:
    return "edge-lazy-weight:"


def is_lazy(tensor) -> bool:
    return any(e.key == "location" and e.value.startswith(lazy_location()) for e in tensor.external_data)


def lazy_pieces(tensor) -> list[dict]:
    """The pieces of a placeholder, concatenated along axis 1: {"name": parameter, "t": transposed,
    and once bound (bind_weights) "file", "tensor": where the checkpoint holds it}."""
    location = next(e.value for e in tensor.external_data if e.key == "location")
    return json.loads(location[len(lazy_location()):])


def lazy_placeholder(name: str, dims, pieces: list[dict]):
    from onnx import TensorProto

    tensor = TensorProto(name=name, dims=list(dims), data_type=TensorProto.FLOAT,
                         data_location=TensorProto.EXTERNAL)
    tensor.external_data.add(key="location", value=lazy_location() + json.dumps(pieces))
    return tensor


def weight_array(tensor) -> np.ndarray:
    """The values of an initializer: its data, or a placeholder's, read from the checkpoint now."""
    from onnx import numpy_helper

    if not is_lazy(tensor):
        return numpy_helper.to_array(tensor)
    from edge.checkpoint import read_tensors

    parts = []
    for piece in lazy_pieces(tensor):
        if "file" not in piece:
            raise EdgeError(f"internal: weight placeholder {tensor.name} was never bound to a checkpoint")
        values = next(read_tensors(Path(piece["file"]), [piece["tensor"]]))[1].float().numpy()
        parts.append(np.ascontiguousarray(values.T) if piece["t"] else values)
    return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)


def materialize_weights(graph):
    """Give every placeholder left in the graph its values, one at a time, in place."""
    from onnx import numpy_helper

    for tensor in graph.graph.initializer:
        if is_lazy(tensor):
            tensor.CopyFrom(numpy_helper.from_array(weight_array(tensor), tensor.name))
    return graph


def bind_weights(graph, model_dir: Path) -> None:
    """Point every placeholder piece at the checkpoint file and tensor holding it. The graph names
    parameters as the exported module does (`model.` + the HybridLM name = the Hugging Face name); a
    tied lm_head is the embedding table."""
    from safetensors import safe_open

    from edge.checkpoint import weight_shards

    where = {}
    for shard in weight_shards(model_dir):
        with safe_open(model_dir / shard, framework="np") as f:
            where.update({name: str(model_dir / shard) for name in f.keys()})
    for tensor in graph.graph.initializer:
        if not is_lazy(tensor):
            continue
        pieces = lazy_pieces(tensor)
        for piece in pieces:
            name = piece["name"].removeprefix("model.")
            if name not in where and name == "lm_head.weight":
                name = "model.embed_tokens.weight"
            if name not in where:
                raise EdgeError(f"{model_dir} has no tensor {name}, which the exported graph reads")
            piece.update(file=where[name], tensor=name)
        location = next(e for e in tensor.external_data if e.key == "location")
        location.value = lazy_location() + json.dumps(pieces)


def optimize_with_lazy_weights(model, weight_names: set[str]):
    """torch.onnx.export's optimization (onnxscript's optimize_ir + onnx fusions) of the exported ir.Model,
    with the weights named in `weight_names` replaced by placeholders first, and without folding
    Transpose(weight) into a transposed copy (the exporter spells Linear so): the transposition is moved
    into the placeholder instead. Returns the ModelProto, holding no weight matrix."""
    import onnx_ir as ir
    import onnxscript.optimizer
    import onnxscript.rewriter.onnx_fusions

    for name, value in model.graph.initializers.items():
        tensor = value.const_value
        if name in weight_names and tensor is not None:
            value.const_value = ir.ExternalTensor(lazy_location() + json.dumps([{"name": name, "t": False}]),
                                                  None, None, tensor.dtype, shape=tensor.shape, name=name)

    def should_fold(node):
        lazy = any(v is not None and isinstance(v.const_value, ir.ExternalTensor)
                   and str(v.const_value.location).startswith(lazy_location()) for v in node.inputs)
        return False if lazy else None

    onnxscript.optimizer.optimize_ir(model, should_fold=should_fold)
    onnxscript.rewriter.onnx_fusions.fuse(model)
    return unfold_weight_transposes(ir.serde.serialize_model(model))


def unfold_weight_transposes(graph):
    """Transpose(placeholder) -> a placeholder of the transposed weight, under the Transpose's output name."""
    inits = {i.name: i for i in graph.graph.initializer}
    nodes = list(graph.graph.node)
    _, consumers = node_index(nodes)
    drop, new = set(), []
    for n in nodes:
        weight = inits.get(n.input[0]) if n.op_type == "Transpose" else None
        perm = [list(a.ints) for a in n.attribute if a.name == "perm"]
        if (weight is None or not is_lazy(weight) or len(weight.dims) != 2 or perm not in ([], [[1, 0]])
                or len(consumers[weight.name]) != 1):
            continue
        pieces = [{**p, "t": not p["t"]} for p in lazy_pieces(weight)]
        if len(pieces) != 1:
            continue
        new.append(lazy_placeholder(n.output[0], list(reversed(weight.dims)), pieces))
        drop.add(id(n))
    graph.graph.initializer.extend(new)
    return rebuild(graph, nodes, {}, drop)
