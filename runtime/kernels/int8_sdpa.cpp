// edge::int8_sdpa.out — causal grouped-query attention over an int8 KV cache, for ExecuTorch
// (and edge::int8_update_cache.out, which writes that cache; at the end of this file).
//
// Why our own kernel: ExecuTorch's llama::custom_quantized_sdpa computes Q·K with torchao's int8 matmul,
// which has NEON code only; on x86 it runs a scalar fallback, 5x slower than the fp32 custom_sdpa in
// prefill and 4.7x in decode (benchmarks/results/executorch_attention.json). This kernel reads the int8
// cache directly (value = int8 * scale, one fp32 scale per (position, kv head), symmetric) with loops the
// compiler vectorizes for the machine it is built on (runtime/et_kernels.py builds it with -march=native),
// so decode reads 4x fewer cache bytes than the fp32 cache and prefill stays GEMV-fast.
//
// Layouts (ExecuTorch's llama layout, see export/executorch.py):
//   q        float [1, T, H, D]            the new queries, positions start_pos .. start_pos+T-1
//   k_cache  int8  [1, S, KV, D]           already holds positions 0 .. start_pos+T-1 (update_cache ran)
//   v_cache  int8  [1, S, KV, D]
//   k_scales float [1, S, KV, 1]           (likewise v_scales)
//   out      float [1, T, H, D]
// Query head h reads kv head h / (H / KV) (GQA: K/V are never expanded).
#include <executorch/extension/kernel_util/make_boxed_from_unboxed_functor.h>
#include <executorch/runtime/kernel/kernel_includes.h>
#include <executorch/runtime/kernel/thread_parallel_interface.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

namespace edge_kernels {

using executorch::aten::Tensor;
using executorch::runtime::KernelRuntimeContext;

namespace {

constexpr int64_t kQueryBlock = 16;  // queries per prefill task: enough tasks for the threads, small scratch

// One query row against n cached positions of one kv head: position j's key is keys[j * row_stride .. + D),
// likewise its value. int8 rows (decode: the cache read in place, each row once) are scaled by
// key_scales / value_scales[j * scale_stride]; float rows (prefill) arrive already dequantized.
template <typename T>
inline void attend_row(const float* q, const T* keys, const T* values, const float* key_scales,
                       const float* value_scales, int64_t n, int64_t row_stride, int64_t scale_stride, int64_t D,
                       float sm_scale, float* scores, float* out) {
  constexpr bool kScaled = std::is_same<T, int8_t>::value;
  float max_score = -INFINITY;
  for (int64_t j = 0; j < n; ++j) {
    const T* k = keys + j * row_stride;
    float dot = 0.f;
    for (int64_t d = 0; d < D; ++d) dot += q[d] * static_cast<float>(k[d]);
    scores[j] = dot * (kScaled ? key_scales[j * scale_stride] : 1.f) * sm_scale;
    max_score = std::max(max_score, scores[j]);
  }
  float sum = 0.f;
  for (int64_t j = 0; j < n; ++j) {
    scores[j] = std::exp(scores[j] - max_score);
    sum += scores[j];
  }
  std::fill(out, out + D, 0.f);
  for (int64_t j = 0; j < n; ++j) {
    const float p = scores[j] / sum * (kScaled ? value_scales[j * scale_stride] : 1.f);
    const T* v = values + j * row_stride;
    for (int64_t d = 0; d < D; ++d) out[d] += p * static_cast<float>(v[d]);
  }
}

}  // namespace

Tensor& int8_sdpa_out(KernelRuntimeContext& ctx, const Tensor& q, const Tensor& k_cache, const Tensor& v_cache,
                      const Tensor& k_scales, const Tensor& v_scales, int64_t start_pos, Tensor& out) {
  ET_KERNEL_CHECK_MSG(ctx, q.dim() == 4 && k_cache.dim() == 4 && v_cache.dim() == 4, InvalidArgument, out,
                      "int8_sdpa: q and the caches must be 4-D [1, seq, heads, head_dim]");
  ET_KERNEL_CHECK_MSG(ctx, q.scalar_type() == executorch::aten::ScalarType::Float &&
                      k_cache.scalar_type() == executorch::aten::ScalarType::Char &&
                      v_cache.scalar_type() == executorch::aten::ScalarType::Char &&
                      k_scales.scalar_type() == executorch::aten::ScalarType::Float &&
                      v_scales.scalar_type() == executorch::aten::ScalarType::Float,
                      InvalidArgument, out, "int8_sdpa: q/scales must be float32 and the caches int8");
  const int64_t T = q.size(1), H = q.size(2), D = q.size(3);
  const int64_t S = k_cache.size(1), KV = k_cache.size(2);
  ET_KERNEL_CHECK_MSG(ctx, k_cache.size(3) == D && KV > 0 && H % KV == 0, InvalidArgument, out,
                      "int8_sdpa: head_dim mismatch or heads not a multiple of kv heads");
  ET_KERNEL_CHECK_MSG(ctx, start_pos >= 0 && start_pos + T <= S, InvalidArgument, out,
                      "int8_sdpa: start_pos + seq_len exceeds the cache length");
  ET_KERNEL_CHECK(ctx, executorch::runtime::resize_tensor(out, q.sizes()) == executorch::runtime::Error::Ok,
                  InvalidArgument, out);

  const float* qd = q.const_data_ptr<float>();
  const int8_t* kd = k_cache.const_data_ptr<int8_t>();
  const int8_t* vd = v_cache.const_data_ptr<int8_t>();
  const float* ksd = k_scales.const_data_ptr<float>();
  const float* vsd = v_scales.const_data_ptr<float>();
  float* od = out.mutable_data_ptr<float>();
  const int64_t group = H / KV, row_stride = KV * D;  // one cache position holds KV rows of D
  const float sm_scale = 1.0f / std::sqrt(static_cast<float>(D));

  if (T <= 4) {  // decode: one task per query head, int8 read in place
    executorch::extension::parallel_for(0, T * H, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> scores(start_pos + T);
      for (int64_t i = begin; i < end; ++i) {
        const int64_t t = i / H, h = i % H, g = h / group, n = start_pos + t + 1;
        attend_row(qd + (t * H + h) * D, kd + g * D, vd + g * D, ksd + g, vsd + g, n, row_stride, KV, D, sm_scale,
                   scores.data(), od + (t * H + h) * D);
      }
    });
    return out;
  }
  // prefill: one task per (kv head, block of queries); it dequantizes the K/V rows its block can see once
  // and serves all `group` query heads of that kv head from them
  const int64_t blocks = (T + kQueryBlock - 1) / kQueryBlock;
  executorch::extension::parallel_for(0, KV * blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> keys, values, scores(start_pos + T);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t g = task / blocks, t0 = (task % blocks) * kQueryBlock, t1 = std::min(T, t0 + kQueryBlock);
      const int64_t visible = start_pos + t1;
      keys.resize(visible * D);
      values.resize(visible * D);
      for (int64_t j = 0; j < visible; ++j) {
        const int8_t* k = kd + j * row_stride + g * D;
        const int8_t* v = vd + j * row_stride + g * D;
        const float ks = ksd[j * KV + g], vs = vsd[j * KV + g];
        for (int64_t d = 0; d < D; ++d) {
          keys[j * D + d] = ks * static_cast<float>(k[d]);
          values[j * D + d] = vs * static_cast<float>(v[d]);
        }
      }
      for (int64_t t = t0; t < t1; ++t) {
        for (int64_t h = g * group; h < (g + 1) * group; ++h) {
          attend_row<float>(qd + (t * H + h) * D, keys.data(), values.data(), nullptr, nullptr, start_pos + t + 1,
                            D, 0, D, sm_scale, scores.data(), od + (t * H + h) * D);
        }
      }
    }
  });
  return out;
}

// edge::int8_update_cache.out — quantize the new K or V rows and store them in the int8 cache in place:
// one op instead of ~8 portable ones (abs, amax, div, round, clamp, casts, two update_cache) per tensor.
//   value  float [1, T, KV, D] at positions start_pos .. start_pos+T-1
//   cache  int8  [1, S, KV, D]  <- round(value / scale), clamped to +-127
//   scales float [1, S, KV, 1]  <- max|value| over D / 127 (symmetric; at least 1e-10 / 127)
Tensor& int8_update_cache_out(KernelRuntimeContext& ctx, const Tensor& value, Tensor& cache, Tensor& scales,
                              int64_t start_pos, Tensor& out) {
  ET_KERNEL_CHECK_MSG(ctx, value.dim() == 4 && cache.dim() == 4 && scales.dim() == 4, InvalidArgument, out,
                      "int8_update_cache: value, cache and scales must be 4-D");
  ET_KERNEL_CHECK_MSG(ctx, value.scalar_type() == executorch::aten::ScalarType::Float &&
                      cache.scalar_type() == executorch::aten::ScalarType::Char &&
                      scales.scalar_type() == executorch::aten::ScalarType::Float,
                      InvalidArgument, out, "int8_update_cache: value/scales must be float32 and the cache int8");
  const int64_t T = value.size(1), KV = value.size(2), D = value.size(3), S = cache.size(1);
  ET_KERNEL_CHECK_MSG(ctx, cache.size(2) == KV && cache.size(3) == D && scales.size(1) == S &&
                      start_pos >= 0 && start_pos + T <= S, InvalidArgument, out,
                      "int8_update_cache: shape mismatch or start_pos + seq_len exceeds the cache length");
  const float* in = value.const_data_ptr<float>();
  int8_t* qd = cache.mutable_data_ptr<int8_t>() + start_pos * KV * D;
  float* sd = scales.mutable_data_ptr<float>() + start_pos * KV;
  for (int64_t row = 0; row < T * KV; ++row) {  // one row = one (position, kv head)
    const float* x = in + row * D;
    float absmax = 0.f;
    for (int64_t d = 0; d < D; ++d) absmax = std::max(absmax, std::fabs(x[d]));
    const float scale = std::max(absmax, 1e-10f) / 127.0f;
    for (int64_t d = 0; d < D; ++d) {
      qd[row * D + d] = static_cast<int8_t>(std::min(127.f, std::max(-127.f, std::nearbyint(x[d] / scale))));
    }
    sd[row] = scale;
  }
  return out;
}

}  // namespace edge_kernels

EXECUTORCH_LIBRARY(edge, "int8_sdpa.out", edge_kernels::int8_sdpa_out);
EXECUTORCH_LIBRARY(edge, "int8_update_cache.out", edge_kernels::int8_update_cache_out);
