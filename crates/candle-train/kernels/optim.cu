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
