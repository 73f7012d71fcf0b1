// Row-sparse optimizer updates of the head (imi_softmax.optim): lazy Adam and FBGEMM's row-wise
// Adagrad, applied to the rows a step touched and to nothing else. One body per rule, called per
// element (Adam) or per row (Adagrad's row reduction, then per element) by the CPU launcher
// (csrc/cpu/row_optim_cpu.cpp) and the CUDA kernels (csrc/cuda/row_optim.cu).
//
// Arithmetic: weights are loaded to float, updated in float and rounded back to their storage type
// once per step (round to nearest even for bf16/fp16); optimizer state is float32. Every float
// operation is a single rounding written with fmul_rn/fadd_rn (never contracted into an FMA) and
// IEEE division / square root, so the CPU, the CUDA kernels and the pure-PyTorch fallback
// (imi_softmax/_fallback/optim.py, one torch op per rounding) agree bit for bit. The per-step
// coefficients are computed once in double on the host (make_adam_coef / make_adagrad_coef) and
// rounded to float.
#pragma once

#include <cmath>

#include "common.h"
#include "sampled_loss.h"  // acc_cast: storage -> float loads for every storage type

namespace imi {

// float -> storage type, round to nearest even (c10::BFloat16/c10::Half on the host do the same).
template <typename T> IMI_HD T round_from_float(float v) { return static_cast<T>(v); }
#if defined(__CUDACC__)
template <> IMI_HD __half round_from_float<__half>(float v) { return __float2half_rn(v); }
template <> IMI_HD __nv_bfloat16 round_from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
#endif

#if defined(__CUDA_ARCH__)
IMI_HD_FLATTEN float fdiv_rn(float a, float b) { return __fdiv_rn(a, b); }
IMI_HD_FLATTEN float fsqrt_rn(float a) { return __fsqrt_rn(a); }
#else
IMI_HD_FLATTEN float fdiv_rn(float a, float b) { return a / b; }
IMI_HD_FLATTEN float fsqrt_rn(float a) { return __builtin_sqrtf(a); }
#endif

// ---- lazy Adam ---------------------------------------------------------------------------------
// For a touched element with gradient g (global step t of the parameter, bc_k = 1 - beta_k^t):
//   m <- beta1 * m + (1 - beta1) * g
//   v <- beta2 * v + (1 - beta2) * g * g
//   w <- w * (1 - lr * weight_decay) - (lr / bc1) * m / (sqrt(v) * (1 / sqrt(bc2)) + eps)
// i.e. torch.optim.Adam's update (AdamW's decoupled decay) with its eps placement; untouched rows
// are not visited.
struct AdamCoef {
  float beta1, one_minus_beta1, beta2, one_minus_beta2;
  float step_size;     // lr / bc1
  float inv_sqrt_bc2;  // 1 / sqrt(bc2)
  float eps;
  float decay;         // 1 - lr * weight_decay (exactly 1 without decay)
};

inline AdamCoef make_adam_coef(double lr, double beta1, double beta2, double eps, double weight_decay,
                               int64_t step) {
  const double bc1 = 1.0 - std::pow(beta1, static_cast<double>(step));
  const double bc2 = 1.0 - std::pow(beta2, static_cast<double>(step));
  AdamCoef c;
  c.beta1 = static_cast<float>(beta1);
  c.one_minus_beta1 = static_cast<float>(1.0 - beta1);
  c.beta2 = static_cast<float>(beta2);
  c.one_minus_beta2 = static_cast<float>(1.0 - beta2);
  c.step_size = static_cast<float>(lr / bc1);
  c.inv_sqrt_bc2 = static_cast<float>(1.0 / std::sqrt(bc2));
  c.eps = static_cast<float>(eps);
  c.decay = static_cast<float>(1.0 - lr * weight_decay);
  return c;
}

// One element: w (float, already loaded), its moments m and v (in place), gradient g. Returns the
// new weight in float (the caller rounds it to the storage type).
IMI_HD_FLATTEN float adam_update(float w, float& m, float& v, float g, const AdamCoef& c) {
  const float m1 = fadd_rn(fmul_rn(c.beta1, m), fmul_rn(c.one_minus_beta1, g));
  const float v1 = fadd_rn(fmul_rn(c.beta2, v), fmul_rn(c.one_minus_beta2, fmul_rn(g, g)));
  m = m1;
  v = v1;
  const float denom = fadd_rn(fmul_rn(fsqrt_rn(v1), c.inv_sqrt_bc2), c.eps);
  return fsub_rn(fmul_rn(w, c.decay), fmul_rn(c.step_size, fdiv_rn(m1, denom)));
}

// ---- row-wise Adagrad (FBGEMM's EXACT_ROWWISE_ADAGRAD) -------------------------------------------
// For a touched row i with gradient row g_i (d entries):
//   G_i <- G_i + mean_j g_ij^2            (one float32 accumulator per row)
//   w_ij <- w_ij * (1 - lr * weight_decay) - (lr / (sqrt(G_i) + eps)) * g_ij
// The mean is summed in double from the exact float products g*g and divided by d in double, then
// rounded once to float: the result does not depend on the summation order (up to double rounding),
// so the CPU's vector sums, the CUDA warp sums and torch's reduction agree.
struct AdagradCoef {
  float lr, eps, decay;
};

inline AdagradCoef make_adagrad_coef(double lr, double eps, double weight_decay) {
  return {static_cast<float>(lr), static_cast<float>(eps), static_cast<float>(1.0 - lr * weight_decay)};
}

IMI_HD_FLATTEN double adagrad_square(float g) { return static_cast<double>(g) * static_cast<double>(g); }

// Adds the row's mean square (sum_sq: the sum of adagrad_square over its d entries) to its
// accumulator G (in place) and returns the row's multiplier lr / (sqrt(G) + eps).
IMI_HD_FLATTEN float adagrad_row(float& G, double sum_sq, int64_t d, const AdagradCoef& c) {
  const float mean = static_cast<float>(sum_sq / static_cast<double>(d));
  G = fadd_rn(G, mean);
  return fdiv_rn(c.lr, fadd_rn(fsqrt_rn(G), c.eps));
}

IMI_HD_FLATTEN float adagrad_update(float w, float g, float multiplier, const AdagradCoef& c) {
  return fsub_rn(fmul_rn(w, c.decay), fmul_rn(multiplier, g));
}

}  // namespace imi
