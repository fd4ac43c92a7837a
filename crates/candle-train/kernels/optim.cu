// Fused optimizer steps for candle-fit's device-resident updater (crate candle-train, feature
// `cuda`, compiled to PTX by build.rs and loaded through Candle's custom-function loading).
//
// Each element's parameter, gradient and state are read once and written once. The arithmetic
// is the flat-slice CPU kernels' (src/optim/adamw.rs, src/optim/sgd.rs), operation for
// operation, with explicit round-to-nearest intrinsics so that nvcc cannot contract or
// reassociate anything: given IEEE division and square root (the intrinsics below are), a
// step is bit-equal to the CPU path, which is bit-equal to torch's single-tensor AdamW / SGD.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

// AdamW: p *= decay_factor; m = fma(w, g - m, m); v = fma((1 - beta2) * g, g, v * beta2);
// denom = sqrt(v) / bias_correction2_sqrt + eps; p += (neg_step_size * m) / denom.
template <typename OUT>
__device__ __forceinline__ void adamw_body(
    const size_t n, float *p, const float *g, float *m, float *v, OUT *out,
    const float decay_factor, const float lerp_weight, const float beta2,
    const float one_minus_beta2, const float bias_correction2_sqrt, const float eps,
    const float neg_step_size) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
       i += (size_t)blockDim.x * gridDim.x) {
    const float gi = g[i];
    const float mi0 = m[i];
    float pi = __fmul_rn(p[i], decay_factor);
    const float mi = __fmaf_rn(lerp_weight, __fsub_rn(gi, mi0), mi0);
    const float vi = __fmaf_rn(__fmul_rn(one_minus_beta2, gi), gi, __fmul_rn(v[i], beta2));
    const float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(vi), bias_correction2_sqrt), eps);
    pi = __fadd_rn(pi, __fdiv_rn(__fmul_rn(neg_step_size, mi), denom));
    p[i] = pi;
    m[i] = mi;
    v[i] = vi;
    if (out != nullptr) {
      out[i] = OUT(pi);
    }
  }
}

#define ADAMW(NAME, OUT)                                                                   \
  extern "C" __global__ void NAME(                                                         \
      const size_t n, float *p, const float *g, float *m, float *v, OUT *out,              \
      const float decay_factor, const float lerp_weight, const float beta2,                \
      const float one_minus_beta2, const float bias_correction2_sqrt, const float eps,     \
      const float neg_step_size) {                                                         \
    adamw_body<OUT>(n, p, g, m, v, out, decay_factor, lerp_weight, beta2, one_minus_beta2, \
                    bias_correction2_sqrt, eps, neg_step_size);                            \
  }

// `out`, when not null, receives the new FP32 value rounded to the parameter's half type
// (round to nearest even, as Candle's `to_dtype`): the master weight and the model's copy in
// one pass.
ADAMW(candle_fit_adamw_f32, float)
ADAMW(candle_fit_adamw_bf16, __nv_bfloat16)
ADAMW(candle_fit_adamw_f16, __half)

// SGD (torch's rule): d = wd != 0 ? fma(p, wd, g) : g; with momentum, b = first ? d :
// fma(d, keep, b * momentum), step = nesterov ? fma(b, momentum, d) : b; p = fma(step, -lr, p).
template <typename OUT>
__device__ __forceinline__ void sgd_body(const size_t n, float *p, const float *g, float *buf,
                                         OUT *out, const float weight_decay, const float neg_lr,
                                         const float momentum, const float keep,
                                         const int32_t nesterov, const int32_t first) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
       i += (size_t)blockDim.x * gridDim.x) {
    const float pi = p[i];
    const float gi = g[i];
    const float d = weight_decay != 0.0f ? __fmaf_rn(pi, weight_decay, gi) : gi;
    float step = d;
    if (buf != nullptr) {
      const float b = first ? d : __fmaf_rn(d, keep, __fmul_rn(buf[i], momentum));
      buf[i] = b;
      step = nesterov ? __fmaf_rn(b, momentum, d) : b;
    }
    const float np = __fmaf_rn(step, neg_lr, pi);
    p[i] = np;
    if (out != nullptr) {
      out[i] = OUT(np);
    }
  }
}

#define SGD(NAME, OUT)                                                                         \
  extern "C" __global__ void NAME(const size_t n, float *p, const float *g, float *buf,        \
                                  OUT *out, const float weight_decay, const float neg_lr,      \
                                  const float momentum, const float keep,                      \
                                  const int32_t nesterov, const int32_t first) {               \
    sgd_body<OUT>(n, p, g, buf, out, weight_decay, neg_lr, momentum, keep, nesterov, first);  \
  }

SGD(candle_fit_sgd_f32, float)
SGD(candle_fit_sgd_bf16, __nv_bfloat16)
SGD(candle_fit_sgd_f16, __half)

// 8-bit AdamW (src/optim/adamw8bit.rs and src/optim/quant.rs): both moments stored blockwise,
// one byte per value (an index into a sorted 256-value code) and one FP32 scale per block of
// 2048 values. One CUDA block per quantization block (grid-stride over blocks): dequantize
// (code * scale), the AdamW element step above, then the block's new absolute maxima and
// requantization to the nearest code value (ties to the smaller index), exactly as the CPU.
#define Q_BLOCK 2048
#define Q_THREADS 256

// How many of the 256 sorted `values` are below `x` (a partition point; 0 for NaN).
__device__ __forceinline__ int below(const float *values, const float x) {
  int lo = 0, hi = 256;
  while (lo < hi) {
    const int mid = (lo + hi) >> 1;
    if (values[mid] < x) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return lo;
}

__device__ __forceinline__ uint8_t nearest(const float *values, const float x) {
  const int hi = min(below(values, x), 255);
  const int lo = hi > 0 ? hi - 1 : 0;
  return (uint8_t)(fabsf(__fsub_rn(x, values[lo])) <= fabsf(__fsub_rn(values[hi], x)) ? lo : hi);
}

template <typename OUT>
__device__ __forceinline__ void adamw8bit_body(
    const size_t n, float *p, const float *g, uint8_t *m_codes, float *m_scales, uint8_t *v_codes,
    float *v_scales, const float *signed_code, const float *unsigned_code, OUT *out,
    const float decay_factor, const float lerp_weight, const float beta2,
    const float one_minus_beta2, const float bias_correction2_sqrt, const float eps,
    const float neg_step_size) {
  __shared__ float mb[Q_BLOCK];
  __shared__ float vb[Q_BLOCK];
  __shared__ float s_code[256];
  __shared__ float u_code[256];
  __shared__ float m_max[Q_THREADS];
  __shared__ float v_max[Q_THREADS];
  const int t = threadIdx.x;
  for (int i = t; i < 256; i += blockDim.x) {
    s_code[i] = signed_code[i];
    u_code[i] = unsigned_code[i];
  }
  __syncthreads();
  for (size_t b = blockIdx.x; b * Q_BLOCK < n; b += gridDim.x) {
    const size_t at = b * Q_BLOCK;
    const int len = (int)min((size_t)Q_BLOCK, n - at);
    const float m_scale = m_scales[b];
    const float v_scale = v_scales[b];
    float mm = 0.0f, vm = 0.0f;
    for (int i = t; i < len; i += blockDim.x) {
      const size_t k = at + i;
      const float gi = g[k];
      const float mi0 = __fmul_rn(s_code[m_codes[k]], m_scale);
      const float vi0 = __fmul_rn(u_code[v_codes[k]], v_scale);
      float pi = __fmul_rn(p[k], decay_factor);
      const float mi = __fmaf_rn(lerp_weight, __fsub_rn(gi, mi0), mi0);
      const float vi = __fmaf_rn(__fmul_rn(one_minus_beta2, gi), gi, __fmul_rn(vi0, beta2));
      const float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(vi), bias_correction2_sqrt), eps);
      pi = __fadd_rn(pi, __fdiv_rn(__fmul_rn(neg_step_size, mi), denom));
      p[k] = pi;
      if (out != nullptr) {
        out[k] = OUT(pi);
      }
      mb[i] = mi;
      vb[i] = vi;
      mm = fmaxf(mm, fabsf(mi));
      vm = fmaxf(vm, fabsf(vi));
    }
    m_max[t] = mm;
    v_max[t] = vm;
    __syncthreads();
    for (int s = Q_THREADS / 2; s > 0; s >>= 1) {
      if (t < s) {
        m_max[t] = fmaxf(m_max[t], m_max[t + s]);
        v_max[t] = fmaxf(v_max[t], v_max[t + s]);
      }
      __syncthreads();
    }
    const float m_abs = m_max[0];
    const float v_abs = v_max[0];
    const float m_inv = m_abs > 0.0f ? __fdiv_rn(1.0f, m_abs) : 0.0f;
    const float v_inv = v_abs > 0.0f ? __fdiv_rn(1.0f, v_abs) : 0.0f;
    for (int i = t; i < len; i += blockDim.x) {
      m_codes[at + i] = nearest(s_code, __fmul_rn(mb[i], m_inv));
      v_codes[at + i] = nearest(u_code, __fmul_rn(vb[i], v_inv));
    }
    if (t == 0) {
      m_scales[b] = m_abs;
      v_scales[b] = v_abs;
    }
    // The shared buffers are reused by the next block.
    __syncthreads();
  }
}

#define ADAMW8BIT(NAME, OUT)                                                                     \
  extern "C" __global__ void __launch_bounds__(Q_THREADS) NAME(                                  \
      const size_t n, float *p, const float *g, uint8_t *m_codes, float *m_scales,               \
      uint8_t *v_codes, float *v_scales, const float *signed_code, const float *unsigned_code,   \
      OUT *out, const float decay_factor, const float lerp_weight, const float beta2,            \
      const float one_minus_beta2, const float bias_correction2_sqrt, const float eps,           \
      const float neg_step_size) {                                                               \
    adamw8bit_body<OUT>(n, p, g, m_codes, m_scales, v_codes, v_scales, signed_code,              \
                        unsigned_code, out, decay_factor, lerp_weight, beta2, one_minus_beta2,   \
                        bias_correction2_sqrt, eps, neg_step_size);                              \
  }

ADAMW8BIT(candle_fit_adamw8bit_f32, float)
ADAMW8BIT(candle_fit_adamw8bit_bf16, __nv_bfloat16)
ADAMW8BIT(candle_fit_adamw8bit_f16, __half)
