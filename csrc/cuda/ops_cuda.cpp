// CUDA backend of the imi_softmax ops: argument checks (tensor_views.h, shared with the CPU
// backend), allocation (torch's caching allocator, scratch included), device guard and current
// stream; the kernels live in csrc/cuda/*.cu behind the launchers of launchers.h.
// Host synchronisations, each one device->host read: the output shape of sparse_weight_grad; the
// index checks, which raise instead of reading out of bounds: the code range of build_cells, the
// CSR offsets of midx_sample (O(K^2)), the ids and their codes of midx_log_prob (O(B*L)), and the
// bad-id flag the loss and weight-gradient kernels set at use (one read per call).
//
// Environment switches (read at every call):
//   IMI_CUDA_WGRAD=segmented|atomic  dense_weight_grad strategy (default segmented: deterministic)
//   IMI_CUDA_STAGE2=auto|table|stream  midx_sample stage-2 rows: K x K table in shared memory
//                                      (auto: when it fits) or recomputed per draw
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAGeneratorImpl.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <climits>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <mutex>
#include <optional>
#include <string>
#include <type_traits>

#include "../tensor_views.h"
#include "launchers.h"

namespace imi_softmax {
namespace {

// ---- helpers -----------------------------------------------------------------------------------

// torch storage type -> CUDA type of the kernels (same size and bit layout).
template <typename T> struct CudaType { using type = T; };
template <> struct CudaType<at::Half> { using type = __half; };
template <> struct CudaType<at::BFloat16> { using type = __nv_bfloat16; };
static_assert(sizeof(at::Half) == sizeof(__half) && sizeof(at::BFloat16) == sizeof(__nv_bfloat16),
              "half types must match in size");

template <typename scalar_t>
const typename CudaType<scalar_t>::type* cptr(const at::Tensor& t) {
  return reinterpret_cast<const typename CudaType<scalar_t>::type*>(t.data_ptr<scalar_t>());
}
template <typename scalar_t>
typename CudaType<scalar_t>::type* mptr(const at::Tensor& t) {
  return reinterpret_cast<typename CudaType<scalar_t>::type*>(t.data_ptr<scalar_t>());
}
template <typename scalar_t>
const typename CudaType<scalar_t>::type* cptr_or_null(const at::Tensor& t) {
  return t.defined() ? cptr<scalar_t>(t) : nullptr;
}

std::optional<at::Tensor> contiguous_opt(const std::optional<at::Tensor>& t) {
  if (!t.has_value() || !t->defined()) return std::nullopt;
  return t->contiguous();
}

// cub treats a null scratch pointer as a size query: always hand it a real allocation.
at::Tensor scratch_bytes(size_t bytes, const at::TensorOptions& like) {
  return at::empty({static_cast<int64_t>(bytes > 0 ? bytes : 16)}, like.dtype(at::kByte));
}

int stage2_mode_from_env() {
  const char* v = std::getenv("IMI_CUDA_STAGE2");
  if (v == nullptr || *v == '\0' || std::strcmp(v, "auto") == 0) return 0;
  if (std::strcmp(v, "table") == 0) return 1;
  if (std::strcmp(v, "stream") == 0) return 2;
  TORCH_CHECK(false, "IMI_CUDA_STAGE2 must be auto, table or stream, got '", v, "'");
}

bool wgrad_atomic_from_env() {
  const char* v = std::getenv("IMI_CUDA_WGRAD");
  if (v == nullptr || *v == '\0' || std::strcmp(v, "segmented") == 0) return false;
  if (std::strcmp(v, "atomic") == 0) return true;
  TORCH_CHECK(false, "IMI_CUDA_WGRAD must be segmented or atomic, got '", v, "'");
}

// ---- assign_codewords --------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor> assign_codewords_cuda(const at::Tensor& x_in,
                                                         const at::Tensor& centroids_in) {
  check_assign_inputs(x_in, centroids_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const auto x = x_in.contiguous();
  const auto centroids = centroids_in.contiguous();
  const int64_t N = x.size(0), K = centroids.size(0);
  auto codes = at::empty({N}, x.options().dtype(at::kLong));
  auto sqdist = at::empty({N}, x.options());
  const auto c_sqnorm = centroids.mul(centroids).sum(1).contiguous();
  // Bound the dots buffer (~64 MB of fp32) whatever N is; chunks reuse the cached block.
  const int64_t chunk = std::max<int64_t>(1, (int64_t(1) << 24) / K);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "assign_codewords_cuda", [&] {
    for (int64_t start = 0; start < N; start += chunk) {
      const int64_t len = std::min(chunk, N - start);
      const auto xs = x.narrow(0, start, len);
      const auto dots = at::matmul(xs, centroids.t()).contiguous();  // cuBLAS
      const auto x_sqnorm = xs.mul(xs).sum(1).contiguous();
      C10_CUDA_CHECK(cuda::launch_nearest_codeword<scalar_t>(
          dots.data_ptr<scalar_t>(), c_sqnorm.data_ptr<scalar_t>(), x_sqnorm.data_ptr<scalar_t>(),
          len, K, codes.data_ptr<int64_t>() + start, sqdist.data_ptr<scalar_t>() + start, stream));
    }
  });
  return {codes, sqdist};
}

// ---- assign_rows -------------------------------------------------------------------------------

// The gather, widening and residual as ATen ops around assign_codewords: on the GPU these are
// single launches, not the regions split per thread that the CPU kernel avoids.
std::tuple<at::Tensor, at::Tensor, at::Tensor> assign_rows_cuda(const at::Tensor& weight, const at::Tensor& rows,
                                                                const at::Tensor& codebook1,
                                                                const at::Tensor& codebook2, bool residual) {
  check_assign_rows_inputs(weight, rows, codebook1, codebook2, residual);
  const c10::cuda::CUDAGuard guard(weight.device());
  const int64_t N = weight.size(0);
  if (rows.numel() > 0) {  // one device->host read of the extremes before anything indexes with them
    const auto extremes = at::stack({rows.min(), rows.max()}).cpu();
    const int64_t lo = extremes[0].item<int64_t>(), hi = extremes[1].item<int64_t>();
    if (lo < 0 || hi >= N) {
      const int64_t at = ((rows < 0) | (rows >= N)).nonzero()[0][0].item<int64_t>();
      check_no_bad_position("assign_rows", "rows", at, rows, "[0, " + std::to_string(N) + ")");
    }
  }
  const auto x = weight.index_select(0, rows).to(at::kFloat);
  const auto finite = at::isfinite(x.mul(x).sum(1)).all();
  at::Tensor code1, code2;
  if (residual) {
    code1 = std::get<0>(assign_codewords_cuda(x, codebook1));
    code2 = std::get<0>(assign_codewords_cuda(x - codebook1.contiguous().index_select(0, code1), codebook2));
  } else {
    const int64_t h = codebook1.size(1);
    code1 = std::get<0>(assign_codewords_cuda(x.narrow(1, 0, h), codebook1));
    code2 = std::get<0>(assign_codewords_cuda(x.narrow(1, h, x.size(1) - h), codebook2));
  }
  return {code1.to(at::kInt), code2.to(at::kInt), finite};
}

// ---- build_cells -------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
           at::Tensor>
build_cells_cuda(const at::Tensor& code1_in, const at::Tensor& code2_in,
                 const std::optional<at::Tensor>& beta_in, int64_t K) {
  at::Tensor code1, code2, beta;
  std::tie(code1, code2, beta) = build_cells_inputs(code1_in, code2_in, beta_in, K);
  const bool has_beta = beta.defined();
  const c10::cuda::CUDAGuard guard(code1_in.device());
  const int64_t N = code1.size(0), KK = K * K;
  if (N > 0) {
    // One small device->host copy: out-of-range codes would index past the cell arrays. Index
    // builds are not on the training hot path.
    const auto range = at::stack({code1.min(), code1.max(), code2.min(), code2.max()}).to(at::kLong).cpu();
    const int64_t* r = range.data_ptr<int64_t>();
    TORCH_CHECK(r[0] >= 0 && r[1] < K && r[2] >= 0 && r[3] < K, "build_cells: codes ", code_range_error(K),
                ": code1 in [", r[0], ", ", r[1], "] and code2 in [", r[2], ", ", r[3], "]");
  }
  const auto long_opts = code1.options().dtype(at::kLong);
  const auto int_opts = code1.options().dtype(at::kInt);
  const auto float_opts = code1.options().dtype(at::kFloat);
  auto offsets = at::empty({KK + 1}, long_opts);
  auto class_ids = at::empty({N}, int_opts);
  const int64_t per_class = has_beta ? N : 0;
  auto alias_prob = at::empty({per_class}, float_opts);
  auto alias_pos = at::empty({per_class}, int_opts);
  auto beta_csr = at::empty({per_class}, float_opts);
  auto alias_scratch = at::empty({per_class}, int_opts);
  auto log_n = at::empty({K, K}, float_opts);
  auto keys_in = at::empty({N}, int_opts);
  auto keys_out = at::empty({N}, int_opts);
  auto vals_in = at::empty({N}, int_opts);
  auto counts = at::empty({KK}, long_opts);
  cudaError_t err = cudaSuccess;
  const size_t temp_bytes = cuda::build_cells_temp_bytes(N, KK, &err);
  C10_CUDA_CHECK(err);
  auto temp = scratch_bytes(temp_bytes, long_opts);
  C10_CUDA_CHECK(cuda::launch_build_cells(
      code1.data_ptr<int32_t>(), code2.data_ptr<int32_t>(),
      has_beta ? beta.data_ptr<float>() : nullptr, N, K, keys_in.data_ptr<int32_t>(),
      keys_out.data_ptr<int32_t>(), vals_in.data_ptr<int32_t>(), counts.data_ptr<int64_t>(),
      temp.data_ptr(), static_cast<size_t>(temp.numel()), offsets.data_ptr<int64_t>(),
      class_ids.data_ptr<int32_t>(), has_beta ? alias_prob.data_ptr<float>() : nullptr,
      has_beta ? alias_pos.data_ptr<int32_t>() : nullptr,
      has_beta ? beta_csr.data_ptr<float>() : nullptr,
      has_beta ? alias_scratch.data_ptr<int32_t>() : nullptr, log_n.data_ptr<float>(),
      at::cuda::getCurrentCUDAStream()));
  // Same formulas as the CPU backend: finite max (empty cells are -inf), scaled masses in float64.
  auto log_n_max = log_n.masked_fill(log_n.isneginf(), -FLT_MAX).max().reshape({1});
  auto cell_mass = at::empty({K, K}, float_opts);
  C10_CUDA_CHECK(cuda::launch_cell_scaled_mass(
      offsets.data_ptr<int64_t>(), has_beta ? beta_csr.data_ptr<float>() : nullptr,
      log_n_max.data_ptr<float>(), KK, cell_mass.data_ptr<float>(), at::cuda::getCurrentCUDAStream()));
  return {offsets, class_ids, alias_prob, alias_pos, beta_csr, log_n, cell_mass, log_n_max};
}

// ---- update_cells ------------------------------------------------------------------------------

// On the GPU the cells are rebuilt from the updated codes by build_cells' kernels (a device radix
// sort is O(N) and fast there), which is the result the CPU's in-place cell update must equal.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
           at::Tensor, at::Tensor, at::Tensor>
update_cells_cuda(const at::Tensor& offsets, const at::Tensor& class_ids,
                  const std::optional<at::Tensor>& alias_prob, const std::optional<at::Tensor>& alias_pos,
                  const std::optional<at::Tensor>& beta_csr, const at::Tensor& log_n, const at::Tensor& cell_mass,
                  const at::Tensor& log_n_max, const at::Tensor& code1, const at::Tensor& code2,
                  const std::optional<at::Tensor>& beta, const at::Tensor& changed, const at::Tensor& new_code1,
                  const at::Tensor& new_code2, const std::optional<at::Tensor>& new_beta, int64_t K) {
  const bool has_beta = update_cells_inputs("update_cells", K, offsets, class_ids, alias_prob, alias_pos, beta_csr,
                                            log_n, cell_mass, log_n_max, code1, code2, beta, changed, new_code1,
                                            new_code2, new_beta);
  const c10::cuda::CUDAGuard guard(code1.device());
  const int64_t N = code1.numel(), C = changed.numel();
  if (C > 0) {
    // One small device->host copy of the verdicts: the ids are scattered into [N] arrays.
    const auto order_bad = C > 1 ? changed.narrow(0, 1, C - 1).le(changed.narrow(0, 0, C - 1)).any()
                                 : at::zeros({}, changed.options().dtype(at::kBool));
    const auto r = at::stack({changed.min(), changed.max(), new_code1.min().to(at::kLong),
                              new_code1.max().to(at::kLong), new_code2.min().to(at::kLong),
                              new_code2.max().to(at::kLong), order_bad.to(at::kLong)}).cpu();
    const int64_t* v = r.data_ptr<int64_t>();
    TORCH_CHECK(v[0] >= 0 && v[1] < N, "update_cells: changed holds ids in [", v[0], ", ", v[1],
                "], outside the class ids [0, ", N, ")");
    TORCH_CHECK(v[6] == 0, "update_cells: changed must be strictly ascending (sorted, no repeats; use torch.unique)");
    TORCH_CHECK(v[2] >= 0 && v[3] < K && v[4] >= 0 && v[5] < K, "update_cells: new codes ", code_range_error(K),
                ": new_code1 in [", v[2], ", ", v[3], "] and new_code2 in [", v[4], ", ", v[5], "]");
  }
  auto out_code1 = code1.clone().index_copy_(0, changed, new_code1);
  auto out_code2 = code2.clone().index_copy_(0, changed, new_code2);
  auto out_beta = has_beta ? beta->clone().index_copy_(0, changed, *new_beta)
                           : at::empty({0}, code1.options().dtype(at::kFloat));
  auto cells = build_cells_cuda(out_code1, out_code2,
                                has_beta ? std::optional<at::Tensor>(out_beta) : std::nullopt, K);
  return {out_code1,
          out_code2,
          out_beta,
          std::get<0>(cells),
          std::get<1>(cells),
          std::get<2>(cells),
          std::get<3>(cells),
          std::get<4>(cells),
          std::get<5>(cells),
          std::get<6>(cells),
          std::get<7>(cells)};
}

// ---- midx_sample / midx_sample_seeded / midx_log_prob ------------------------------------------

// K codewords fit the sampling kernels' shared memory on this GPU (a readable error instead of the
// launch's "invalid argument"). The opt-in limit is 227 KiB on an H100 (K <= 11,609), 163 KiB on an
// A100 (8,332: above kMaxCodewords either way), 99 KiB on sm_86 / sm_89 (5,056).
void check_codewords_fit(const char* op, int64_t K) {
  int64_t most = 0;
  C10_CUDA_CHECK(cuda::midx_max_codewords(&most));
  TORCH_CHECK(K <= most, op, ": num_codewords K = ", K, " is more than this GPU's shared memory holds for a query's ",
              "scores (at most ", most, " codewords here): rebuild the index with num_codewords <= ", most);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> midx_sample_impl(
    const at::Tensor& s1_in, const at::Tensor& s2_in, const at::Tensor& log_n_in,
    const at::Tensor& cell_mass_in, const at::Tensor& log_n_max_in, const at::Tensor& offsets_in,
    const at::Tensor& class_ids_in, const std::optional<at::Tensor>& alias_prob_in,
    const std::optional<at::Tensor>& alias_pos_in, const std::optional<at::Tensor>& beta_csr_in,
    int64_t num_samples, const std::optional<cuda::PhiloxArgs>& fixed,
    const std::optional<at::Generator>& generator, const std::optional<at::Tensor>& targets_in,
    const std::optional<at::Tensor>& beta_in, const std::optional<at::Tensor>& code1_in,
    const std::optional<at::Tensor>& code2_in) {
  check_query_scores(s1_in, s2_in);
  const int64_t B = s1_in.size(0), M = num_samples;
  check_num_samples(M);
  const auto log_n = log_n_in.contiguous();
  const auto cell_mass = cell_mass_in.contiguous();
  check_same_device("midx_sample",
                    {named("s1", s1_in), named("s2", s2_in), named("log_n", log_n_in),
                     named("cell_mass", cell_mass_in), named("log_n_max", log_n_max_in),
                     named("offsets", offsets_in), named("class_ids", class_ids_in),
                     named("alias_prob", alias_prob_in), named("alias_pos", alias_pos_in),
                     named("beta_csr", beta_csr_in), named("targets", targets_in),
                     named("beta", beta_in), named("code1", code1_in), named("code2", code2_in)});
  const c10::cuda::CUDAGuard guard(s1_in.device());
  const auto s1 = s1_in.contiguous();
  const auto s2 = s2_in.contiguous();
  check_finite_scores("midx_sample", s1, s2);  // as the CPU op, which checks in its loop
  check_codewords_fit("midx_sample", s1.size(1));
  const auto log_n_max = log_n_max_in.contiguous();
  const auto offsets = offsets_in.contiguous();
  const auto class_ids = class_ids_in.contiguous();
  const auto alias_prob = contiguous_opt(alias_prob_in);
  const auto alias_pos = contiguous_opt(alias_pos_in);
  const auto beta_csr = contiguous_opt(beta_csr_in);
  const SampleCall c = midx_sample_call(s1, M, log_n, cell_mass, log_n_max, offsets, class_ids, alias_prob, alias_pos,
                                        beta_csr, targets_in, beta_in, code1_in, code2_in);
  const imi::CellIndex& ix = c.ix;
  const SampleTargets& tg = c.tg;
  const bool has_targets = tg.present;
  const int64_t L = tg.L, N = tg.N;
  const at::Tensor &ids = c.ids, &log_q = c.log_q, &target_log_q = c.target_log_q;
  const int stage2_mode = stage2_mode_from_env();

  cuda::PhiloxArgs philox;
  if (fixed.has_value()) {
    philox = *fixed;
  } else {
    auto* gen = at::get_generator_or_default<at::CUDAGeneratorImpl>(
        generator, at::cuda::detail::getDefaultCUDAGenerator());
    at::PhiloxCudaState state;
    {
      std::lock_guard<std::mutex> lock(gen->mutex_);
      // The increment counts 32-bit outputs per thread (here: per query row); draw j takes the
      // 128-bit block offset / 4 + j, so M draws consume 4 * M and the next call starts after them.
      state = gen->philox_cuda_state(static_cast<uint64_t>(4 * M));
    }
    if (state.captured_) {
      philox.captured = true;
      philox.seed_ptr = state.seed_.ptr;
      philox.offset_ptr = state.offset_.ptr;
      philox.offset_intragraph = static_cast<uint64_t>(state.offset_intragraph_);
    } else {
      philox.seed = state.seed_.val;
      philox.offset = state.offset_.val;
    }
  }
  C10_CUDA_CHECK(cuda::launch_midx_sample(
      ix, s1.data_ptr<float>(), s2.data_ptr<float>(), B, M, philox, stage2_mode,
      ids.data_ptr<int64_t>(), log_q.data_ptr<float>(),
      has_targets ? tg.targets.data_ptr<int64_t>() : nullptr, L, N, target_log_q.data_ptr<float>(),
      at::cuda::getCurrentCUDAStream()));
  // Bad targets were refused at entry (sample_targets_inputs); the kernel still never reads past
  // code1/code2 (a bad one would give NaN).
  return {ids, log_q, target_log_q};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> midx_sample_seeded_cuda(
    const at::Tensor& s1, const at::Tensor& s2, const at::Tensor& log_n,
    const at::Tensor& cell_mass, const at::Tensor& log_n_max, const at::Tensor& offsets,
    const at::Tensor& class_ids, const std::optional<at::Tensor>& alias_prob,
    const std::optional<at::Tensor>& alias_pos, const std::optional<at::Tensor>& beta_csr,
    int64_t num_samples, int64_t seed, int64_t offset, const std::optional<at::Tensor>& targets,
    const std::optional<at::Tensor>& beta, const std::optional<at::Tensor>& code1,
    const std::optional<at::Tensor>& code2) {
  check_philox_offset(offset);
  cuda::PhiloxArgs philox;
  philox.seed = static_cast<uint64_t>(seed);
  philox.offset = static_cast<uint64_t>(offset);
  return midx_sample_impl(s1, s2, log_n, cell_mass, log_n_max, offsets, class_ids, alias_prob,
                          alias_pos, beta_csr, num_samples, philox, std::nullopt, targets, beta, code1,
                          code2);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> midx_sample_cuda(
    const at::Tensor& s1, const at::Tensor& s2, const at::Tensor& log_n,
    const at::Tensor& cell_mass, const at::Tensor& log_n_max, const at::Tensor& offsets,
    const at::Tensor& class_ids, const std::optional<at::Tensor>& alias_prob,
    const std::optional<at::Tensor>& alias_pos, const std::optional<at::Tensor>& beta_csr,
    int64_t num_samples, std::optional<at::Generator> generator, const std::optional<at::Tensor>& targets,
    const std::optional<at::Tensor>& beta, const std::optional<at::Tensor>& code1,
    const std::optional<at::Tensor>& code2) {
  return midx_sample_impl(s1, s2, log_n, cell_mass, log_n_max, offsets, class_ids, alias_prob,
                          alias_pos, beta_csr, num_samples, std::nullopt, generator, targets, beta, code1,
                          code2);
}

at::Tensor midx_log_prob_cuda(const at::Tensor& s1_in, const at::Tensor& s2_in,
                              const at::Tensor& log_n_in, const at::Tensor& cell_mass_in,
                              const at::Tensor& log_n_max_in, const std::optional<at::Tensor>& beta_in,
                              const at::Tensor& code1_in, const at::Tensor& code2_in,
                              const at::Tensor& ids_in) {
  check_query_scores(s1_in, s2_in);
  const int64_t B = s1_in.size(0), K = s1_in.size(1);
  const auto log_n = log_n_in.contiguous();
  const auto cell_mass = cell_mass_in.contiguous();
  const auto code1 = code1_in.contiguous();
  const auto code2 = code2_in.contiguous();
  check_codes(code1, code2, "midx_log_prob");
  check_log_prob_ids(ids_in, B);
  check_same_device("midx_log_prob",
                    {named("s1", s1_in), named("s2", s2_in), named("log_n", log_n_in),
                     named("cell_mass", cell_mass_in), named("log_n_max", log_n_max_in),
                     named("code1", code1_in), named("code2", code2_in), named("ids", ids_in),
                     named("beta", beta_in)});
  const c10::cuda::CUDAGuard guard(s1_in.device());
  check_ids_and_codes("midx_log_prob", "ids", ids_in, code1, code2, K);
  const auto s1 = s1_in.contiguous();
  const auto s2 = s2_in.contiguous();
  check_finite_scores("midx_log_prob", s1, s2);
  check_codewords_fit("midx_log_prob", K);
  const auto log_n_max = log_n_max_in.contiguous();
  const auto ids = ids_in.contiguous();
  const auto beta = contiguous_opt(beta_in);
  const int64_t L = ids.size(1);
  auto ix = make_cell_index(K, log_n, cell_mass, log_n_max);
  set_class_codes(ix, beta, code1, code2);
  auto out = at::empty({B, L}, s1.options());
  C10_CUDA_CHECK(cuda::launch_midx_log_prob(ix, s1.data_ptr<float>(), s2.data_ptr<float>(), B,
                                            ids.data_ptr<int64_t>(), L, out.data_ptr<float>(),
                                            at::cuda::getCurrentCUDAStream()));
  return out;
}

// ---- retrieval: midx_search_cells / midx_search ------------------------------------------------

// Visited cells and their class counts of every query (search.cu, kernel 1).
std::tuple<at::Tensor, at::Tensor> search_visit_cuda(const at::Tensor& s1, const at::Tensor& s2,
                                                     const at::Tensor& offsets, int64_t budget) {
  const int64_t B = s1.size(0), K = s1.size(1), C = search_max_cells(K, budget);
  auto cells = at::empty({B, C}, offsets.options());
  auto counts = at::empty({B}, offsets.options());
  // one workspace slice per resident block, at most ~64 MiB of them
  const int64_t slice = static_cast<int64_t>(cuda::search_visit_slice_bytes(K));
  const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>({B, 1024, (int64_t(64) << 20) / slice}));
  auto workspace = at::empty({blocks * slice}, offsets.options().dtype(at::kByte));
  C10_CUDA_CHECK(cuda::launch_search_visit(s1.data_ptr<float>(), s2.data_ptr<float>(), B, K,
                                           offsets.data_ptr<int64_t>(), budget, cells.data_ptr<int64_t>(), C,
                                           counts.data_ptr<int64_t>(), workspace.data_ptr(), blocks,
                                           at::cuda::getCurrentCUDAStream()));
  return {cells, counts};
}

std::tuple<at::Tensor, at::Tensor> midx_search_cells_cuda(const at::Tensor& s1_in, const at::Tensor& s2_in,
                                                          const at::Tensor& offsets, int64_t budget) {
  const int64_t KK = check_search_cells_shapes(s1_in, s2_in, offsets);
  check_same_device("midx_search_cells", {named("s1", s1_in), named("s2", s2_in), named("offsets", offsets)});
  const c10::cuda::CUDAGuard guard(s1_in.device());
  const int64_t n = offsets[KK].item<int64_t>();  // the class count; check_offsets checks the rest
  check_search_cells_inputs("midx_search_cells", s1_in, s2_in, offsets, n, budget);
  return search_visit_cuda(s1_in.contiguous(), s2_in.contiguous(), offsets, budget);
}

std::tuple<at::Tensor, at::Tensor> midx_search_cuda(const at::Tensor& query_in, const at::Tensor& weight_in,
                                                    const std::optional<at::Tensor>& bias_in, const at::Tensor& s1_in,
                                                    const at::Tensor& s2_in, const at::Tensor& offsets,
                                                    const at::Tensor& class_ids, int64_t k, int64_t budget,
                                                    c10::string_view rerank) {
  parse_search_rerank("midx_search", std::string(rerank));  // one kernel (per query) for every order
  const c10::cuda::CUDAGuard guard(query_in.device());
  const int64_t N = check_search_inputs("midx_search", query_in, weight_in, bias_in, s1_in, s2_in, offsets, class_ids,
                                        k, budget);
  const auto query = query_in.contiguous(), weight = weight_in.contiguous();
  const at::Tensor bias = contiguous_or_undefined(bias_in);
  const auto s1 = s1_in.contiguous(), s2 = s2_in.contiguous();
  const int64_t B = query.size(0), K = s1.size(1), d = query.size(1);
  const auto acc = acc_scalar_type(weight.scalar_type());
  auto ids = at::empty({B, k}, offsets.options());
  auto scores = at::empty({B, k}, query.options().dtype(acc));
  if (B == 0 || k == 0) return {ids, scores};
  // A query collects < budget classes before its last cell, so at most budget - 1 + the largest cell.
  const int64_t max_cell = (offsets.narrow(0, 1, K * K) - offsets.narrow(0, 0, K * K)).max().item<int64_t>();
  const int64_t Cmax = std::min<int64_t>(N, budget - 1 + max_cell);
  // candidate buffers of at most ~256 MiB: queries in row chunks
  const int64_t per_row = checked_size_product("midx_search", "candidates per query * 16 bytes", Cmax, 16);
  const int64_t rows = std::max<int64_t>(1, std::min<int64_t>(B, (int64_t(256) << 20) / per_row));
  auto first_bad = bad_position_flag(offsets.options());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  for (int64_t r0 = 0; r0 < B; r0 += rows) {
    const int64_t nb = std::min(rows, B - r0);
    const auto q = query.narrow(0, r0, nb);
    const auto t1 = s1.narrow(0, r0, nb), t2 = s2.narrow(0, r0, nb);
    at::Tensor cells, counts;
    std::tie(cells, counts) = search_visit_cuda(t1, t2, offsets, budget);
    auto cand_ids = at::full({nb, Cmax}, -1, offsets.options());
    auto cand_scores = at::full({nb, Cmax}, -INFINITY, query.options().dtype(acc));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "midx_search_cuda", [&] {
      using cuda_t = typename CudaType<scalar_t>::type;
      using acc_t = typename imi::acc_type<cuda_t>::type;
      if (class_ids.scalar_type() == at::kInt)
        C10_CUDA_CHECK((cuda::launch_search_score<cuda_t, int32_t>(
            cptr<scalar_t>(q), cptr<scalar_t>(weight), cptr_or_null<scalar_t>(bias), nb, d, N,
            offsets.data_ptr<int64_t>(), class_ids.data_ptr<int32_t>(), cells.data_ptr<int64_t>(), cells.size(1),
            cand_ids.data_ptr<int64_t>(), cand_scores.data_ptr<acc_t>(), Cmax, first_bad.data_ptr<int64_t>(),
            stream)));
      else
        C10_CUDA_CHECK((cuda::launch_search_score<cuda_t, int64_t>(
            cptr<scalar_t>(q), cptr<scalar_t>(weight), cptr_or_null<scalar_t>(bias), nb, d, N,
            offsets.data_ptr<int64_t>(), class_ids.data_ptr<int64_t>(), cells.data_ptr<int64_t>(), cells.size(1),
            cand_ids.data_ptr<int64_t>(), cand_scores.data_ptr<acc_t>(), Cmax, first_bad.data_ptr<int64_t>(),
            stream)));
    });
    // The k best, ties to the smaller id as on the CPU (topk leaves the order of equal scores open):
    // candidates by id (the padding, id -1 and score -inf, last), then a stable sort by score. A real
    // candidate of score -inf (a bias of -inf) thus still comes before the padding.
    const auto by_id = std::get<1>(
        cand_ids.masked_fill(cand_ids.lt(0), std::numeric_limits<int64_t>::max()).sort(/*stable=*/true, 1));
    const auto score_by_id = cand_scores.gather(1, by_id);
    const auto best = std::get<1>(score_by_id.sort(/*stable=*/true, 1, /*descending=*/true)).narrow(1, 0, k);
    ids.narrow(0, r0, nb).copy_(cand_ids.gather(1, by_id).gather(1, best));
    scores.narrow(0, r0, nb).copy_(score_by_id.gather(1, best));
  }
  const int64_t bad = first_bad.item<int64_t>();
  if (bad != IMI_NO_BAD_POSITION)
    check_no_bad_position("midx_search", "class_ids", bad, class_ids.to(at::kLong), "[0, N = " + std::to_string(N) + ")");
  return {ids, scores};
}

// ---- fused sampled softmax ---------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor> sampled_softmax_forward_cuda(
    const at::Tensor& x_in, const at::Tensor& weight_in, const std::optional<at::Tensor>& bias_in,
    const at::Tensor& ids_in, const at::Tensor& log_q_in, bool remove_accidental_hits,
    int64_t ignore_index, bool /*sparse_grad: used by autograd only*/) {
  check_loss_inputs(x_in, weight_in, bias_in, ids_in, log_q_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const LossTensors in = contiguous_loss_inputs(x_in, weight_in, bias_in, ids_in, log_q_in);
  const at::Tensor &x = in.x, &weight = in.weight, &ids = in.ids, &log_q = in.log_q, &bias = in.bias;
  const int64_t B = x.size(0), d = x.size(1), M1 = ids.size(1), N = weight.size(0);
  const auto acc_opts = x.options().dtype(acc_scalar_type(x.scalar_type()));
  auto loss = at::empty({B}, acc_opts);
  auto lse = at::empty({B}, acc_opts);
  const auto first_bad = bad_position_flag(ids.options());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "sampled_softmax_forward_cuda", [&] {
    using cuda_t = typename CudaType<scalar_t>::type;
    using acc_t = typename imi::acc_type<cuda_t>::type;
    C10_CUDA_CHECK(cuda::launch_sampled_forward<cuda_t>(
        cptr<scalar_t>(x), cptr<scalar_t>(weight), cptr_or_null<scalar_t>(bias), B, d, N,
        ids.data_ptr<int64_t>(), log_q.data_ptr<acc_t>(), M1, remove_accidental_hits,
        ignore_index, loss.data_ptr<acc_t>(), lse.data_ptr<acc_t>(), first_bad.data_ptr<int64_t>(),
        stream));
  });
  check_no_bad_position("sampled_softmax_forward", "ids", first_bad, ids, loss_ids_allowed(N, ignore_index));
  return {loss, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sampled_softmax_train_cuda(
    const at::Tensor& x_in, const at::Tensor& weight_in, const std::optional<at::Tensor>& bias_in,
    const at::Tensor& ids_in, const at::Tensor& log_q_in, bool remove_accidental_hits,
    int64_t ignore_index, bool /*sparse_grad: used by autograd only*/) {
  check_loss_inputs(x_in, weight_in, bias_in, ids_in, log_q_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const LossTensors in = contiguous_loss_inputs(x_in, weight_in, bias_in, ids_in, log_q_in);
  const at::Tensor &x = in.x, &weight = in.weight, &ids = in.ids, &log_q = in.log_q, &bias = in.bias;
  const int64_t B = x.size(0), d = x.size(1), M1 = ids.size(1), N = weight.size(0);
  const auto acc_opts = x.options().dtype(acc_scalar_type(x.scalar_type()));
  auto loss = at::empty({B}, acc_opts);
  auto lse = at::empty({B}, acc_opts);
  auto coef = at::empty({B, M1}, acc_opts);
  auto grad_x = at::empty({B, d}, acc_opts);
  const auto first_bad = bad_position_flag(ids.options());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "sampled_softmax_train_cuda", [&] {
    using cuda_t = typename CudaType<scalar_t>::type;
    using acc_t = typename imi::acc_type<cuda_t>::type;
    C10_CUDA_CHECK(cuda::launch_sampled_train<cuda_t>(
        cptr<scalar_t>(x), cptr<scalar_t>(weight), cptr_or_null<scalar_t>(bias), B, d, N,
        ids.data_ptr<int64_t>(), log_q.data_ptr<acc_t>(), M1, remove_accidental_hits, ignore_index,
        loss.data_ptr<acc_t>(), lse.data_ptr<acc_t>(), coef.data_ptr<acc_t>(), grad_x.data_ptr<acc_t>(),
        first_bad.data_ptr<int64_t>(), stream));
  });
  check_no_bad_position("sampled_softmax_train", "ids", first_bad, ids, loss_ids_allowed(N, ignore_index));
  return {loss, lse, coef, grad_x};
}

std::tuple<at::Tensor, at::Tensor> sampled_softmax_backward_cuda(
    const at::Tensor& grad_loss_in, const at::Tensor& x_in, const at::Tensor& weight_in,
    const std::optional<at::Tensor>& bias_in, const at::Tensor& ids_in, const at::Tensor& log_q_in,
    const at::Tensor& lse_in, bool remove_accidental_hits, int64_t ignore_index) {
  check_loss_inputs(x_in, weight_in, bias_in, ids_in, log_q_in);
  check_loss_backward_inputs(grad_loss_in, lse_in, x_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const LossTensors in = contiguous_loss_inputs(x_in, weight_in, bias_in, ids_in, log_q_in);
  const at::Tensor &x = in.x, &weight = in.weight, &ids = in.ids, &log_q = in.log_q, &bias = in.bias;
  const int64_t B = x.size(0), d = x.size(1), M1 = ids.size(1), N = weight.size(0);
  // Named locals: the kernel reads through their pointers after this statement.
  auto [grad_loss, lse, grad_x, coef] = loss_backward_tensors(grad_loss_in, lse_in, x, M1);
  const auto first_bad = bad_position_flag(ids.options());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "sampled_softmax_backward_cuda", [&] {
    using cuda_t = typename CudaType<scalar_t>::type;
    using acc_t = typename imi::acc_type<cuda_t>::type;
    C10_CUDA_CHECK(cuda::launch_sampled_backward<cuda_t>(
        grad_loss.data_ptr<acc_t>(), cptr<scalar_t>(x), cptr<scalar_t>(weight),
        cptr_or_null<scalar_t>(bias), B, d, N, ids.data_ptr<int64_t>(), log_q.data_ptr<acc_t>(), M1,
        lse.data_ptr<acc_t>(), remove_accidental_hits, ignore_index, mptr<scalar_t>(grad_x),
        coef.data_ptr<acc_t>(), first_bad.data_ptr<int64_t>(), stream));
  });
  check_no_bad_position("sampled_softmax_backward", "ids", first_bad, ids, loss_ids_allowed(N, ignore_index));
  return {grad_x, coef};
}

// ---- weight / bias gradients -------------------------------------------------------------------

// Sorted-by-class view of the entries of ids (see launch_segment_by_class).
struct Segments {
  at::Tensor sorted_entries, run_keys, run_counts, run_offsets, num_runs;
};

// Entries rejected by imi::weight_grad_entry are recorded in first_bad.
Segments segment_by_class(const at::Tensor& ids, const at::Tensor& coef, int64_t num_classes,
                          const at::Tensor& first_bad, cudaStream_t stream) {
  const int64_t E = ids.numel();
  TORCH_CHECK(E <= INT_MAX, "weight_grad: at most 2^31 - 1 (row, column) entries, got ", E);
  const auto opts = ids.options();
  auto keys_in = at::empty({E}, opts), vals_in = at::empty({E}, opts);
  auto sorted_keys = at::empty({E}, opts);
  Segments s{at::empty({E}, opts), at::empty({E}, opts), at::empty({E}, opts),
             at::empty({E}, opts), at::empty({1}, opts)};
  cudaError_t err = cudaSuccess;
  const size_t temp_bytes = cuda::segment_temp_bytes(E, num_classes, &err);
  C10_CUDA_CHECK(err);
  auto temp = scratch_bytes(temp_bytes, opts);
  AT_DISPATCH_FLOATING_TYPES(coef.scalar_type(), "segment_by_class", [&] {
    C10_CUDA_CHECK(cuda::launch_segment_by_class<scalar_t>(
        ids.data_ptr<int64_t>(), coef.data_ptr<scalar_t>(), E, num_classes, keys_in.data_ptr<int64_t>(),
        vals_in.data_ptr<int64_t>(), sorted_keys.data_ptr<int64_t>(),
        s.sorted_entries.data_ptr<int64_t>(), s.run_keys.data_ptr<int64_t>(),
        s.run_counts.data_ptr<int64_t>(), s.run_offsets.data_ptr<int64_t>(),
        s.num_runs.data_ptr<int64_t>(), temp.data_ptr(), static_cast<size_t>(temp.numel()),
        first_bad.data_ptr<int64_t>(), stream));
  });
  return s;
}

std::tuple<at::Tensor, at::Tensor> dense_weight_grad_cuda(const at::Tensor& coef_in,
                                                          const at::Tensor& ids_in,
                                                          const at::Tensor& x_in,
                                                          int64_t num_classes) {
  at::Tensor coef, ids, x;
  std::tie(coef, ids, x) = weight_grad_inputs("dense_weight_grad", coef_in, ids_in, x_in, num_classes);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const int64_t E = ids.numel(), M1 = ids.size(1), d = x.size(1);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const auto first_bad = bad_position_flag(ids.options());
  const std::string allowed = weight_grad_ids_allowed(num_classes);
  if (wgrad_atomic_from_env()) {
    const auto acc = coef.scalar_type();
    auto gw = at::zeros({num_classes, d}, x.options().dtype(acc));
    auto gb = at::zeros({num_classes}, x.options().dtype(acc));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dense_weight_grad_cuda", [&] {
      using cuda_t = typename CudaType<scalar_t>::type;
      using acc_t = typename imi::acc_type<cuda_t>::type;
      C10_CUDA_CHECK(cuda::launch_weight_grad_atomic<cuda_t>(
          coef.data_ptr<acc_t>(), ids.data_ptr<int64_t>(), cptr<scalar_t>(x), E, M1, d,
          num_classes, gw.data_ptr<acc_t>(), gb.data_ptr<acc_t>(), first_bad.data_ptr<int64_t>(), stream));
    });
    check_no_bad_position("dense_weight_grad", "ids", first_bad, ids, allowed);
    return {gw.to(x.scalar_type()), gb.to(x.scalar_type())};
  }
  auto gw = at::zeros({num_classes, d}, x.options());
  auto gb = at::zeros({num_classes}, x.options());
  if (E == 0) return {gw, gb};
  const Segments s = segment_by_class(ids, coef, num_classes, first_bad, stream);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dense_weight_grad_cuda", [&] {
    using cuda_t = typename CudaType<scalar_t>::type;
    using acc_t = typename imi::acc_type<cuda_t>::type;
    C10_CUDA_CHECK(cuda::launch_segment_reduce<cuda_t>(
        coef.data_ptr<acc_t>(), cptr<scalar_t>(x), M1, d, s.sorted_entries.data_ptr<int64_t>(),
        s.run_keys.data_ptr<int64_t>(), s.run_counts.data_ptr<int64_t>(),
        s.run_offsets.data_ptr<int64_t>(), s.num_runs.data_ptr<int64_t>(), E, /*dense=*/true,
        mptr<scalar_t>(gw), mptr<scalar_t>(gb), stream));
  });
  check_no_bad_position("dense_weight_grad", "ids", first_bad, ids, allowed);
  return {gw, gb};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sparse_weight_grad_cuda(const at::Tensor& coef_in,
                                                                       const at::Tensor& ids_in,
                                                                       const at::Tensor& x_in,
                                                                       int64_t num_classes) {
  at::Tensor coef, ids, x;
  std::tie(coef, ids, x) = weight_grad_inputs("sparse_weight_grad", coef_in, ids_in, x_in, num_classes);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const int64_t E = ids.numel(), M1 = ids.size(1), d = x.size(1);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  if (E == 0)
    return {at::empty({0}, ids.options()), at::empty({0, d}, x.options()), at::empty({0}, x.options())};
  const auto first_bad = bad_position_flag(ids.options());
  const Segments s = segment_by_class(ids, coef, num_classes, first_bad, stream);
  check_no_bad_position("sparse_weight_grad", "ids", first_bad, ids, weight_grad_ids_allowed(num_classes));
  auto info = at::empty({2}, ids.options());
  C10_CUDA_CHECK(cuda::launch_segment_info(s.run_keys.data_ptr<int64_t>(),
                                           s.num_runs.data_ptr<int64_t>(),
                                           info.data_ptr<int64_t>(), stream));
  // The output size (number of touched classes) lives on the device: one synchronising copy,
  // inherent to this op's data-dependent shape.
  const auto info_host = info.cpu();
  const int64_t U = info_host.data_ptr<int64_t>()[0], first = info_host.data_ptr<int64_t>()[1];
  auto unique_ids = at::empty({U}, ids.options());
  auto rows = at::empty({U, d}, x.options());
  auto bias_rows = at::empty({U}, x.options());
  C10_CUDA_CHECK(cuda::launch_segment_unique_ids(s.run_keys.data_ptr<int64_t>(), first, U,
                                                 unique_ids.data_ptr<int64_t>(), stream));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "sparse_weight_grad_cuda", [&] {
    using cuda_t = typename CudaType<scalar_t>::type;
    using acc_t = typename imi::acc_type<cuda_t>::type;
    C10_CUDA_CHECK(cuda::launch_segment_reduce<cuda_t>(
        coef.data_ptr<acc_t>(), cptr<scalar_t>(x), M1, d, s.sorted_entries.data_ptr<int64_t>(),
        s.run_keys.data_ptr<int64_t>(), s.run_counts.data_ptr<int64_t>(),
        s.run_offsets.data_ptr<int64_t>(), s.num_runs.data_ptr<int64_t>(), U + first,
        /*dense=*/false, mptr<scalar_t>(rows), mptr<scalar_t>(bias_rows), stream));
  });
  return {unique_ids, rows, bias_rows};
}

// ---- row-sparse optimizer steps -----------------------------------------------------------------

// Storage type of the weight: float32, bfloat16 or float16 (checked before).
template <typename F>
void dispatch_weight(at::ScalarType t, F&& f) {
  switch (t) {
    case at::kFloat: f(float{}); break;
    case at::kBFloat16: f(at::BFloat16{}); break;
    case at::kHalf: f(at::Half{}); break;
    default: TORCH_CHECK(false, "row optimizer: unsupported weight dtype ", t);
  }
}

void row_sparse_adam_cuda(const at::Tensor& param, const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq,
                          const std::optional<at::Tensor>& rows_in, const at::Tensor& grad_in, double lr, double beta1,
                          double beta2, double eps, double weight_decay, int64_t step) {
  const RowOptimShape s = row_optim_inputs("row_sparse_adam_", param,
                                           {named("exp_avg", exp_avg), named("exp_avg_sq", exp_avg_sq)},
                                           param.sizes(), rows_in, grad_in);
  check_adam_step(step);
  if (s.U == 0) return;
  const c10::cuda::CUDAGuard guard(param.device());
  const imi::AdamCoef c = imi::make_adam_coef(lr, beta1, beta2, eps, weight_decay, step);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  dispatch_weight(param.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    C10_CUDA_CHECK(cuda::launch_row_sparse_adam<typename CudaType<scalar_t>::type>(
        mptr<scalar_t>(param), exp_avg.data_ptr<float>(), exp_avg_sq.data_ptr<float>(),
        s.rows_ptr(), cptr<scalar_t>(s.grad), s.U, s.d, c, stream));
  });
}

void row_wise_adagrad_cuda(const at::Tensor& param, const at::Tensor& sum, const std::optional<at::Tensor>& rows_in,
                           const at::Tensor& grad_in, double lr, double eps, double weight_decay) {
  const RowOptimShape s =
      row_optim_inputs("row_wise_adagrad_", param, {named("sum", sum)}, {param.size(0)}, rows_in, grad_in);
  if (s.U == 0) return;
  const c10::cuda::CUDAGuard guard(param.device());
  const imi::AdagradCoef c = imi::make_adagrad_coef(lr, eps, weight_decay);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  dispatch_weight(param.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    C10_CUDA_CHECK(cuda::launch_row_wise_adagrad<typename CudaType<scalar_t>::type>(
        mptr<scalar_t>(param), sum.data_ptr<float>(), s.rows_ptr(),
        cptr<scalar_t>(s.grad), s.U, s.d, c, stream));
  });
}

// ---- fused multi-label sampled softmax -----------------------------------------------------------

std::tuple<at::Tensor, at::Tensor> multilabel_softmax_forward_cuda(
    const at::Tensor& x_in, const at::Tensor& weight_in, const std::optional<at::Tensor>& bias_in,
    const at::Tensor& ids_in, const at::Tensor& log_q_in, int64_t num_positives, bool remove_accidental_hits,
    bool /*sparse_grad: used by autograd only*/) {
  check_multilabel_inputs("multilabel_softmax_forward", x_in, weight_in, bias_in, ids_in, log_q_in, num_positives);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const LossTensors in = contiguous_loss_inputs(x_in, weight_in, bias_in, ids_in, log_q_in);
  const at::Tensor &x = in.x, &weight = in.weight, &ids = in.ids, &log_q = in.log_q, &bias = in.bias;
  const int64_t B = x.size(0), d = x.size(1), LM = ids.size(1), N = weight.size(0), L = num_positives;
  const auto acc_opts = x.options().dtype(acc_scalar_type(x.scalar_type()));
  auto loss = at::empty({B, L}, acc_opts);
  auto lse = at::empty({B, L}, acc_opts);
  const auto first_bad = bad_position_flag(ids.options());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "multilabel_softmax_forward_cuda", [&] {
    using cuda_t = typename CudaType<scalar_t>::type;
    using acc_t = typename imi::acc_type<cuda_t>::type;
    C10_CUDA_CHECK(cuda::launch_multilabel_forward<cuda_t>(
        cptr<scalar_t>(x), cptr<scalar_t>(weight), cptr_or_null<scalar_t>(bias), B, d, N, ids.data_ptr<int64_t>(),
        log_q.data_ptr<acc_t>(), L, LM, remove_accidental_hits, loss.data_ptr<acc_t>(), lse.data_ptr<acc_t>(),
        first_bad.data_ptr<int64_t>(), stream));
  });
  check_no_bad_position("multilabel_softmax_forward", "ids", first_bad, ids, multilabel_ids_allowed(N));
  return {loss, lse};
}

// grad_x in x's dtype (the backward op) or, for the training forward, in the accumulation dtype.
std::tuple<at::Tensor, at::Tensor> multilabel_backward_cuda_impl(
    const at::Tensor& grad_loss_in, const at::Tensor& x_in, const at::Tensor& weight_in,
    const std::optional<at::Tensor>& bias_in, const at::Tensor& ids_in, const at::Tensor& log_q_in,
    const at::Tensor& lse_in, int64_t num_positives, bool remove_accidental_hits, bool grad_x_in_acc) {
  check_multilabel_inputs("multilabel_softmax_backward", x_in, weight_in, bias_in, ids_in, log_q_in, num_positives);
  check_multilabel_backward_inputs(grad_loss_in, lse_in, x_in, num_positives);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const LossTensors in = contiguous_loss_inputs(x_in, weight_in, bias_in, ids_in, log_q_in);
  const at::Tensor &x = in.x, &weight = in.weight, &ids = in.ids, &log_q = in.log_q, &bias = in.bias;
  const int64_t B = x.size(0), d = x.size(1), LM = ids.size(1), N = weight.size(0), L = num_positives;
  // Named locals: the kernel reads through their pointers after this statement.
  auto [grad_loss, lse, grad_x, coef] = loss_backward_tensors(grad_loss_in, lse_in, x, LM);
  if (grad_x_in_acc) grad_x = at::empty(x.sizes(), coef.options());
  const auto first_bad = bad_position_flag(ids.options());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "multilabel_softmax_backward_cuda", [&] {
    using cuda_t = typename CudaType<scalar_t>::type;
    using acc_t = typename imi::acc_type<cuda_t>::type;
    const auto launch = [&](auto* gx) {
      using gx_t = std::remove_pointer_t<decltype(gx)>;
      // (the extra parentheses keep the template argument list's comma out of the macro's arguments)
      C10_CUDA_CHECK((cuda::launch_multilabel_backward<cuda_t, gx_t>(
          grad_loss.data_ptr<acc_t>(), cptr<scalar_t>(x), cptr<scalar_t>(weight), cptr_or_null<scalar_t>(bias), B, d,
          N, ids.data_ptr<int64_t>(), log_q.data_ptr<acc_t>(), L, LM, lse.data_ptr<acc_t>(), remove_accidental_hits,
          gx, coef.data_ptr<acc_t>(), first_bad.data_ptr<int64_t>(), stream)));
    };
    if (grad_x_in_acc) launch(grad_x.data_ptr<acc_t>());
    else launch(mptr<scalar_t>(grad_x));
  });
  check_no_bad_position("multilabel_softmax_backward", "ids", first_bad, ids, multilabel_ids_allowed(N));
  return {grad_x, coef};
}

std::tuple<at::Tensor, at::Tensor> multilabel_softmax_backward_cuda(
    const at::Tensor& grad_loss, const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& ids, const at::Tensor& log_q, const at::Tensor& lse, int64_t num_positives,
    bool remove_accidental_hits) {
  return multilabel_backward_cuda_impl(grad_loss, x, weight, bias, ids, log_q, lse, num_positives,
                                       remove_accidental_hits, /*grad_x_in_acc=*/false);
}

// Training forward: the forward op, then the backward with grad_loss = pos_weight and grad_x in the
// accumulation dtype (multilabel_loss.cu says why no fused kernel).
std::tuple<at::Tensor, at::Tensor, at::Tensor> multilabel_softmax_train_cuda(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias, const at::Tensor& ids,
    const at::Tensor& log_q, const at::Tensor& pos_weight, int64_t num_positives, bool remove_accidental_hits,
    bool sparse_grad) {
  check_multilabel_inputs("multilabel_softmax_train", x, weight, bias, ids, log_q, num_positives);
  check_multilabel_pos_weight(pos_weight, x, num_positives);
  auto [loss, lse] = multilabel_softmax_forward_cuda(x, weight, bias, ids, log_q, num_positives,
                                                     remove_accidental_hits, sparse_grad);
  auto [grad_x, coef] = multilabel_backward_cuda_impl(pos_weight, x, weight, bias, ids, log_q, lse, num_positives,
                                                      remove_accidental_hits, /*grad_x_in_acc=*/true);
  // pads hold loss 0 and weight 0; a row with a bad id raised above
  return {(loss * pos_weight).sum(1), coef, grad_x};
}

}  // namespace

TORCH_LIBRARY_IMPL(imi_softmax, CUDA, m) {
  m.impl("assign_codewords", &assign_codewords_cuda);
  m.impl("assign_rows", &assign_rows_cuda);
  m.impl("build_cells", &build_cells_cuda);
  m.impl("update_cells", &update_cells_cuda);
  m.impl("midx_sample", &midx_sample_cuda);
  m.impl("midx_sample_seeded", &midx_sample_seeded_cuda);
  m.impl("midx_log_prob", &midx_log_prob_cuda);
  m.impl("midx_search_cells", &midx_search_cells_cuda);
  m.impl("midx_search", &midx_search_cuda);
  m.impl("sampled_softmax_forward", &sampled_softmax_forward_cuda);
  m.impl("sampled_softmax_train", &sampled_softmax_train_cuda);
  m.impl("sampled_softmax_backward", &sampled_softmax_backward_cuda);
  m.impl("dense_weight_grad", &dense_weight_grad_cuda);
  m.impl("sparse_weight_grad", &sparse_weight_grad_cuda);
  m.impl("row_sparse_adam_", &row_sparse_adam_cuda);
  m.impl("row_wise_adagrad_", &row_wise_adagrad_cuda);
}

TORCH_LIBRARY_IMPL(imi_softmax, CUDA, m) {
  m.impl("multilabel_softmax_forward", &multilabel_softmax_forward_cuda);
  m.impl("multilabel_softmax_train", &multilabel_softmax_train_cuda);
  m.impl("multilabel_softmax_backward", &multilabel_softmax_backward_cuda);
}

}  // namespace imi_softmax
