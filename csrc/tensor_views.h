// Tensor -> raw-pointer views and the argument checks of every op, shared by the CPU and CUDA
// launch code (torch side only). Python validates user input first, for good messages; these checks
// guard what the kernels index with when the ops are called directly (imi_softmax.ops) or under
// torch.compile, where the Python checks do not run. Each check costs at most O(K^2) or O(size of
// the per-call inputs): index tensors of length N (class_ids, codes, alias tables) are checked where
// they are read, with a position flag (imi_softmax/index_check.h, check_no_bad_position).
#pragma once

#include <ATen/ATen.h>
#include <c10/util/safe_numerics.h>

#include <algorithm>
#include <initializer_list>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "imi_softmax/index_check.h"
#include "imi_softmax/proposal.h"

namespace imi_softmax {

// ---- devices and sizes -------------------------------------------------------------------------

struct NamedTensor {
  const char* name;
  const at::Tensor* t;  // null or undefined: absent
};
inline NamedTensor named(const char* name, const at::Tensor& t) { return {name, &t}; }
inline NamedTensor named(const char* name, const std::optional<at::Tensor>& t) {
  return {name, t.has_value() ? &*t : nullptr};
}

// Every given tensor on the device of the first one; the error names both.
inline void check_same_device(const char* op, std::initializer_list<NamedTensor> tensors) {
  const NamedTensor* first = nullptr;
  for (const NamedTensor& nt : tensors) {
    if (nt.t == nullptr || !nt.t->defined()) continue;
    if (first == nullptr) {
      first = &nt;
      continue;
    }
    TORCH_CHECK(nt.t->device() == first->t->device(), op, ": ", nt.name, " is on ", nt.t->device(),
                " but ", first->name, " is on ", first->t->device(), "; move them to one device");
  }
}

// a * b for a size computed from arguments (not from an existing tensor), without int64 overflow.
inline int64_t checked_size_product(const char* op, const char* what, int64_t a, int64_t b) {
  uint64_t out = 0;
  TORCH_CHECK(a >= 0 && b >= 0 && !c10::mul_overflows(static_cast<uint64_t>(a), static_cast<uint64_t>(b), &out) &&
                  out <= static_cast<uint64_t>(INT64_MAX),
              op, ": ", what, " = ", a, " * ", b, " does not fit in int64");
  return static_cast<int64_t>(out);
}

// K codewords per codebook: K*K cells, and the sampling ops build two K*K float tables per CPU
// thread (512 MiB at the cap; 32-bit indexing inside them), so K is capped far below where K*K
// overflows: 8192^2 = 67M cells is more than any catalogue needs.
constexpr int64_t kMaxCodewords = int64_t(1) << 13;

inline void check_num_codewords(const char* op, int64_t K) {
  TORCH_CHECK(K >= 1 && K <= kMaxCodewords, op, ": num_codewords (K, the width of s1/s2) must lie in [1, ",
              kMaxCodewords, "], got ", K);
}

// ---- index arrays: int32 -----------------------------------------------------------------------

// The index's per-class arrays (code1, code2, class_ids, alias_pos) are int32: class ids and CSR
// positions must fit, so an index holds fewer than 2^31 classes. Beyond that the head is sharded
// (each shard's index has its own ids from 0).
constexpr int64_t kMaxIndexClasses = INT32_MAX;

inline void check_index_classes(const char* op, int64_t n) {
  TORCH_CHECK(n <= kMaxIndexClasses, op, ": an index holds at most 2^31 - 1 = ", kMaxIndexClasses,
              " classes (its class ids and positions are int32), got ", n,
              ": shard the head over processes (IMISoftmax(..., process_group=pg)) so that each shard holds fewer");
}

// An index array (code1, code2, class_ids, alias_pos): int32 [n], contiguous. The error names the
// dtype and the fix (an older index kept int64 arrays: MIDXSampler.load_state_dict converts them).
inline void check_index_array(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.scalar_type() == at::kInt, op, ": ", name, " must be int32 (the MIDX index's class ids, codes ",
              "and positions are int32), got ", t.scalar_type(), ": convert it with .to(torch.int32) or rebuild the index");
  TORCH_CHECK(t.dim() == 1 && t.is_contiguous(), op, ": ", name, " must be contiguous [N], got ", t.sizes());
  check_index_classes(op, t.numel());
}

// ---- positions recorded at use -----------------------------------------------------------------

// A one-entry int64 flag for imi::record_bad_position, on the device of `like`.
inline at::Tensor bad_position_flag(const at::TensorOptions& like) {
  return at::full({1}, IMI_NO_BAD_POSITION, like.dtype(at::kLong));
}

// Raises if a loop recorded the flat position of an entry of `ids` (an int64 tensor) it could not
// use. `allowed` says what the entry may hold, `what` what it is ("class id", "position").
inline void check_no_bad_position(const char* op, const char* name, int64_t first_bad, const at::Tensor& ids,
                                  const std::string& allowed, const char* what = "class id") {
  if (first_bad == IMI_NO_BAD_POSITION) return;
  const int64_t value = ids.reshape(-1)[first_bad].item<int64_t>();
  std::string where = std::to_string(first_bad);
  if (ids.dim() == 2 && ids.size(1) > 0)
    where = std::to_string(first_bad / ids.size(1)) + ", " + std::to_string(first_bad % ids.size(1));
  TORCH_CHECK(false, op, ": ", name, " has ", what, " ", value, " at [", where, "] outside ", allowed);
}

// The same from a device flag: one device->host copy (on CUDA a synchronisation with the stream).
inline void check_no_bad_position(const char* op, const char* name, const at::Tensor& flag, const at::Tensor& ids,
                                  const std::string& allowed, const char* what = "class id") {
  check_no_bad_position(op, name, flag.item<int64_t>(), ids, allowed, what);
}

// ---- proposal ops: index views -----------------------------------------------------------------

template <typename T>
inline const T* optional_ptr(const std::optional<at::Tensor>& t) {
  return (t.has_value() && t->defined() && t->numel() > 0) ? t->data_ptr<T>() : nullptr;
}

inline bool present(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() && t->numel() > 0;
}

// An optional tensor made contiguous, or an undefined tensor when absent (the ops pass nullptr then).
inline at::Tensor contiguous_or_undefined(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? t->contiguous() : at::Tensor();
}

inline void check_query_scores(const at::Tensor& s1, const at::Tensor& s2) {
  TORCH_CHECK(s1.dim() == 2 && s2.dim() == 2 && s1.sizes() == s2.sizes(),
              "imi_softmax: s1 and s2 must both be [B, K], got ", s1.sizes(), " and ", s2.sizes());
  TORCH_CHECK(s1.scalar_type() == at::kFloat && s2.scalar_type() == at::kFloat,
              "imi_softmax: query scores must be float32");
  check_num_codewords("imi_softmax", s1.size(1));
}

// The sampling ops' scalars: draws per query, and the Philox offset (32-bit outputs per query row,
// 4 per draw, so a multiple of 4: see csrc/include/imi_softmax/philox.h).
inline void check_num_samples(int64_t num_samples) {
  TORCH_CHECK(num_samples >= 0, "midx_sample: num_samples must be >= 0, got ", num_samples);
}

inline void check_philox_offset(int64_t offset) {
  TORCH_CHECK(offset >= 0 && offset % 4 == 0,
              "midx_sample_seeded: offset counts 32-bit Philox outputs, 4 per draw: it must be a "
              "non-negative multiple of 4, got ", offset);
}

// midx_log_prob's ids: int64 [B, L] for B query rows.
inline void check_log_prob_ids(const at::Tensor& ids, int64_t B) {
  TORCH_CHECK(ids.dim() == 2 && ids.size(0) == B && ids.scalar_type() == at::kLong,
              "midx_log_prob: ids must be int64 [B, L] with B = ", B, ", got ", ids.sizes());
}

inline void check_cell_masses(int64_t K, const at::Tensor& log_n, const at::Tensor& cell_mass,
                              const at::Tensor& log_n_max) {
  check_num_codewords("imi_softmax", K);
  TORCH_CHECK(log_n.numel() == K * K && cell_mass.numel() == K * K,
              "imi_softmax: log_n and cell_mass must have K*K = ", K * K, " entries, got ", log_n.numel(),
              " and ", cell_mass.numel());
  TORCH_CHECK(log_n.scalar_type() == at::kFloat && cell_mass.scalar_type() == at::kFloat &&
                  log_n_max.scalar_type() == at::kFloat && log_n_max.numel() == 1,
              "imi_softmax: index masses must be float32 (log_n_max: one entry)");
  TORCH_CHECK(log_n.is_contiguous() && cell_mass.is_contiguous(), "imi_softmax: index masses must be contiguous");
}

// CSR offsets of K*K cells over n classes: [K*K+1], offsets[0] == 0, non-decreasing, last == n.
// O(K^2); one host read of the verdict (a synchronisation on CUDA).
inline void check_offsets(const char* op, int64_t K, const at::Tensor& offsets, int64_t n) {
  TORCH_CHECK(offsets.scalar_type() == at::kLong && offsets.dim() == 1 && offsets.is_contiguous() &&
                  offsets.numel() == K * K + 1,
              op, ": offsets must be contiguous int64 [K*K+1] = [", K * K + 1, "], got ", offsets.scalar_type(), " ",
              offsets.sizes());
  const int64_t KK = K * K;
  bool ok = true;
  if (offsets.is_cpu()) {  // a plain loop: no temporaries of K*K entries per call
    const int64_t* o = offsets.data_ptr<int64_t>();
    ok = o[0] == 0 && o[KK] == n;
    for (int64_t c = 0; ok && c < KK; ++c) ok = o[c] <= o[c + 1];
  } else {
    const auto bad = offsets.narrow(0, 1, KK).lt(offsets.narrow(0, 0, KK)).any().logical_or(
        offsets[0].ne(0).logical_or(offsets[KK].ne(n)));
    ok = !bad.item<bool>();
  }
  TORCH_CHECK(ok, op, ": offsets must start at 0, never decrease and end at len(class_ids) = ", n,
              " (got offsets[0] = ", offsets[0].item<int64_t>(), ", offsets[-1] = ", offsets[KK].item<int64_t>(), ")");
}

// Every tensor must already be contiguous and on the executing device.
// The cell masses every proposal op needs; the sampling and log_prob parts are filled by the
// two helpers below, which check what they point at.
inline imi::CellIndex make_cell_index(int64_t K, const at::Tensor& log_n, const at::Tensor& cell_mass,
                                      const at::Tensor& log_n_max) {
  check_cell_masses(K, log_n, cell_mass, log_n_max);
  imi::CellIndex ix{};
  ix.K = K;
  ix.log_n = log_n.data_ptr<float>();
  ix.cell_mass = cell_mass.data_ptr<float>();
  ix.log_n_max = log_n_max.data_ptr<float>();
  return ix;
}

// Sampling tables: offsets (checked in full, O(K^2)), class_ids [N >= 1] and, with a bias, the
// per-position alias_prob / alias_pos / beta_csr [N]. alias_pos values are positions read at use.
inline void check_sampling_tables(const char* op, int64_t K, const at::Tensor& offsets, const at::Tensor& class_ids,
                                  const std::optional<at::Tensor>& alias_prob,
                                  const std::optional<at::Tensor>& alias_pos,
                                  const std::optional<at::Tensor>& beta_csr) {
  check_index_array(op, "class_ids", class_ids);
  const int64_t n = class_ids.numel();
  TORCH_CHECK(n >= 1, op, ": the index holds no class (class_ids is empty)");
  check_offsets(op, K, offsets, n);
  TORCH_CHECK(present(alias_prob) == present(alias_pos) && present(alias_prob) == present(beta_csr),
              op, ": alias_prob, alias_pos and beta_csr must be given together");
  if (!present(alias_prob)) return;
  TORCH_CHECK(alias_prob->scalar_type() == at::kFloat && beta_csr->scalar_type() == at::kFloat,
              op, ": alias_prob and beta_csr must be float32");
  check_index_array(op, "alias_pos", *alias_pos);
  TORCH_CHECK(alias_prob->is_contiguous() && alias_pos->is_contiguous() && beta_csr->is_contiguous(),
              op, ": alias tables must be contiguous");
  TORCH_CHECK(alias_prob->numel() == n && alias_pos->numel() == n && beta_csr->numel() == n, op,
              ": alias_prob, alias_pos and beta_csr must have len(class_ids) = ", n, " entries, got ",
              alias_prob->numel(), ", ", alias_pos->numel(), " and ", beta_csr->numel());
}

inline void set_sampling_tables(imi::CellIndex& ix, const at::Tensor& offsets, const at::Tensor& class_ids,
                                const std::optional<at::Tensor>& alias_prob,
                                const std::optional<at::Tensor>& alias_pos,
                                const std::optional<at::Tensor>& beta_csr) {
  check_sampling_tables("midx_sample", ix.K, offsets, class_ids, alias_prob, alias_pos, beta_csr);
  ix.offsets = offsets.data_ptr<int64_t>();
  ix.class_ids = class_ids.data_ptr<int32_t>();
  ix.alias_prob = optional_ptr<float>(alias_prob);
  ix.alias_pos = optional_ptr<int32_t>(alias_pos);
  ix.beta_csr = optional_ptr<float>(beta_csr);
}

// code1 / code2 [N] int32 and beta [N] float32 (by class id) or absent. Code values are read at
// use: check_ids_and_codes checks those of the ids an op is given.
inline void check_codes(const at::Tensor& code1, const at::Tensor& code2, const char* op = "imi_softmax") {
  check_index_array(op, "code1", code1);
  check_index_array(op, "code2", code2);
  TORCH_CHECK(code1.sizes() == code2.sizes(), op, ": code1/code2 must have equal length, got ", code1.sizes(),
              " and ", code2.sizes());
}

inline void check_class_codes(const char* op, const std::optional<at::Tensor>& beta, const at::Tensor& code1,
                              const at::Tensor& code2) {
  check_codes(code1, code2, op);
  if (!present(beta)) return;
  TORCH_CHECK(beta->scalar_type() == at::kFloat && beta->is_contiguous() && beta->numel() == code1.numel(),
              op, ": beta must be contiguous float32 [N] = [", code1.numel(), "], got ", beta->scalar_type(), " ",
              beta->sizes());
}

inline void set_class_codes(imi::CellIndex& ix, const std::optional<at::Tensor>& beta,
                            const at::Tensor& code1, const at::Tensor& code2) {
  check_class_codes("midx_log_prob", beta, code1, code2);
  ix.beta = optional_ptr<float>(beta);
  ix.code1 = code1.data_ptr<int32_t>();
  ix.code2 = code2.data_ptr<int32_t>();
}

// ids [B, L]: every id in [0, N = len(code1)) and its codes in [0, K) (a negative id is allowed
// where `negative_marker`: the ignore marker of targets). O(B*L), one host read of the verdict.
inline void check_ids_and_codes(const char* op, const char* name, const at::Tensor& ids, const at::Tensor& code1,
                                const at::Tensor& code2, int64_t K, bool negative_marker = false) {
  TORCH_CHECK(ids.scalar_type() == at::kLong, op, ": ", name, " must be int64");
  if (ids.numel() == 0) return;
  const int64_t n = code1.numel();
  const auto flat = ids.reshape(-1);
  auto bad = flat.ge(n);
  if (!negative_marker) bad = bad.logical_or(flat.lt(0));
  if (n > 0) {
    const auto safe = flat.clamp(0, n - 1);
    const auto c1 = code1.index_select(0, safe), c2 = code2.index_select(0, safe);
    const auto bad_code = c1.lt(0).logical_or(c1.ge(K)).logical_or(c2.lt(0)).logical_or(c2.ge(K));
    bad = bad.logical_or(bad_code.logical_and(flat.ge(0)));
  }
  if (!bad.any().item<bool>()) return;
  const int64_t pos = bad.nonzero().select(1, 0)[0].item<int64_t>();
  const int64_t id = flat[pos].item<int64_t>();
  if (!imi::in_range(id, n))
    check_no_bad_position(op, name, pos, ids,
                          "[0, " + std::to_string(n) + ")" + (negative_marker ? " (or negative: ignored)" : ""));
  TORCH_CHECK(false, op, ": class ", id, " (in ", name, ") has codes (", code1[id].item<int32_t>(), ", ",
              code2[id].item<int32_t>(), ") outside [0, K = ", K, ")");
}

// The sampling op's optional targets [B, L] (scored with the draws' query preparation) and the class
// codes / beta they are read with. Checked in full at entry (O(B*L), one host read on CUDA), so the
// error names the first bad target and its [row, column]. `present` is false without targets.
struct SampleTargets {
  bool present = false;
  at::Tensor targets, code1, code2;
  std::optional<at::Tensor> beta;
  int64_t L = 0, N = 0;
};

inline SampleTargets sample_targets_inputs(const char* op, int64_t B, int64_t K,
                                           const std::optional<at::Tensor>& targets,
                                           const std::optional<at::Tensor>& beta,
                                           const std::optional<at::Tensor>& code1,
                                           const std::optional<at::Tensor>& code2) {
  SampleTargets t;
  if (!targets.has_value() || !targets->defined()) return t;
  TORCH_CHECK(targets->dim() == 2 && targets->size(0) == B && targets->scalar_type() == at::kLong,
              op, ": targets must be int64 [B, L] with B = ", B, ", got ", targets->sizes());
  TORCH_CHECK(code1.has_value() && code1->defined() && code2.has_value() && code2->defined(),
              op, ": targets need code1 and code2");
  t.code1 = code1->contiguous();
  t.code2 = code2->contiguous();
  check_codes(t.code1, t.code2, op);
  check_ids_and_codes(op, "targets", *targets, t.code1, t.code2, K, /*negative_marker=*/true);
  if (present(beta)) t.beta = beta->contiguous();
  check_class_codes(op, t.beta, t.code1, t.code2);
  t.targets = targets->contiguous();
  t.present = true;
  t.L = t.targets.size(1);
  t.N = t.code1.numel();
  return t;
}

// midx_sample's view of the index (with the targets' codes and bias when it has targets) and its
// outputs ids / log_q [B, M] and target_log_q [B, L], for s1 [B, K] already contiguous. ix points
// into the tables the caller holds and into tg's tensors, so both must outlive the op's loop or kernel.
struct SampleCall {
  imi::CellIndex ix{};
  SampleTargets tg;
  at::Tensor ids, log_q, target_log_q;
};

inline SampleCall midx_sample_call(const at::Tensor& s1, int64_t M, const at::Tensor& log_n,
                                   const at::Tensor& cell_mass, const at::Tensor& log_n_max, const at::Tensor& offsets,
                                   const at::Tensor& class_ids, const std::optional<at::Tensor>& alias_prob,
                                   const std::optional<at::Tensor>& alias_pos,
                                   const std::optional<at::Tensor>& beta_csr, const std::optional<at::Tensor>& targets,
                                   const std::optional<at::Tensor>& beta, const std::optional<at::Tensor>& code1,
                                   const std::optional<at::Tensor>& code2) {
  const int64_t B = s1.size(0), K = s1.size(1);
  SampleCall c;
  c.ix = make_cell_index(K, log_n, cell_mass, log_n_max);
  set_sampling_tables(c.ix, offsets, class_ids, alias_prob, alias_pos, beta_csr);
  // The targets' log Q come from the same query preparation as the draws (one per query).
  c.tg = sample_targets_inputs("midx_sample", B, K, targets, beta, code1, code2);
  if (c.tg.present) set_class_codes(c.ix, c.tg.beta, c.tg.code1, c.tg.code2);
  c.ids = at::empty({B, M}, s1.options().dtype(at::kLong));
  c.log_q = at::empty({B, M}, s1.options());
  c.target_log_q = at::empty({B, c.tg.L}, s1.options());
  return c;
}

// ---- build_cells / assign_codewords ------------------------------------------------------------

// A bias snapshot (beta, new_beta) must be finite: one NaN or Inf makes its cell's log-sum-exp NaN,
// and every draw and log Q read from that cell's mass would be NaN without an error. One O(n) pass
// (and, on CUDA, one host read) per build or update.
inline void check_finite_beta(const char* op, const char* name, const at::Tensor& beta) {
  TORCH_CHECK(beta.numel() == 0 || at::isfinite(beta).all().item<bool>(), op, ": ", name,
              " holds NaN or Inf (the bias snapshot must be finite): check the bias for NaN / Inf before building");
}

// code1 / code2 int32 [N], beta float32 [N] or absent, K in range. Returns the contiguous codes and
// beta (undefined when absent). Code values are checked by the backends (in the counting loop on
// CPU, one min/max read on CUDA).
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> build_cells_inputs(const at::Tensor& code1,
                                                                         const at::Tensor& code2,
                                                                         const std::optional<at::Tensor>& beta,
                                                                         int64_t K) {
  check_num_codewords("build_cells", K);
  TORCH_CHECK(code1.dim() == 1 && code1.sizes() == code2.sizes(),
              "build_cells: code1 and code2 must be [N] of equal length, got ", code1.sizes(), " and ", code2.sizes());
  TORCH_CHECK(code1.scalar_type() == at::kInt && code2.scalar_type() == at::kInt,
              "build_cells: code1 and code2 must be int32 (the index's codes are int32), got ", code1.scalar_type(),
              " and ", code2.scalar_type(), ": convert them with .to(torch.int32)");
  check_index_classes("build_cells", code1.numel());
  TORCH_CHECK(code1.numel() > 0, "build_cells: an index needs at least one class, got code1 and code2 of length 0");
  const bool has_beta = beta.has_value() && beta->defined();
  check_same_device("build_cells", {named("code1", code1), named("code2", code2), named("beta", beta)});
  at::Tensor b;
  if (has_beta) {
    TORCH_CHECK(beta->dim() == 1 && beta->size(0) == code1.size(0) && beta->scalar_type() == at::kFloat,
                "build_cells: beta must be float32 [N]");
    b = beta->contiguous();
    check_finite_beta("build_cells", "beta", b);
  }
  return {code1.contiguous(), code2.contiguous(), b};
}

// update_cells: an index built by build_cells (or update_cells) for code1/code2/beta, the rows
// `changed` [C] (strictly ascending, checked at use) and their new codes and new beta [C]. Returns
// whether the index has a bias. Shapes, dtypes, contiguity, devices and offsets are checked here
// (O(K^2)); ids and codes are checked where they are read.
inline bool update_cells_inputs(const char* op, int64_t K, const at::Tensor& offsets, const at::Tensor& class_ids,
                                const std::optional<at::Tensor>& alias_prob,
                                const std::optional<at::Tensor>& alias_pos,
                                const std::optional<at::Tensor>& beta_csr, const at::Tensor& log_n,
                                const at::Tensor& cell_mass, const at::Tensor& log_n_max, const at::Tensor& code1,
                                const at::Tensor& code2, const std::optional<at::Tensor>& beta,
                                const at::Tensor& changed, const at::Tensor& new_code1, const at::Tensor& new_code2,
                                const std::optional<at::Tensor>& new_beta) {
  check_num_codewords(op, K);
  check_same_device(op, {named("offsets", offsets), named("class_ids", class_ids), named("alias_prob", alias_prob),
                         named("alias_pos", alias_pos), named("beta_csr", beta_csr), named("log_n", log_n),
                         named("cell_mass", cell_mass), named("log_n_max", log_n_max), named("code1", code1),
                         named("code2", code2), named("beta", beta), named("changed", changed),
                         named("new_code1", new_code1), named("new_code2", new_code2), named("new_beta", new_beta)});
  check_cell_masses(K, log_n, cell_mass, log_n_max);
  check_codes(code1, code2, op);
  const int64_t N = code1.numel();
  TORCH_CHECK(class_ids.dim() == 1 && class_ids.numel() == N, op, ": class_ids must be [N] = [", N,
              "] (one entry per class of code1), got ", class_ids.sizes());
  check_sampling_tables(op, K, offsets, class_ids, alias_prob, alias_pos, beta_csr);
  const bool has_beta = beta.has_value() && beta->defined();
  TORCH_CHECK(has_beta == present(alias_prob), op,
              ": beta and the alias tables (alias_prob, alias_pos, beta_csr) must be given together: an index "
              "built with a bias has all four, one built without has none");
  if (has_beta)
    TORCH_CHECK(beta->scalar_type() == at::kFloat && beta->dim() == 1 && beta->numel() == N && beta->is_contiguous(),
                op, ": beta must be contiguous float32 [N] = [", N, "], got ", beta->scalar_type(), " ", beta->sizes());
  TORCH_CHECK(changed.scalar_type() == at::kLong && changed.dim() == 1 && changed.is_contiguous(), op,
              ": changed must be contiguous int64 [C] (the re-assigned class ids, ascending), got ",
              changed.scalar_type(), " ", changed.sizes());
  const int64_t C = changed.numel();
  TORCH_CHECK(new_code1.scalar_type() == at::kInt && new_code2.scalar_type() == at::kInt && new_code1.dim() == 1 &&
                  new_code2.dim() == 1 && new_code1.numel() == C && new_code2.numel() == C &&
                  new_code1.is_contiguous() && new_code2.is_contiguous(),
              op, ": new_code1 and new_code2 must be contiguous int32 [C] = [", C, "] like changed (the index's ",
              "codes are int32), got ", new_code1.scalar_type(), " ", new_code1.sizes(), " and ",
              new_code2.scalar_type(), " ", new_code2.sizes());
  const bool has_new_beta = new_beta.has_value() && new_beta->defined();
  TORCH_CHECK(has_new_beta == has_beta, op, ": new_beta must be given exactly when the index has a bias (beta)");
  if (has_beta)
    TORCH_CHECK(new_beta->scalar_type() == at::kFloat && new_beta->dim() == 1 && new_beta->numel() == C &&
                    new_beta->is_contiguous(),
                op, ": new_beta must be contiguous float32 [C] = [", C, "] like changed, got ",
                new_beta->scalar_type(), " ", new_beta->sizes());
  if (has_beta) check_finite_beta(op, "new_beta", *new_beta);
  return has_beta;
}

inline std::string code_range_error(int64_t K) { return "out of range [0, " + std::to_string(K) + ")"; }

inline void check_assign_inputs(const at::Tensor& x, const at::Tensor& centroids) {
  TORCH_CHECK(x.dim() == 2 && centroids.dim() == 2 && x.size(1) == centroids.size(1),
              "assign_codewords: x [N, d] and centroids [K, d] expected, got ", x.sizes(), " and ",
              centroids.sizes());
  TORCH_CHECK(x.scalar_type() == centroids.scalar_type(), "assign_codewords: x and centroids dtypes differ");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "assign_codewords: float32 or float64 expected, got ", x.scalar_type());
  TORCH_CHECK(centroids.size(0) > 0, "assign_codewords: no centroids");
  check_same_device("assign_codewords", {named("x", x), named("centroids", centroids)});
}

// assign_rows: weight [N, d] (float32/64, float16, bfloat16), rows int64 [C], float32 codebooks:
// [K1, d] and [K2, d] with `residual` (rq), [K1, h] and [K2, d - h] without (pq, the two halves of
// each row). Row ids are checked by the backends before a row is read (CPU: at use, position flag).
inline void check_assign_rows_inputs(const at::Tensor& weight, const at::Tensor& rows, const at::Tensor& codebook1,
                                     const at::Tensor& codebook2, bool residual) {
  constexpr const char* op = "assign_rows";
  TORCH_CHECK(weight.dim() == 2, op, ": weight must be [N, d], got ", weight.sizes());
  const auto wt = weight.scalar_type();
  TORCH_CHECK(wt == at::kFloat || wt == at::kDouble || wt == at::kHalf || wt == at::kBFloat16, op,
              ": weight must be float32, float64, float16 or bfloat16, got ", wt);
  TORCH_CHECK(rows.scalar_type() == at::kLong && rows.dim() == 1, op, ": rows must be int64 [C] (class ids), got ",
              rows.scalar_type(), " ", rows.sizes());
  TORCH_CHECK(codebook1.scalar_type() == at::kFloat && codebook2.scalar_type() == at::kFloat && codebook1.dim() == 2 &&
                  codebook2.dim() == 2,
              op, ": codebook1 and codebook2 must be float32 [K, width], got ", codebook1.scalar_type(), " ",
              codebook1.sizes(), " and ", codebook2.scalar_type(), " ", codebook2.sizes());
  check_num_codewords(op, codebook1.size(0));
  check_num_codewords(op, codebook2.size(0));
  const int64_t d = weight.size(1);
  if (residual) {
    TORCH_CHECK(codebook1.size(1) == d && codebook2.size(1) == d, op, ": with residual=True both codebooks must be [K, ",
                d, "] like weight's rows, got ", codebook1.sizes(), " and ", codebook2.sizes());
  } else {
    TORCH_CHECK(codebook1.size(1) >= 1 && codebook2.size(1) >= 1 && codebook1.size(1) + codebook2.size(1) == d, op,
                ": with residual=False the codebooks' widths must add up to weight's d = ", d,
                " (codebook1 for the first columns, codebook2 for the rest), got ", codebook1.sizes(), " and ",
                codebook2.sizes());
  }
  check_index_classes(op, rows.numel());
  check_same_device(op, {named("weight", weight), named("rows", rows), named("codebook1", codebook1),
                         named("codebook2", codebook2)});
}

// ---- loss and weight gradients -----------------------------------------------------------------

// Accumulation dtype of the loss ops: float64 for float64 inputs, float32 otherwise.
inline at::ScalarType acc_scalar_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// What column j of the loss ops' ids may hold (their ids are checked at use: imi::valid_column_id).
inline std::string loss_ids_allowed(int64_t num_classes, int64_t ignore_index) {
  return "[0, " + std::to_string(num_classes) + ") (column 0: or ignore_index = " + std::to_string(ignore_index) +
         ")";
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
  TORCH_CHECK(ids.dim() == 2 && ids.size(0) == x.size(0) && ids.size(1) >= 1 && ids.scalar_type() == at::kLong,
              "imi_softmax: ids must be int64 [B, 1+M] (column 0: the target), got ", ids.scalar_type(), " ",
              ids.sizes());
  TORCH_CHECK(log_q.sizes() == ids.sizes(), "imi_softmax: log_q must match ids' shape");
  const auto acc = acc_scalar_type(x.scalar_type());
  TORCH_CHECK(log_q.scalar_type() == acc, "imi_softmax: log_q must be ", acc, " for x of ",
              x.scalar_type());
  check_same_device("sampled_softmax", {named("x", x), named("weight", weight), named("bias", bias),
                                        named("ids", ids), named("log_q", log_q)});
}

// The loss ops' inputs made contiguous (bias: undefined when absent). Held by value in the op, so
// the raw pointers its loop or kernel reads stay valid until the op returns.
struct LossTensors {
  at::Tensor x, weight, ids, log_q, bias;

  // The CPU row loops' raw pointers: x, weight, bias (nullptr when absent), ids, log_q.
  template <typename scalar_t, typename acc_t>
  std::tuple<const scalar_t*, const scalar_t*, const scalar_t*, const int64_t*, const acc_t*> pointers() const {
    return {x.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(), bias.defined() ? bias.data_ptr<scalar_t>() : nullptr,
            ids.data_ptr<int64_t>(), log_q.data_ptr<acc_t>()};
  }
};

inline LossTensors contiguous_loss_inputs(const at::Tensor& x, const at::Tensor& weight,
                                          const std::optional<at::Tensor>& bias, const at::Tensor& ids,
                                          const at::Tensor& log_q) {
  return {x.contiguous(), weight.contiguous(), ids.contiguous(), log_q.contiguous(), contiguous_or_undefined(bias)};
}

// The loss backward ops' grad_loss and lse converted to the accumulation dtype, and their outputs
// grad_x (x's dtype) and coef [B, width] (accumulation dtype). Held by value in the op, so the raw
// pointers its loop or kernel reads stay valid until the op returns.
struct LossBackwardTensors {
  at::Tensor grad_loss, lse, grad_x, coef;
};

inline LossBackwardTensors loss_backward_tensors(const at::Tensor& grad_loss, const at::Tensor& lse,
                                                 const at::Tensor& x, int64_t width) {
  const auto acc = acc_scalar_type(x.scalar_type());
  return {grad_loss.to(acc).contiguous(), lse.to(acc).contiguous(), at::empty_like(x),
          at::empty({x.size(0), width}, x.options().dtype(acc))};
}

// sampled_softmax_backward's grad_loss and lse: [B] on x's device, any floating dtype (converted).
inline void check_loss_backward_inputs(const at::Tensor& grad_loss, const at::Tensor& lse, const at::Tensor& x) {
  TORCH_CHECK(grad_loss.numel() == x.size(0) && lse.numel() == x.size(0),
              "sampled_softmax_backward: grad_loss and lse must be [B] = [", x.size(0), "], got ", grad_loss.sizes(),
              " and ", lse.sizes());
  TORCH_CHECK(at::isFloatingType(grad_loss.scalar_type()) && at::isFloatingType(lse.scalar_type()),
              "sampled_softmax_backward: grad_loss and lse must be floating point");
  check_same_device("sampled_softmax_backward", {named("x", x), named("grad_loss", grad_loss), named("lse", lse)});
}

// multilabel_softmax_forward/backward: ids [B, L+M] (L positives, -1 = padding, then M negatives)
// and log_q of ids' shape in the accumulation dtype; the rest as check_loss_inputs.
inline void check_multilabel_inputs(const char* op, const at::Tensor& x, const at::Tensor& weight,
                                    const std::optional<at::Tensor>& bias, const at::Tensor& ids,
                                    const at::Tensor& log_q, int64_t num_positives) {
  check_loss_inputs(x, weight, bias, ids, log_q);
  TORCH_CHECK(num_positives >= 0 && num_positives <= ids.size(1), op, ": num_positives must be in [0, ", ids.size(1),
              "] (ids is [B, L+M] with L = num_positives), got ", num_positives);
}

// What column c of the multilabel ops' ids may hold (checked at use: imi::valid_multilabel_id).
inline std::string multilabel_ids_allowed(int64_t num_classes) {
  return "[0, " + std::to_string(num_classes) + ") (the positive columns: or -1, padding)";
}

// multilabel_softmax_backward's grad_loss and lse: [B, L] on x's device, floating point (converted).
inline void check_multilabel_backward_inputs(const at::Tensor& grad_loss, const at::Tensor& lse, const at::Tensor& x,
                                             int64_t num_positives) {
  const std::vector<int64_t> want{x.size(0), num_positives};
  TORCH_CHECK(grad_loss.sizes() == at::IntArrayRef(want) && lse.sizes() == at::IntArrayRef(want),
              "multilabel_softmax_backward: grad_loss and lse must be [B, L] = [", x.size(0), ", ", num_positives,
              "], got ", grad_loss.sizes(), " and ", lse.sizes());
  TORCH_CHECK(at::isFloatingType(grad_loss.scalar_type()) && at::isFloatingType(lse.scalar_type()),
              "multilabel_softmax_backward: grad_loss and lse must be floating point");
  check_same_device("multilabel_softmax_backward", {named("x", x), named("grad_loss", grad_loss), named("lse", lse)});
}

// multilabel_softmax_train's pos_weight: [B, L] on x's device, in the accumulation dtype of x.
inline void check_multilabel_pos_weight(const at::Tensor& pos_weight, const at::Tensor& x, int64_t num_positives) {
  const std::vector<int64_t> want{x.size(0), num_positives};
  TORCH_CHECK(pos_weight.sizes() == at::IntArrayRef(want), "multilabel_softmax_train: pos_weight must be [B, L] = [",
              x.size(0), ", ", num_positives, "], got ", pos_weight.sizes());
  TORCH_CHECK(pos_weight.scalar_type() == acc_scalar_type(x.scalar_type()),
              "multilabel_softmax_train: pos_weight must have the accumulation dtype of x (",
              acc_scalar_type(x.scalar_type()), "), got ", pos_weight.scalar_type());
  check_same_device("multilabel_softmax_train", {named("x", x), named("pos_weight", pos_weight)});
}

// What the weight-gradient ops' ids may hold (checked at use: imi::weight_grad_entry).
inline std::string weight_grad_ids_allowed(int64_t num_classes) {
  return "[0, num_classes = " + std::to_string(num_classes) + ") (-1, or any id with coef 0, is skipped)";
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
  checked_size_product(op, "num_classes * d", num_classes, x.size(1));
  check_same_device(op, {named("x", x), named("coef", coef), named("ids", ids)});
  return {coef.contiguous(), ids.contiguous(), x.contiguous()};
}


// ---- retrieval (midx_search_cells, midx_search) -------------------------------------------------

// The cells a search visits for `budget` candidates: at most one per candidate and at most K*K.
inline int64_t search_max_cells(int64_t K, int64_t budget) { return std::min<int64_t>(K * K, budget); }

// midx_search's rerank order: "query" (each query reads its candidates' rows), "cell" (CPU: the
// batch inverted into per-cell query lists, each visited cell's rows read once per batch), "auto".
// Same result either way; CUDA has one kernel and accepts all three.
enum class SearchRerank { Auto, Query, Cell };

inline SearchRerank parse_search_rerank(const char* op, const std::string& rerank) {
  if (rerank == "auto") return SearchRerank::Auto;
  if (rerank == "query") return SearchRerank::Query;
  if (rerank == "cell") return SearchRerank::Cell;
  TORCH_CHECK(false, op, ": rerank must be 'auto', 'query' or 'cell', got '", rerank, "'");
}

// The error of a query row whose scores s1/s2 are not all finite; MIDXSampler recognizes "hold NaN or
// Inf" to name the cause (query or overflow).
inline void fail_scores_not_finite(const char* op, int64_t row) {
  TORCH_CHECK(false, op, ": the query scores s1/s2 of row ", row, " hold NaN or Inf: the query holds NaN or Inf, ",
              "or query . codeword overflows float32 (scale the query or the weight down)");
}

// s1/s2 all finite (one reduction, and a sync on CUDA; the search ops sync anyway). The search ranks
// the codewords by score: a NaN has no rank, so a rank would stay unfilled (the CUDA walk would read
// cells through it) and the CPU's sort would be undefined.
inline void check_finite_scores(const char* op, const at::Tensor& s1, const at::Tensor& s2) {
  if (s1.numel() == 0) return;
  const at::Tensor row_ok = at::isfinite(s1).all(1).logical_and_(at::isfinite(s2).all(1));
  if (row_ok.all().item<bool>()) return;
  fail_scores_not_finite(op, row_ok.logical_not().nonzero()[0][0].item<int64_t>());
}

// midx_search_cells' s1/s2 [B, K] and the shape of offsets [K*K+1]; returns K*K.
inline int64_t check_search_cells_shapes(const at::Tensor& s1, const at::Tensor& s2, const at::Tensor& offsets) {
  check_query_scores(s1, s2);
  const int64_t KK = s1.size(1) * s1.size(1);
  TORCH_CHECK(offsets.scalar_type() == at::kLong && offsets.dim() == 1 && offsets.numel() == KK + 1,
              "midx_search_cells: offsets must be int64 [K*K+1] = [", KK + 1, "], got ", offsets.scalar_type(), " ",
              offsets.sizes());
  return KK;
}

// s1/s2 [B, K] float32, offsets [K*K+1] int64 (checked in full, O(K^2), against n classes), budget >= 1.
inline void check_search_cells_inputs(const char* op, const at::Tensor& s1, const at::Tensor& s2,
                                      const at::Tensor& offsets, int64_t n, int64_t budget) {
  check_query_scores(s1, s2);
  TORCH_CHECK(budget >= 1, op, ": budget (candidates to collect per query) must be >= 1, got ", budget);
  check_same_device(op, {named("s1", s1), named("s2", s2), named("offsets", offsets)});
  check_offsets(op, s1.size(1), offsets, n);
  check_finite_scores(op, s1, s2);
}

// midx_search: query [B, d] and weight [N, d] of one floating dtype, bias [N] of that dtype or absent,
// class_ids [N] int64 or int32 (the index of this weight: one entry per class; values are checked
// where they are read), 0 <= k <= min(budget, N). Returns N.
inline int64_t check_search_inputs(const char* op, const at::Tensor& query, const at::Tensor& weight,
                                   const std::optional<at::Tensor>& bias, const at::Tensor& s1,
                                   const at::Tensor& s2, const at::Tensor& offsets, const at::Tensor& class_ids,
                                   int64_t k, int64_t budget) {
  TORCH_CHECK(query.dim() == 2 && weight.dim() == 2 && query.size(1) == weight.size(1), op,
              ": query [B, d] and weight [N, d] expected, got ", query.sizes(), " and ", weight.sizes());
  TORCH_CHECK(query.scalar_type() == weight.scalar_type(), op, ": query is ", query.scalar_type(), " but weight is ",
              weight.scalar_type(), "; cast the query to the weight's dtype");
  TORCH_CHECK(at::isFloatingType(weight.scalar_type()), op, ": weight must be floating point, got ",
              weight.scalar_type());
  if (bias.has_value() && bias->defined())
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0) && bias->scalar_type() == weight.scalar_type(),
                op, ": bias must be [N] = [", weight.size(0), "] with weight's dtype, got ", bias->scalar_type(), " ",
                bias->sizes());
  TORCH_CHECK(s1.dim() == 2 && s1.size(0) == query.size(0), op, ": s1/s2 must have one row per query (B = ",
              query.size(0), "), got ", s1.sizes());
  TORCH_CHECK((class_ids.scalar_type() == at::kLong || class_ids.scalar_type() == at::kInt) && class_ids.dim() == 1 &&
                  class_ids.is_contiguous(),
              op, ": class_ids must be contiguous int64 or int32 [N], got ", class_ids.scalar_type(), " ",
              class_ids.sizes());
  const int64_t N = weight.size(0);
  TORCH_CHECK(class_ids.numel() == N, op, ": the index holds ", class_ids.numel(), " classes but weight has ", N,
              " rows; rebuild the index from this weight");
  TORCH_CHECK(k >= 0 && k <= N, op, ": k must lie in [0, N = ", N, "], got ", k);
  TORCH_CHECK(budget >= k, op, ": budget (", budget, ") must be >= k (", k, ")");
  check_same_device(op, {named("query", query), named("weight", weight), named("bias", bias), named("s1", s1),
                         named("s2", s2), named("offsets", offsets), named("class_ids", class_ids)});
  check_search_cells_inputs(op, s1, s2, offsets, N, std::max<int64_t>(budget, 1));
  return N;
}

// ---- row-sparse optimizer steps (row_sparse_adam_, row_wise_adagrad_) ----------------------------

// Shapes of one row-sparse optimizer step: param [N, d] (or [N], d = 1), U updated rows.
struct RowOptimShape {
  int64_t N = 0, d = 1, U = 0;
  bool all_rows = false;  // rows absent: grad covers every row (a dense gradient)
  at::Tensor grad, rows;  // contiguous grad and (unless all_rows) rows, owned here: kernels read them
  const int64_t* rows_ptr() const { return all_rows ? nullptr : rows.data_ptr<int64_t>(); }
};

// lazy Adam's step count after the update (the bias corrections divide by 1 - beta^step)
inline void check_adam_step(int64_t step) {
  TORCH_CHECK(step >= 1, "row_sparse_adam_: step must be >= 1 (the step count after this update), got ", step);
}

// Checks what the row-sparse optimizer ops index with and write to: param (float32, bfloat16 or
// float16, contiguous: it is updated in place), float32 contiguous state tensors of shape
// state_shape, grad [U, d] ([U] for a 1-D param) of param's dtype, rows int64 [U] strictly
// increasing in [0, N) (absent: grad has param's shape). O(U), one host read of the verdict on
// CUDA. Returns the shape; grad and rows are only read, so callers make them contiguous.
inline RowOptimShape row_optim_inputs(const char* op, const at::Tensor& param,
                                      std::initializer_list<NamedTensor> state, at::IntArrayRef state_shape,
                                      const std::optional<at::Tensor>& rows, const at::Tensor& grad) {
  TORCH_CHECK(param.dim() == 1 || param.dim() == 2, op, ": param must be a weight [N, d] or a bias [N], got ",
              param.sizes());
  const auto dt = param.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf, op,
              ": param must be float32, bfloat16 or float16, got ", dt);
  TORCH_CHECK(param.is_contiguous(), op, ": param must be contiguous (it is updated in place)");
  RowOptimShape s;
  s.N = param.size(0);
  s.d = param.dim() == 2 ? param.size(1) : 1;
  for (const NamedTensor& nt : state) {
    TORCH_CHECK(nt.t != nullptr && nt.t->defined(), op, ": ", nt.name, " is missing");
    TORCH_CHECK(nt.t->scalar_type() == at::kFloat && nt.t->is_contiguous() && nt.t->sizes() == state_shape, op,
                ": ", nt.name, " must be contiguous float32 ", state_shape, ", got ", nt.t->scalar_type(), " ",
                nt.t->sizes(), (nt.t->is_contiguous() ? "" : " (not contiguous)"));
  }
  TORCH_CHECK(grad.scalar_type() == dt, op, ": grad must have param's dtype ", dt, ", got ", grad.scalar_type());
  std::vector<NamedTensor> all = {named("param", param), named("grad", grad), named("rows", rows)};
  all.insert(all.end(), state.begin(), state.end());
  for (const NamedTensor& nt : all) check_same_device(op, {all.front(), nt});
  s.all_rows = !(rows.has_value() && rows->defined());
  if (s.all_rows) {
    TORCH_CHECK(grad.sizes() == param.sizes(), op, ": without rows, grad must have param's shape ", param.sizes(),
                ", got ", grad.sizes());
    s.U = s.N;
    s.grad = grad.contiguous();
    return s;
  }
  TORCH_CHECK(rows->scalar_type() == at::kLong && rows->dim() == 1, op, ": rows must be int64 [U], got ",
              rows->scalar_type(), " ", rows->sizes());
  s.U = rows->size(0);
  s.rows = rows->contiguous();
  s.grad = grad.contiguous();
  const bool shape_ok = param.dim() == 2 ? (grad.dim() == 2 && grad.size(0) == s.U && grad.size(1) == s.d)
                                         : (grad.dim() == 1 && grad.size(0) == s.U);
  TORCH_CHECK(shape_ok, op, ": grad must hold one row per entry of rows: ",
              (param.dim() == 2 ? "[U, d] = [" + std::to_string(s.U) + ", " + std::to_string(s.d) + "]"
                                : "[U] = [" + std::to_string(s.U) + "]"),
              ", got ", grad.sizes());
  if (s.U == 0) return s;
  // Each row is updated by one thread without atomics: the rows must be distinct, and sorted rows
  // (a coalesced COO gradient's indices) make that an O(U) check.
  int64_t bad = -1;
  if (rows->is_cpu()) {
    const int64_t* p = s.rows.data_ptr<int64_t>();
    for (int64_t u = 0; u < s.U && bad < 0; ++u)
      if (!imi::in_range(p[u], s.N) || (u > 0 && p[u] <= p[u - 1])) bad = u;
  } else {
    auto flags = rows->lt(0).logical_or(rows->ge(s.N));
    if (s.U > 1) flags.narrow(0, 1, s.U - 1).logical_or_(rows->narrow(0, 1, s.U - 1).le(rows->narrow(0, 0, s.U - 1)));
    if (flags.any().item<bool>()) bad = flags.nonzero().select(1, 0)[0].item<int64_t>();
  }
  if (bad >= 0) {
    const int64_t value = (*rows)[bad].item<int64_t>();
    TORCH_CHECK(imi::in_range(value, s.N), op, ": rows has ", value, " at [", bad, "] outside [0, N = ", s.N, ")");
    TORCH_CHECK(false, op, ": rows must be strictly increasing (distinct rows, as the indices of a coalesced sparse "
                "gradient are; call grad.coalesce()), but rows[", bad, "] = ", value, " <= rows[", bad - 1,
                "] = ", (*rows)[bad - 1].item<int64_t>());
  }
  return s;
}

}  // namespace imi_softmax
