// Operator schemas of the imi_softmax library. Backends register kernels in csrc/cpu and
// csrc/cuda; fakes and autograd are registered from Python (imi_softmax/_ops.py).
#include <torch/library.h>

#ifdef IMI_PYTHON_MODULE
#include <Python.h>

#include "cpu/serial_glue.h"

namespace {
// _C._set_serial_glue(on: bool) -> bool: the switch of csrc/cpu/serial_glue.h for the calling
// thread (imi_softmax/_serial_glue.py); returns whether it was on.
PyObject* py_set_serial_glue(PyObject*, PyObject* arg) {
  const int on = PyObject_IsTrue(arg);
  if (on < 0) return nullptr;
  return PyBool_FromLong(imi_softmax::set_serial_glue(on != 0));
}

// _C._kernel_threads() -> int: the threads parallel_chunks gives the calling thread's kernels.
PyObject* py_kernel_threads(PyObject*, PyObject*) { return PyLong_FromLong(imi_softmax::kernel_threads()); }

PyMethodDef module_methods[] = {
    {"_set_serial_glue", py_set_serial_glue, METH_O, "Serial torch glue on this thread (imi_softmax/_serial_glue.py)."},
    {"_kernel_threads", py_kernel_threads, METH_NOARGS, "Threads of the calling thread's kernels (csrc/cpu/serial_glue.h)."},
    {nullptr, nullptr, 0, nullptr}};
}  // namespace

extern "C" {
// Importing imi_softmax._C loads this shared library, which runs the registrations below.
// (The CMake build for C++ users is a plain shared library without this entry point.)
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, module_methods};
  return PyModule_Create(&module_def);
}
}
#endif

TORCH_LIBRARY(imi_softmax, m) {
  // k-means step: nearest codeword of each row of x [N, d] among centroids [K, d].
  m.def("assign_codewords(Tensor x, Tensor centroids) -> (Tensor codes, Tensor sqdist)");
  // Incremental refresh: codes (int32 [C] each) of the rows `rows` [C] of weight [N, d] (any float
  // dtype, widened to float32) against float32 codebooks, equal to assign_codewords' for the same
  // float32 rows: code2 of the residual row - codebook1[code1] (residual, rq) or of the row's last
  // columns with code1 of its first ones (pq). finite (bool []) is false when some row holds NaN/Inf
  // or has a float32 squared norm that overflows: the codes of such rows mean nothing.
  m.def("assign_rows(Tensor weight, Tensor rows, Tensor codebook1, Tensor codebook2, bool residual) -> "
        "(Tensor code1, Tensor code2, Tensor finite)");
  // Index build: cells CSR from the two code vectors, per-cell masses from the bias snapshot, and
  // per-cell alias tables over exp(bias) (alias_prob/alias_pos/beta_csr are empty without bias).
  // The index's per-class arrays (code1, code2, class_ids, alias_pos) are int32 (N < 2^31; every
  // op below takes exactly int32 for them and raises naming the dtype otherwise), offsets int64.
  m.def(
      "build_cells(Tensor code1, Tensor code2, Tensor? beta, int num_codewords) -> "
      "(Tensor offsets, Tensor class_ids, Tensor alias_prob, Tensor alias_pos, Tensor beta_csr, "
      "Tensor log_n, Tensor cell_mass, Tensor log_n_max)");
  // Incremental index update: the classes `changed` [C] (strictly ascending) get new codes and a
  // new bias snapshot [C]; returns the new (code1, code2, beta ([0] without bias)) followed by what
  // build_cells returns for them, equal to build_cells(new code1, new code2, new beta) bit for bit.
  m.def(
      "update_cells(Tensor offsets, Tensor class_ids, Tensor? alias_prob, Tensor? alias_pos, "
      "Tensor? beta_csr, Tensor log_n, Tensor cell_mass, Tensor log_n_max, Tensor code1, Tensor code2, "
      "Tensor? beta, Tensor changed, Tensor new_code1, Tensor new_code2, Tensor? new_beta, "
      "int num_codewords) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, "
      "Tensor, Tensor)");
  // The same update in place (CPU): the index's arrays are rewritten to what update_cells returns
  // (offsets, class_ids, alias tables, masses, code1, code2, beta), bit for bit, without a second
  // copy of the per-class arrays. Every argument is checked before any write; only an index whose
  // cells are not ascending can be refused half-way (the error says the index is then invalid).
  m.def(
      "update_cells_(Tensor(a!) offsets, Tensor(b!) class_ids, Tensor(c!)? alias_prob, Tensor(d!)? alias_pos, "
      "Tensor(e!)? beta_csr, Tensor(f!) log_n, Tensor(g!) cell_mass, Tensor(h!) log_n_max, Tensor(i!) code1, "
      "Tensor(j!) code2, Tensor(k!)? beta, Tensor changed, Tensor new_code1, Tensor new_code2, Tensor? new_beta, "
      "int num_codewords) -> ()");
  // Three-stage draw from the MIDX proposal. s1, s2: [B, K] float32 query scores per codebook.
  m.def(
      "midx_sample(Tensor s1, Tensor s2, Tensor log_n, Tensor cell_mass, Tensor log_n_max, "
      "Tensor offsets, Tensor class_ids, Tensor? alias_prob, Tensor? alias_pos, Tensor? beta_csr, "
      "int num_samples, Generator? generator, Tensor? targets=None, Tensor? beta=None, "
      "Tensor? code1=None, Tensor? code2=None) -> (Tensor ids, Tensor log_q, Tensor target_log_q)");
  // Same draw from an explicit Philox (seed, offset): identical samples on every backend. offset
  // counts 32-bit Philox outputs per query row (4 per draw; a multiple of 4).
  // targets [B, L] int64 (negative: ignored, log Q 0) -> target_log_q [B, L] from the same query
  // preparation as the draws (bit-equal to midx_log_prob); needs code1/code2 (beta by class id).
  m.def(
      "midx_sample_seeded(Tensor s1, Tensor s2, Tensor log_n, Tensor cell_mass, "
      "Tensor log_n_max, Tensor offsets, Tensor class_ids, Tensor? alias_prob, Tensor? alias_pos, "
      "Tensor? beta_csr, int num_samples, int seed, int offset, Tensor? targets=None, "
      "Tensor? beta=None, Tensor? code1=None, Tensor? code2=None) -> "
      "(Tensor ids, Tensor log_q, Tensor target_log_q)");
  // Exact normalized log Q(ids | query) for ids [B, L].
  m.def(
      "midx_log_prob(Tensor s1, Tensor s2, Tensor log_n, Tensor cell_mass, Tensor log_n_max, "
      "Tensor? beta, Tensor code1, Tensor code2, Tensor ids) -> Tensor");
  // Retrieval (approximate top-k from the index): the cells a query visits, in the multi-sequence
  // order of decreasing s1[k1] + s2[k2] (empty cells skipped), until they hold >= budget classes (or
  // every cell is out): cells [B, min(K*K, budget)] (cell k1 * K + k2, -1 after the last) and the
  // number of classes they hold [B].
  m.def("midx_search_cells(Tensor s1, Tensor s2, Tensor offsets, int budget) -> (Tensor cells, Tensor num_candidates)");
  // ... and the classes of those cells reranked exactly with query . weight_i + bias_i: the k best
  // (ids [B, k] int64, scores [B, k] in the accumulation dtype), best first (ties: smaller id on CPU,
  // torch.topk's order on CUDA). class_ids: int64 or int32; 0 <= k <= min(budget, N). rerank: the
  // CPU's order of the rerank, "query" (per query), "cell" (per visited cell, all its queries at
  // once) or "auto" (cell for batches of >= 64 queries); the result does not depend on it.
  m.def(
      "midx_search(Tensor query, Tensor weight, Tensor? bias, Tensor s1, Tensor s2, Tensor offsets, "
      "Tensor class_ids, int k, int budget, str rerank=\"auto\") -> (Tensor ids, Tensor scores)");
  // Fused sampled softmax. ids/log_q: [B, 1+M], column 0 = target. Returns per-row loss and lse.
  m.def(
      "sampled_softmax_forward(Tensor x, Tensor weight, Tensor? bias, Tensor ids, Tensor log_q, "
      "bool remove_accidental_hits, int ignore_index, bool sparse_grad) -> (Tensor loss, Tensor lse)");
  // The same forward for training: also coef [B, 1+M] (d loss_b / d u_bj for grad_loss = 1) and
  // grad_x [B, d] (d loss_b / d x_b), both in the accumulation dtype, computed while the weight rows
  // are in cache; autograd's backward scales them by grad_loss and never reads the weight again.
  m.def(
      "sampled_softmax_train(Tensor x, Tensor weight, Tensor? bias, Tensor ids, Tensor log_q, "
      "bool remove_accidental_hits, int ignore_index, bool sparse_grad) -> "
      "(Tensor loss, Tensor lse, Tensor coef, Tensor grad_x)");
  // Backward: grad of x and the per-column coefficients d loss_b / d u_bj (scaled by grad_loss).
  m.def(
      "sampled_softmax_backward(Tensor grad_loss, Tensor x, Tensor weight, Tensor? bias, "
      "Tensor ids, Tensor log_q, Tensor lse, bool remove_accidental_hits, int ignore_index) -> "
      "(Tensor grad_x, Tensor coef)");
  // Fused multi-label sampled softmax. ids/log_q: [B, L+M], columns [0, L) the row's positives
  // (-1 = padding), then M negatives; a negative equal to any positive of its row is masked when
  // remove_accidental_hits. Returns per-positive loss [B, L] and lse [B, L] (0 at pads).
  m.def(
      "multilabel_softmax_forward(Tensor x, Tensor weight, Tensor? bias, Tensor ids, Tensor log_q, "
      "int num_positives, bool remove_accidental_hits, bool sparse_grad) -> (Tensor loss, Tensor lse)");
  // Training forward for fixed positive weights pos_weight [B, L] (the reduction's): row_loss [B] =
  // sum_p pos_weight_bp loss_bp, and coef / grad_x of row_loss computed while each row's weight rows
  // are in cache; autograd's backward scales them by grad_row_loss and never reads the weight again.
  m.def(
      "multilabel_softmax_train(Tensor x, Tensor weight, Tensor? bias, Tensor ids, Tensor log_q, "
      "Tensor pos_weight, int num_positives, bool remove_accidental_hits, bool sparse_grad) -> "
      "(Tensor row_loss, Tensor coef, Tensor grad_x)");
  // Backward: grad of x and the per-column coefficients sum_p grad_loss_bp d loss_bp / d u_bc.
  m.def(
      "multilabel_softmax_backward(Tensor grad_loss, Tensor x, Tensor weight, Tensor? bias, Tensor ids, "
      "Tensor log_q, Tensor lse, int num_positives, bool remove_accidental_hits) -> (Tensor grad_x, Tensor coef)");
  // Weight/bias gradients from the coefficients: dense [N, d] and [N] ...
  m.def(
      "dense_weight_grad(Tensor coef, Tensor ids, Tensor x, int num_classes) -> "
      "(Tensor grad_weight, Tensor grad_bias)");
  // ... or only the touched rows: sorted unique ids, their weight-grad rows and bias grads.
  m.def(
      "sparse_weight_grad(Tensor coef, Tensor ids, Tensor x, int num_classes) -> "
      "(Tensor unique_ids, Tensor grad_weight_rows, Tensor grad_bias_rows)");
  // Row-sparse optimizer steps (imi_softmax.optim), in place on the listed rows of param and of its
  // float32 state, nothing else: rows [U] int64 strictly increasing in [0, N) (a coalesced sparse
  // gradient's indices; None: every row, grad dense), grad [U, d] ([U] for a bias [N]) of param's
  // dtype. Lazy Adam with the step count `step` (after this update) for bias correction:
  m.def(
      "row_sparse_adam_(Tensor(a!) param, Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq, Tensor? rows, "
      "Tensor grad, float lr, float beta1, float beta2, float eps, float weight_decay, int step) -> ()");
  // ... and FBGEMM's row-wise Adagrad, sum [N] float32 (one accumulator per row).
  m.def(
      "row_wise_adagrad_(Tensor(a!) param, Tensor(b!) sum, Tensor? rows, Tensor grad, float lr, float eps, "
      "float weight_decay) -> ()");
}
