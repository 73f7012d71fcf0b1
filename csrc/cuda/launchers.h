// Launchers of the CUDA kernels: plain C++ functions over raw device pointers, sizes and a stream.
// No torch headers here (and none in the .cu files); csrc/cuda/ops_cuda.cpp does the torch side
// (checks, allocation, device guard, current stream) and calls these.
//
// Every launcher enqueues work on `stream` only (no host synchronisation) and returns the first
// CUDA error it saw (cudaSuccess otherwise); the glue checks it with C10_CUDA_CHECK.
// Temporary buffers are allocated by the caller (torch's caching allocator) from the sizes the
// *_temp_bytes functions report.
#pragma once

#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>

#include <cstddef>
#include <cstdint>

#include "imi_softmax/common.h"
#include "imi_softmax/proposal.h"
#include "imi_softmax/row_optim.h"
#include "imi_softmax/search.h"

namespace imi_softmax {
namespace cuda {

// ---- k-means assignment (kmeans.cu) ------------------------------------------------------------
// dots [N, K] = x @ C^T (computed by the caller with cuBLAS), x_sqnorm [N], c_sqnorm [K].
// scalar_t: float or double.
template <typename scalar_t>
cudaError_t launch_nearest_codeword(const scalar_t* dots, const scalar_t* c_sqnorm,
                                    const scalar_t* x_sqnorm, int64_t N, int64_t K, int64_t* codes,
                                    scalar_t* sqdist, cudaStream_t stream);

// ---- index build (cells.cu) --------------------------------------------------------------------
// Scratch bytes of the cub sort and scan for N classes and KK = K*K cells.
size_t build_cells_temp_bytes(int64_t N, int64_t KK, cudaError_t* err);

// code1/code2 [N] int32 (all in [0, K)), beta [N] or nullptr. Scratch: keys_in/keys_out/vals_in [N],
// counts [KK] (any content), temp [temp_bytes], alias_scratch [N] (only with beta). Outputs:
// offsets [KK+1], class_ids [N] (grouped by cell, ascending id within a cell), log_n [KK], and
// with beta only: alias_prob, alias_pos, beta_csr [N] (per-cell alias tables, by CSR position).
cudaError_t launch_build_cells(const int32_t* code1, const int32_t* code2, const float* beta,
                               int64_t N, int64_t K, int32_t* keys_in, int32_t* keys_out,
                               int32_t* vals_in, int64_t* counts, void* temp, size_t temp_bytes,
                               int64_t* offsets, int32_t* class_ids, float* alias_prob,
                               int32_t* alias_pos, float* beta_csr, int32_t* alias_scratch,
                               float* log_n, cudaStream_t stream);

// cell_mass [KK] = imi::cell_scaled_mass of every cell (float64 sums of exp(beta - *log_n_max));
// beta_csr [N] or nullptr (no bias); log_n_max [1] on the device (no host read).
cudaError_t launch_cell_scaled_mass(const int64_t* offsets, const float* beta_csr, const float* log_n_max,
                                    int64_t KK, float* cell_mass, cudaStream_t stream);

// ---- MIDX proposal (proposal.cu) ---------------------------------------------------------------
// Philox key and counter offset, mirroring at::PhiloxCudaState: when `captured` (CUDA graph
// capture), seed = *seed_ptr and offset = *offset_ptr + offset_intragraph are read on the device.
struct PhiloxArgs {
  uint64_t seed = 0;
  uint64_t offset = 0;
  const int64_t* seed_ptr = nullptr;
  const int64_t* offset_ptr = nullptr;
  uint64_t offset_intragraph = 0;
  bool captured = false;
};

// s1, s2 [B, K] float32 contiguous; ids, log_q [B, M]. Uses ix.offsets/class_ids and, with a bias,
// ix.alias_prob/alias_pos/beta_csr. philox.offset counts 32-bit outputs per query row (draw j uses
// Philox block offset / 4 + j: reserve 4 * M per call). targets [B, L] (L = 0: none, pointer
// unused) -> target_log_q [B, L] from the same query preparation, reading ix.beta/code1/code2 over
// num_classes classes (negative target: 0; >= num_classes: NaN, never read out of bounds).
// stage2_mode: 0 = K x K stage-2 table in shared memory when it fits, else per-draw streaming;
// 1 = table (cudaErrorInvalidValue if it does not fit); 2 = streaming. Same samples either way.
// Returns cudaErrorInvalidValue when even the per-query arrays (5K floats) exceed shared memory.
cudaError_t launch_midx_sample(const imi::CellIndex& ix, const float* s1, const float* s2,
                               int64_t B, int64_t M, PhiloxArgs philox, int stage2_mode,
                               int64_t* ids, float* log_q, const int64_t* targets, int64_t L,
                               int64_t num_classes, float* target_log_q, cudaStream_t stream);

// The most codewords whose per-query arrays fit in the shared memory a block of the current device
// may opt into (launch_midx_sample / launch_midx_log_prob refuse more): for a readable error before
// the launch.
cudaError_t midx_max_codewords(int64_t* out);

// ids [B, L] -> out [B, L]. Uses ix.beta/code1/code2 (the sampling tables are not read).
cudaError_t launch_midx_log_prob(const imi::CellIndex& ix, const float* s1, const float* s2,
                                 int64_t B, const int64_t* ids, int64_t L, float* out,
                                 cudaStream_t stream);

// ---- fused sampled softmax (sampled_loss.cu) ---------------------------------------------------
// scalar_t: float, double, __half, __nv_bfloat16; acc_t = imi::acc_type<scalar_t>::type.
// weight [N, d]. Rows holding an id outside [0, N) (column 0: other than ignore_index) are skipped
// and the smallest such flat position of ids is written to *first_bad (atomic min; the caller
// initialises it to IMI_NO_BAD_POSITION and reads it back).
template <typename scalar_t>
cudaError_t launch_sampled_forward(const scalar_t* x, const scalar_t* weight, const scalar_t* bias,
                                   int64_t B, int64_t d, int64_t N, const int64_t* ids,
                                   const typename imi::acc_type<scalar_t>::type* log_q, int64_t M1,
                                   bool remove_accidental_hits, int64_t ignore_index,
                                   typename imi::acc_type<scalar_t>::type* loss,
                                   typename imi::acc_type<scalar_t>::type* lse, int64_t* first_bad,
                                   cudaStream_t stream);

// Training forward: also coef [B, M1] (grad_loss = 1) and grad_x [B, d], both acc_t.
template <typename scalar_t>
cudaError_t launch_sampled_train(const scalar_t* x, const scalar_t* weight, const scalar_t* bias,
                                 int64_t B, int64_t d, int64_t N, const int64_t* ids,
                                 const typename imi::acc_type<scalar_t>::type* log_q, int64_t M1,
                                 bool remove_accidental_hits, int64_t ignore_index,
                                 typename imi::acc_type<scalar_t>::type* loss,
                                 typename imi::acc_type<scalar_t>::type* lse,
                                 typename imi::acc_type<scalar_t>::type* coef,
                                 typename imi::acc_type<scalar_t>::type* grad_x, int64_t* first_bad,
                                 cudaStream_t stream);

template <typename scalar_t>
cudaError_t launch_sampled_backward(const typename imi::acc_type<scalar_t>::type* grad_loss,
                                    const scalar_t* x, const scalar_t* weight,
                                    const scalar_t* bias, int64_t B, int64_t d, int64_t N, const int64_t* ids,
                                    const typename imi::acc_type<scalar_t>::type* log_q, int64_t M1,
                                    const typename imi::acc_type<scalar_t>::type* lse,
                                    bool remove_accidental_hits, int64_t ignore_index,
                                    scalar_t* grad_x, typename imi::acc_type<scalar_t>::type* coef,
                                    int64_t* first_bad, cudaStream_t stream);

// ---- fused multi-label sampled softmax (multilabel_loss.cu) -------------------------------------
// ids [B, LM = L+M]: L positives (-1 = padding), then M negatives; loss/lse [B, L], coef [B, LM],
// grad_loss [B, L]. Rows holding an id outside [0, N) (positives: other than -1) are skipped and the
// smallest such flat position of ids is written to *first_bad (atomic min, initialised by the caller).
template <typename scalar_t>
cudaError_t launch_multilabel_forward(const scalar_t* x, const scalar_t* weight, const scalar_t* bias, int64_t B,
                                      int64_t d, int64_t N, const int64_t* ids,
                                      const typename imi::acc_type<scalar_t>::type* log_q, int64_t L, int64_t LM,
                                      bool remove_accidental_hits, typename imi::acc_type<scalar_t>::type* loss,
                                      typename imi::acc_type<scalar_t>::type* lse, int64_t* first_bad,
                                      cudaStream_t stream);

// grad_x is gx_t: scalar_t (the backward op) or acc_t (the training forward, scaled later).
template <typename scalar_t, typename gx_t>
cudaError_t launch_multilabel_backward(const typename imi::acc_type<scalar_t>::type* grad_loss, const scalar_t* x,
                                       const scalar_t* weight, const scalar_t* bias, int64_t B, int64_t d, int64_t N,
                                       const int64_t* ids, const typename imi::acc_type<scalar_t>::type* log_q,
                                       int64_t L, int64_t LM, const typename imi::acc_type<scalar_t>::type* lse,
                                       bool remove_accidental_hits, gx_t* grad_x,
                                       typename imi::acc_type<scalar_t>::type* coef, int64_t* first_bad,
                                       cudaStream_t stream);

// ---- weight / bias gradients (weight_grad.cu) --------------------------------------------------
// Entries e of ids [E = B*M1] are used, skipped or rejected by imi::weight_grad_entry(id, coef[e], N);
// the smallest rejected e is written to *first_bad (atomic min; the caller initialises it to
// IMI_NO_BAD_POSITION and reads it back).
// Atomic scatter: grad_w_acc [N, d] and grad_b_acc [N] (acc_t, zero-initialised by the caller)
// += coef[e] * x[e / M1] for every used entry with coef != 0.
template <typename scalar_t>
cudaError_t launch_weight_grad_atomic(const typename imi::acc_type<scalar_t>::type* coef,
                                      const int64_t* ids, const scalar_t* x, int64_t E, int64_t M1,
                                      int64_t d, int64_t num_classes,
                                      typename imi::acc_type<scalar_t>::type* grad_w_acc,
                                      typename imi::acc_type<scalar_t>::type* grad_b_acc,
                                      int64_t* first_bad, cudaStream_t stream);

// Deterministic path, step 1: sort the E entries by class (stable, so entries of a class stay in
// (b, j) order) and run-length encode. Entries not used become key 0, used ones id+1.
// Outputs (all [E] unless noted, caller-allocated): sorted_keys, sorted_entries, run_keys,
// run_counts, run_offsets (exclusive scan of run_counts), num_runs [1]. acc_t: float or double.
size_t segment_temp_bytes(int64_t E, int64_t num_classes, cudaError_t* err);
template <typename acc_t>
cudaError_t launch_segment_by_class(const int64_t* ids, const acc_t* coef, int64_t E, int64_t num_classes,
                                    int64_t* keys_in, int64_t* vals_in, int64_t* sorted_keys,
                                    int64_t* sorted_entries, int64_t* run_keys,
                                    int64_t* run_counts, int64_t* run_offsets, int64_t* num_runs,
                                    void* temp, size_t temp_bytes, int64_t* first_bad, cudaStream_t stream);

// Step 2: one block-row per run; sums coef * x over the run's entries in entry order, in acc_t,
// and writes the casted sums. dense: row = class id (grad_w [N, d], grad_b [N], untouched rows
// left as they are); sparse: row = run index minus the invalid run (grad_w [U, d], grad_b [U]).
// max_runs: an upper bound of *num_runs (E) used to size the grid; no host read of num_runs.
template <typename scalar_t>
cudaError_t launch_segment_reduce(const typename imi::acc_type<scalar_t>::type* coef,
                                  const scalar_t* x, int64_t M1, int64_t d,
                                  const int64_t* sorted_entries, const int64_t* run_keys,
                                  const int64_t* run_counts, const int64_t* run_offsets,
                                  const int64_t* num_runs, int64_t max_runs, bool dense,
                                  scalar_t* grad_w, scalar_t* grad_b, cudaStream_t stream);

// Sparse helpers: info[0] = U (valid runs), info[1] = index of the first valid run (0 or 1).
cudaError_t launch_segment_info(const int64_t* run_keys, const int64_t* num_runs, int64_t* info,
                                cudaStream_t stream);
// unique_ids[u] = run_keys[first + u] - 1 for u < U.
cudaError_t launch_segment_unique_ids(const int64_t* run_keys, int64_t first, int64_t U,
                                      int64_t* unique_ids, cudaStream_t stream);

// ---- row-sparse optimizer steps (row_optim.cu) -------------------------------------------------
// w_t: float, __half, __nv_bfloat16. param [N, d] (d = 1 for a bias), state float32; rows [U]
// distinct ids in [0, N) (checked by the caller) or nullptr (row u = u, U = N); grad [U, d].
// Lazy Adam: exp_avg / exp_avg_sq [N, d].
template <typename w_t>
cudaError_t launch_row_sparse_adam(w_t* param, float* exp_avg, float* exp_avg_sq, const int64_t* rows,
                                   const w_t* grad, int64_t U, int64_t d, imi::AdamCoef coef, cudaStream_t stream);
// Row-wise Adagrad: sum [N] (one accumulator per row).
template <typename w_t>
cudaError_t launch_row_wise_adagrad(w_t* param, float* sum, const int64_t* rows, const w_t* grad, int64_t U,
                                    int64_t d, imi::AdagradCoef coef, cudaStream_t stream);

// ---- retrieval (search.cu) ---------------------------------------------------------------------
// Bytes of one block's visit workspace for K codewords (a multiple of 16).
size_t search_visit_slice_bytes(int64_t K);

// Cells each query visits (imi::CellVisit) until they hold >= budget classes: cells [B, C] (-1 after
// the last; C = min(K*K, budget)), counts [B]. s1/s2 [B, K], offsets [K*K+1] (checked). workspace:
// blocks * search_visit_slice_bytes(K) bytes; at most `blocks` blocks run.
cudaError_t launch_search_visit(const float* s1, const float* s2, int64_t B, int64_t K, const int64_t* offsets,
                                int64_t budget, int64_t* cells, int64_t C, int64_t* counts, void* workspace,
                                int64_t blocks, cudaStream_t stream);

// The classes of the visited cells, in visit order, and their exact logits (imi::class_logit):
// cand_ids / cand_scores [B, Cmax], Cmax >= every query's class count; entries past a query's count
// are left as the caller filled them (-1 / -inf). A class id outside [0, N) records its CSR position
// in first_bad and is written as -1 / -inf. scalar_t: float, double, __half, __nv_bfloat16;
// id_t: int64_t or int32_t.
template <typename scalar_t, typename id_t>
cudaError_t launch_search_score(const scalar_t* query, const scalar_t* weight, const scalar_t* bias, int64_t B,
                                int64_t d, int64_t N, const int64_t* offsets, const id_t* class_ids,
                                const int64_t* cells, int64_t C, int64_t* cand_ids,
                                typename imi::acc_type<scalar_t>::type* cand_scores, int64_t Cmax,
                                int64_t* first_bad, cudaStream_t stream);

}  // namespace cuda
}  // namespace imi_softmax
