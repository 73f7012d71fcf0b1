// Retrieval on CPU: per query, the multi-sequence visit of the cells (imi_softmax/search.h), the
// classes of the visited cells reranked exactly, and a bounded top-k per query. Two rerank orders
// with the same result (the same candidates, the same class_logit per (query, class), the same strict
// top-k order, so the same ids and bit-identical scores):
// - query-major (search_loop): each query scores its cells' classes as they come; no candidate list
//   is stored (O(K + k) scratch per thread); every query reads its candidates' weight rows itself.
// - cell-major (search_cell_major): the batch's cell lists are inverted into per-cell query lists and
//   each visited cell scores all its visiting queries at once, so a row is read from memory once per
//   batch rather than once per visiting query (the rerank is bound by those scattered row reads).
// Queries / cells are claimed in small chunks (parallel_chunks.h).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <string>
#include <type_traits>
#include <mutex>
#include <numeric>
#include <vector>

#include "../tensor_views.h"
#include "imi_softmax/search.h"
#include "parallel_chunks.h"

namespace imi_softmax {
namespace {

// Per-thread work areas of one query's visit: the two sorted codeword lists and the heap.
struct VisitScratch {
  std::vector<int32_t> order1, order2;
  std::vector<float> sorted1, sorted2;
  std::vector<imi::VisitEntry> heap;

  explicit VisitScratch(int64_t K) : order1(K), order2(K), sorted1(K), sorted2(K), heap(K) {}

  // Sorts the query's two score lists (the order of imi::codeword_before, a strict total order, so
  // any correct sort gives the CUDA kernel's ranks) and starts the walk.
  imi::CellVisit start(const float* s1, const float* s2, int32_t K) {
    sort_list(s1, K, order1, sorted1);
    sort_list(s2, K, order2, sorted2);
    imi::CellVisit v{sorted1.data(), sorted2.data(), order1.data(), order2.data(), heap.data(), K, 0};
    v.start();
    return v;
  }

  static void sort_list(const float* s, int32_t K, std::vector<int32_t>& order, std::vector<float>& sorted) {
    std::iota(order.begin(), order.end(), 0);
    std::sort(order.begin(), order.end(), [s](int32_t a, int32_t b) { return imi::codeword_before(s, a, b); });
    for (int32_t r = 0; r < K; ++r) sorted[r] = s[order[r]];
  }
};

std::tuple<at::Tensor, at::Tensor> midx_search_cells_cpu(const at::Tensor& s1_in, const at::Tensor& s2_in,
                                                         const at::Tensor& offsets, int64_t budget) {
  const int64_t KK = check_search_cells_shapes(s1_in, s2_in, offsets);
  const int64_t n = offsets[KK].item<int64_t>();  // the class count; check_offsets checks the rest
  check_search_cells_inputs("midx_search_cells", s1_in, s2_in, offsets, n, budget);
  const auto s1 = s1_in.contiguous(), s2 = s2_in.contiguous();
  const int64_t B = s1.size(0), K = s1.size(1), C = search_max_cells(K, budget);
  auto cells = at::full({B, C}, -1, offsets.options());
  auto counts = at::zeros({B}, offsets.options());
  const float* s1p = s1.data_ptr<float>();
  const float* s2p = s2.data_ptr<float>();
  const int64_t* off = offsets.data_ptr<int64_t>();
  int64_t* cp = cells.data_ptr<int64_t>();
  int64_t* np = counts.data_ptr<int64_t>();
  parallel_chunks(B, 4, [&](ChunkQueue& queue) {
    VisitScratch ws(K);
    for (int64_t b0, b1; queue.next(b0, b1);)
      for (int64_t b = b0; b < b1; ++b) {
        imi::CellVisit visit = ws.start(s1p + b * K, s2p + b * K, static_cast<int32_t>(K));
        int64_t count = 0, c, v = 0;
        while (count < budget && (c = visit.next(off)) >= 0) {
          cp[b * C + v++] = c;
          count += off[c + 1] - off[c];
        }
        np[b] = count;
      }
  });
  return {cells, counts};
}

template <typename scalar_t, typename id_t>
void search_loop(const at::Tensor& query, const at::Tensor& weight, const at::Tensor& bias, const float* s1p,
                 const float* s2p, const int64_t* off, const id_t* cls, int64_t K, int64_t N, int64_t k,
                 int64_t budget, at::Tensor& ids, at::Tensor& scores, int64_t* first_bad) {
  using acc_t = typename imi::acc_type<scalar_t>::type;
  const int64_t B = query.size(0), d = query.size(1);
  const scalar_t* hp = query.data_ptr<scalar_t>();
  const scalar_t* wp = weight.data_ptr<scalar_t>();
  const scalar_t* bp = bias.defined() ? bias.data_ptr<scalar_t>() : nullptr;
  int64_t* idp = ids.data_ptr<int64_t>();
  acc_t* vp = scores.data_ptr<acc_t>();
  const auto to_acc = [](scalar_t v) { return static_cast<acc_t>(v); };
  // The rows of a cell's classes are scattered in weight: the loop is bound by DRAM latency, not by
  // the dot products. Candidates are scored from a buffer of a few cells' ids, each row prefetched
  // whole kAhead candidates before its turn (across cell boundaries; cells hold ~10-100 classes).
  constexpr int64_t kBatch = 256, kAhead = 8;
  const int64_t row_bytes = d * static_cast<int64_t>(sizeof(scalar_t));
  const auto prefetch_row = [&](int64_t i) {
    const char* r = reinterpret_cast<const char*>(wp + i * d);
    for (int64_t o = 0; o < row_bytes; o += 64) IMI_PREFETCH(r + o);
  };
  parallel_chunks(B, 1, [&](ChunkQueue& queue) {
    VisitScratch ws(K);
    std::vector<int64_t> batch;
    batch.reserve(2 * kBatch);
    for (int64_t b0, b1; queue.next(b0, b1);)
      for (int64_t b = b0; b < b1; ++b) {
        imi::CellVisit visit = ws.start(s1p + b * K, s2p + b * K, static_cast<int32_t>(K));
        imi::TopK<acc_t> top{vp + b * k, idp + b * k, k, 0};
        const scalar_t* h = hp + b * d;
        const auto score_batch = [&] {
          const int64_t n = static_cast<int64_t>(batch.size());
          for (int64_t t = 0; t < std::min(n, kAhead); ++t) prefetch_row(batch[t]);
          for (int64_t t = 0; t < n; ++t) {
            if (t + kAhead < n) prefetch_row(batch[t + kAhead]);
            const int64_t i = batch[t];
            top.offer(imi::class_logit<acc_t>(h, wp + i * d, d, bp == nullptr ? nullptr : bp + i, to_acc), i);
          }
          batch.clear();
        };
        int64_t count = 0, c;
        while (count < budget && (c = visit.next(off)) >= 0) {
          for (int64_t p = off[c]; p < off[c + 1]; ++p) {
            const int64_t i = static_cast<int64_t>(cls[p]);
            if (imi::in_range(i, N)) batch.push_back(i);
            else imi::record_bad_position(first_bad, p);
          }
          count += off[c + 1] - off[c];
          if (static_cast<int64_t>(batch.size()) >= kBatch) score_batch();
        }
        score_batch();
        top.sort_best_first();
      }
  });
}

// Cell-major bounds per block of queries: queries, visited (query, cell) pairs at worst (block *
// min(K*K, budget); 8 bytes each in the lists and their inversion), and top-k entries per thread
// (12 bytes each for float32).
constexpr int64_t kCellMajorMaxBlock = 4096, kCellMajorMaxPairs = int64_t(1) << 25,
                  kCellMajorHeapEntries = int64_t(1) << 20;
// "auto" reranks cell-major from this batch size on (bench/retrieval.py, README "Approximate top-k").
constexpr int64_t kCellMajorMinQueries = 64;

// Cell-major rerank of queries [q0, q1). Threads claim visited cells and keep their own top-k heaps
// of every query (each class is a candidate of a query at most once, in one cell, so merging the
// threads' heaps under the strict top-k order gives exactly the query-major result).
template <typename scalar_t, typename id_t>
void search_cell_major_block(const at::Tensor& query, const at::Tensor& weight, const at::Tensor& bias,
                             const float* s1p, const float* s2p, const int64_t* off, const id_t* cls, int64_t K,
                             int64_t N, int64_t k, int64_t budget, int64_t q0, int64_t q1, at::Tensor& ids,
                             at::Tensor& scores, int64_t* first_bad) {
  using acc_t = typename imi::acc_type<scalar_t>::type;
  const int64_t nq = q1 - q0, d = query.size(1), KK = K * K;
  const scalar_t* hp = query.data_ptr<scalar_t>() + q0 * d;
  const scalar_t* wp = weight.data_ptr<scalar_t>();
  const scalar_t* bp = bias.defined() ? bias.data_ptr<scalar_t>() : nullptr;
  const auto to_acc = [](scalar_t v) { return static_cast<acc_t>(v); };

  // 1. each query's visited cells, in visit order (cell ids < K*K < 2^31: checked by the caller)
  std::vector<std::vector<int32_t>> visited(nq);
  parallel_chunks(nq, 4, [&](ChunkQueue& queue) {
    VisitScratch ws(K);
    for (int64_t b0, b1; queue.next(b0, b1);)
      for (int64_t b = b0; b < b1; ++b) {
        imi::CellVisit visit = ws.start(s1p + (q0 + b) * K, s2p + (q0 + b) * K, static_cast<int32_t>(K));
        auto& list = visited[b];
        int64_t count = 0, c;
        while (count < budget && (c = visit.next(off)) >= 0) {
          list.push_back(static_cast<int32_t>(c));
          count += off[c + 1] - off[c];
        }
      }
  });

  // 2. inverted: the visiting queries of each cell (counting sort by cell; queries ascending)
  std::vector<int64_t> start(KK + 1, 0);
  for (const auto& list : visited)
    for (int32_t c : list) ++start[c + 1];
  std::vector<int32_t> cells;  // the visited cells, ascending
  for (int64_t c = 0; c < KK; ++c) {
    if (start[c + 1] > 0) cells.push_back(static_cast<int32_t>(c));
    start[c + 1] += start[c];
  }
  std::vector<int64_t> fill(start.begin(), start.end() - 1);
  std::vector<int32_t> qlist(static_cast<size_t>(start[KK]));
  for (int64_t b = 0; b < nq; ++b)
    for (int32_t c : visited[b]) qlist[fill[c]++] = static_cast<int32_t>(b);
  visited = {};

  // 3. per visited cell: its rows against its visiting queries, into this thread's heaps
  struct Heaps {
    std::vector<acc_t> vals;
    std::vector<int64_t> ids, size;
  };
  std::vector<Heaps> all;
  std::mutex all_mutex;
  const int64_t U = static_cast<int64_t>(cells.size());
  const int64_t row_bytes = d * static_cast<int64_t>(sizeof(scalar_t));
  const auto prefetch_cell = [&](int64_t u) {
    for (int64_t p = off[cells[u]]; p < off[cells[u] + 1]; ++p) {
      const int64_t i = static_cast<int64_t>(cls[p]);
      if (!imi::in_range(i, N)) continue;
      const char* r = reinterpret_cast<const char*>(wp + i * d);
      for (int64_t o = 0; o < row_bytes; o += 64) IMI_PREFETCH(r + o);
    }
  };
  parallel_chunks(U, 8, [&](ChunkQueue& queue) {
    Heaps mine;
    std::vector<int64_t> rows;
    for (int64_t u0, u1; queue.next(u0, u1);) {
      if (mine.size.empty()) {
        mine.vals.resize(static_cast<size_t>(nq * k));
        mine.ids.resize(static_cast<size_t>(nq * k));
        mine.size.assign(static_cast<size_t>(nq), 0);
      }
      prefetch_cell(u0);
      for (int64_t u = u0; u < u1; ++u) {
        if (u + 1 < U) prefetch_cell(u + 1);  // the next cell's rows arrive while this one is scored
        const int64_t c = cells[u];
        rows.clear();
        for (int64_t p = off[c]; p < off[c + 1]; ++p) {
          const int64_t i = static_cast<int64_t>(cls[p]);
          if (imi::in_range(i, N)) rows.push_back(i);
          else imi::record_bad_position(first_bad, p);
        }
        for (int64_t t = start[c]; t < start[c + 1]; ++t) {
          const int64_t b = qlist[t];
          imi::TopK<acc_t> top{mine.vals.data() + b * k, mine.ids.data() + b * k, k, mine.size[b]};
          const scalar_t* h = hp + b * d;
          for (int64_t i : rows)
            top.offer(imi::class_logit<acc_t>(h, wp + i * d, d, bp == nullptr ? nullptr : bp + i, to_acc), i);
          mine.size[b] = top.size;
        }
      }
    }
    if (!mine.size.empty()) {
      const std::lock_guard<std::mutex> lock(all_mutex);
      all.push_back(std::move(mine));
    }
  });

  // 4. each query's k best over the threads' heaps
  int64_t* idp = ids.data_ptr<int64_t>() + q0 * k;
  acc_t* vp = scores.data_ptr<acc_t>() + q0 * k;
  parallel_chunks(nq, 64, [&](ChunkQueue& queue) {
    for (int64_t b0, b1; queue.next(b0, b1);)
    for (int64_t b = b0; b < b1; ++b) {
      imi::TopK<acc_t> top{vp + b * k, idp + b * k, k, 0};
      for (const Heaps& h : all)
        for (int64_t t = 0; t < h.size[b]; ++t) top.offer(h.vals[b * k + t], h.ids[b * k + t]);
      top.sort_best_first();
    }
  });
}

// The cell-major rerank over the batch, in blocks of queries so that the per-thread heaps stay
// bounded (threads * block * k entries).
template <typename scalar_t, typename id_t>
void search_cell_major(const at::Tensor& query, const at::Tensor& weight, const at::Tensor& bias, const float* s1p,
                       const float* s2p, const int64_t* off, const id_t* cls, int64_t K, int64_t N, int64_t k,
                       int64_t budget, at::Tensor& ids, at::Tensor& scores, int64_t* first_bad) {
  const int64_t B = query.size(0);
  const int64_t block = std::max<int64_t>(
      1, std::min<int64_t>({B, kCellMajorMaxBlock, kCellMajorHeapEntries / k,
                            kCellMajorMaxPairs / search_max_cells(K, budget)}));
  for (int64_t q0 = 0; q0 < B; q0 += block)
    search_cell_major_block<scalar_t, id_t>(query, weight, bias, s1p, s2p, off, cls, K, N, k, budget, q0,
                                            std::min(B, q0 + block), ids, scores, first_bad);
}

std::tuple<at::Tensor, at::Tensor> midx_search_cpu(const at::Tensor& query_in, const at::Tensor& weight_in,
                                                   const std::optional<at::Tensor>& bias_in, const at::Tensor& s1_in,
                                                   const at::Tensor& s2_in, const at::Tensor& offsets,
                                                   const at::Tensor& class_ids, int64_t k, int64_t budget,
                                                   c10::string_view rerank_in) {
  const SearchRerank rerank = parse_search_rerank("midx_search", std::string(rerank_in));
  const int64_t N = check_search_inputs("midx_search", query_in, weight_in, bias_in, s1_in, s2_in, offsets, class_ids,
                                        k, budget);
  const auto query = query_in.contiguous(), weight = weight_in.contiguous();
  const at::Tensor bias = contiguous_or_undefined(bias_in);
  const auto s1 = s1_in.contiguous(), s2 = s2_in.contiguous();
  const int64_t B = query.size(0), K = s1.size(1);
  const auto acc = acc_scalar_type(weight.scalar_type());
  auto ids = at::empty({B, k}, offsets.options());
  auto scores = at::empty({B, k}, query.options().dtype(acc));
  int64_t first_bad = IMI_NO_BAD_POSITION;
  // cell ids are held as int32 in the cell-major lists
  const bool cell_major = K * K <= std::numeric_limits<int32_t>::max() &&
                          (rerank == SearchRerank::Cell || (rerank == SearchRerank::Auto && B >= kCellMajorMinQueries));
  if (B > 0 && k > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "midx_search", [&] {
      const auto run = [&](const auto* cls) {
        using id_t = std::remove_const_t<std::remove_pointer_t<decltype(cls)>>;
        const float* s1p = s1.data_ptr<float>();
        const float* s2p = s2.data_ptr<float>();
        const int64_t* off = offsets.data_ptr<int64_t>();
        if (cell_major)
          search_cell_major<scalar_t, id_t>(query, weight, bias, s1p, s2p, off, cls, K, N, k, budget, ids, scores,
                                            &first_bad);
        else
          search_loop<scalar_t, id_t>(query, weight, bias, s1p, s2p, off, cls, K, N, k, budget, ids, scores,
                                      &first_bad);
      };
      if (class_ids.scalar_type() == at::kInt) run(class_ids.data_ptr<int32_t>());
      else run(class_ids.data_ptr<int64_t>());
    });
  }
  if (first_bad != IMI_NO_BAD_POSITION)  // the int64 copy only to name the bad entry
    check_no_bad_position("midx_search", "class_ids", first_bad, class_ids.to(at::kLong),
                          "[0, N = " + std::to_string(N) + ")");
  return {ids, scores};
}

}  // namespace

TORCH_LIBRARY_IMPL(imi_softmax, CPU, m) {
  m.impl("midx_search_cells", &midx_search_cells_cpu);
  m.impl("midx_search", &midx_search_cpu);
}

}  // namespace imi_softmax
