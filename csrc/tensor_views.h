// Tensor -> raw-pointer views shared by the CPU and CUDA launch code (torch side only).
#pragma once

#include <ATen/ATen.h>
#include <optional>
#include <tuple>

#include "imi_softmax/proposal.h"

namespace imi_softmax {

template <typename T>
inline const T* optional_ptr(const std::optional<at::Tensor>& t) {
  return (t.has_value() && t->defined() && t->numel() > 0) ? t->data_ptr<T>() : nullptr;
}

// Every tensor must already be contiguous and on the executing device.
// The cell masses every proposal op needs; the sampling and log_prob parts are filled by the
// two helpers below.
inline imi::CellIndex make_cell_index(int64_t K, const at::Tensor& log_n, const at::Tensor& cell_mass,
                                      const at::Tensor& log_n_max) {
  imi::CellIndex ix{};
  ix.K = K;
  ix.log_n = log_n.data_ptr<float>();
  ix.cell_mass = cell_mass.data_ptr<float>();
  ix.log_n_max = log_n_max.data_ptr<float>();
  return ix;
}

inline void set_sampling_tables(imi::CellIndex& ix, const at::Tensor& offsets, const at::Tensor& class_ids,
                                const std::optional<at::Tensor>& alias_prob,
                                const std::optional<at::Tensor>& alias_pos,
                                const std::optional<at::Tensor>& beta_csr) {
  ix.offsets = offsets.data_ptr<int64_t>();
  ix.class_ids = class_ids.data_ptr<int64_t>();
  ix.alias_prob = optional_ptr<float>(alias_prob);
  ix.alias_pos = optional_ptr<int64_t>(alias_pos);
  ix.beta_csr = optional_ptr<float>(beta_csr);
  TORCH_CHECK((ix.alias_prob == nullptr) == (ix.alias_pos == nullptr) &&
                  (ix.alias_prob == nullptr) == (ix.beta_csr == nullptr),
              "imi_softmax: alias_prob, alias_pos and beta_csr must be given together");
}

inline void set_class_codes(imi::CellIndex& ix, const std::optional<at::Tensor>& beta,
                            const at::Tensor& code1, const at::Tensor& code2) {
  ix.beta = optional_ptr<float>(beta);
  ix.code1 = code1.data_ptr<int64_t>();
  ix.code2 = code2.data_ptr<int64_t>();
}

// Schema-level checks shared by the backends (Python validates user input before this; these
// guard direct calls to torch.ops.imi_softmax.*).
inline void check_cell_masses(int64_t K, const at::Tensor& log_n, const at::Tensor& cell_mass,
                              const at::Tensor& log_n_max) {
  TORCH_CHECK(log_n.numel() == K * K && cell_mass.numel() == K * K,
              "imi_softmax: log_n and cell_mass must have K*K = ", K * K, " entries");
  TORCH_CHECK(log_n.scalar_type() == at::kFloat && cell_mass.scalar_type() == at::kFloat &&
                  log_n_max.scalar_type() == at::kFloat && log_n_max.numel() == 1,
              "imi_softmax: index masses must be float32");
  TORCH_CHECK(log_n.is_contiguous() && cell_mass.is_contiguous(), "imi_softmax: index masses must be contiguous");
}

inline void check_codes(const at::Tensor& code1, const at::Tensor& code2) {
  TORCH_CHECK(code1.scalar_type() == at::kLong && code2.scalar_type() == at::kLong &&
                  code1.numel() == code2.numel() && code1.is_contiguous() && code2.is_contiguous(),
              "imi_softmax: code1/code2 must be contiguous int64 of equal length");
}

inline void check_assign_inputs(const at::Tensor& x, const at::Tensor& centroids) {
  TORCH_CHECK(x.dim() == 2 && centroids.dim() == 2 && x.size(1) == centroids.size(1),
              "assign_codewords: x [N, d] and centroids [K, d] expected, got ", x.sizes(), " and ",
              centroids.sizes());
  TORCH_CHECK(x.scalar_type() == centroids.scalar_type(), "assign_codewords: x and centroids dtypes differ");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "assign_codewords: float32 or float64 expected, got ", x.scalar_type());
  TORCH_CHECK(centroids.size(0) > 0, "assign_codewords: no centroids");
}

inline void check_query_scores(const at::Tensor& s1, const at::Tensor& s2) {
  TORCH_CHECK(s1.dim() == 2 && s2.dim() == 2 && s1.sizes() == s2.sizes(),
              "imi_softmax: s1 and s2 must both be [B, K], got ", s1.sizes(), " and ", s2.sizes());
  TORCH_CHECK(s1.scalar_type() == at::kFloat && s2.scalar_type() == at::kFloat,
              "imi_softmax: query scores must be float32");
}

// Accumulation dtype of the loss ops: float64 for float64 inputs, float32 otherwise.
inline at::ScalarType acc_scalar_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_loss_inputs(const at::Tensor& x, const at::Tensor& weight,
                              const std::optional<at::Tensor>& bias, const at::Tensor& ids,
                              const at::Tensor& log_q) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(1),
              "imi_softmax: x [B, d] and weight [N, d] expected, got ", x.sizes(), " and ",
              weight.sizes());
  TORCH_CHECK(x.scalar_type() == weight.scalar_type(), "imi_softmax: x and weight dtypes differ");
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0) &&
                    bias->scalar_type() == weight.scalar_type(),
                "imi_softmax: bias must be [N] with weight's dtype");
  }
  TORCH_CHECK(ids.dim() == 2 && ids.size(0) == x.size(0) && ids.scalar_type() == at::kLong,
              "imi_softmax: ids must be int64 [B, 1+M]");
  TORCH_CHECK(log_q.sizes() == ids.sizes(), "imi_softmax: log_q must match ids' shape");
  const auto acc = acc_scalar_type(x.scalar_type());
  TORCH_CHECK(log_q.scalar_type() == acc, "imi_softmax: log_q must be ", acc, " for x of ",
              x.scalar_type());
}

// dense_weight_grad / sparse_weight_grad: checks coef [B, 1+M] (in the accumulation dtype of x),
// ids [B, 1+M] int64, x [B, d] and num_classes; returns (coef, ids, x) contiguous.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> weight_grad_inputs(
    const char* op, const at::Tensor& coef, const at::Tensor& ids, const at::Tensor& x,
    int64_t num_classes) {
  TORCH_CHECK(ids.dim() == 2 && coef.sizes() == ids.sizes() && ids.scalar_type() == at::kLong,
              op, ": coef and ids must be [B, 1+M], ids int64");
  TORCH_CHECK(x.dim() == 2 && x.size(0) == ids.size(0), op, ": x must be [B, d]");
  TORCH_CHECK(coef.scalar_type() == acc_scalar_type(x.scalar_type()),
              op, ": coef dtype must be the accumulation dtype of x");
  TORCH_CHECK(num_classes >= 0, op, ": num_classes must be >= 0, got ", num_classes);
  return {coef.contiguous(), ids.contiguous(), x.contiguous()};
}

}  // namespace imi_softmax
