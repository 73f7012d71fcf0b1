// Approximate top-k from the inverted multi-index (retrieval), shared by the CPU loops and the CUDA
// kernels: the multi-sequence visit of the K*K cells in decreasing s1[k1] + s2[k2] order (Babenko &
// Lempitsky's inverted multi-index), the exact rerank score h . w_i + b_i of a candidate, and a
// bounded top-k kept as a min-heap.
//
// Visit order. Codewords are ranked in each list by (score descending, codeword ascending); cell
// (i, j) below means ranks i and j. The heap holds (s1 + s2, i, j) and pops the largest under the
// total order (sum descending, i ascending, j ascending). When (i, j) is popped, (i, j + 1) is
// pushed, and (i + 1, 0) too when j == 0: every pair has exactly one parent ((i, j - 1), or
// (i - 1, 0) for j = 0), so each pair is pushed once without a K*K visited table, and the heap holds
// at most one pair per rank i (<= K entries). A child never precedes its parent in the total order
// (float addition is monotone in each argument), so the pops come out in exactly that total order:
// non-increasing s1 + s2, ties by rank. The fallback (imi_softmax/_fallback/search.py) sorts all
// cells by the same key.
#pragma once

#include "common.h"
#include "index_check.h"

namespace imi {

// Codeword a comes before codeword b in the sorted list of scores s.
IMI_HD bool codeword_before(const float* s, int32_t a, int32_t b) {
  return s[a] > s[b] || (s[a] == s[b] && a < b);
}

// Position of codeword a in the sorted list (O(K); the CUDA kernel ranks all K in parallel).
IMI_HD int32_t codeword_rank(const float* s, int32_t K, int32_t a) {
  int32_t r = 0;
  for (int32_t b = 0; b < K; ++b) r += codeword_before(s, b, a) ? 1 : 0;
  return r;
}

// One heap entry: the cell score and the two ranks.
struct VisitEntry {
  float score;
  int32_t i, j;
};

// a pops before b
IMI_HD bool visit_before(const VisitEntry& a, const VisitEntry& b) {
  return a.score > b.score || (a.score == b.score && (a.i < b.i || (a.i == b.i && a.j < b.j)));
}

// The multi-sequence walk over one query's cells. order1/order2 [K]: codeword of each rank (sorted
// lists), sorted1/sorted2 [K]: their scores in rank order, heap [K]: work area. All caller-owned.
struct CellVisit {
  const float* sorted1;
  const float* sorted2;
  const int32_t* order1;
  const int32_t* order2;
  VisitEntry* heap;
  int32_t K;
  int32_t size;

  IMI_HD void push(VisitEntry e) {
    int32_t c = size++;
    while (c > 0) {
      const int32_t p = (c - 1) / 2;
      if (!visit_before(e, heap[p])) break;
      heap[c] = heap[p];
      c = p;
    }
    heap[c] = e;
  }

  IMI_HD VisitEntry pop() {
    const VisitEntry top = heap[0];
    const VisitEntry last = heap[--size];
    int32_t c = 0;
    for (;;) {
      int32_t l = 2 * c + 1;
      if (l >= size) break;
      if (l + 1 < size && visit_before(heap[l + 1], heap[l])) ++l;
      if (!visit_before(heap[l], last)) break;
      heap[c] = heap[l];
      c = l;
    }
    if (size > 0) heap[c] = last;
    return top;
  }

  IMI_HD VisitEntry entry(int32_t i, int32_t j) const {
    return VisitEntry{sorted1[i] + sorted2[j], i, j};
  }

  IMI_HD void start() {
    size = 0;
    if (K > 0) push(entry(0, 0));
  }

  // The next cell (k1 * K + k2) in visit order, empty ones included; -1 once all K*K are out.
  IMI_HD int64_t next_any(float* score) {
    if (size == 0) return -1;
    const VisitEntry e = pop();
    if (e.j + 1 < K) push(entry(e.i, e.j + 1));
    if (e.j == 0 && e.i + 1 < K) push(entry(e.i + 1, 0));
    if (score != nullptr) *score = e.score;
    return static_cast<int64_t>(order1[e.i]) * K + order2[e.j];
  }

  // The next non-empty cell under the CSR offsets [K*K + 1]; -1 when none is left.
  IMI_HD int64_t next(const int64_t* offsets, float* score = nullptr) {
    for (;;) {
      const int64_t c = next_any(score);
      if (c < 0 || offsets[c + 1] > offsets[c]) return c;
    }
  }
};

// The exact logit h . w + b of one class, accumulated in acc_t (float for float32/half/bf16 storage,
// double for double). to_acc converts one storage element.
template <typename acc_t, typename scalar_t, typename Convert>
IMI_HD acc_t class_logit(const scalar_t* h, const scalar_t* w, int64_t d, const scalar_t* bias_entry,
                         Convert to_acc) {
  acc_t s = acc_t(0);
  IMI_SIMD_SUM(s)
  for (int64_t t = 0; t < d; ++t) s += to_acc(h[t]) * to_acc(w[t]);
  if (bias_entry != nullptr) s += to_acc(*bias_entry);
  return s;
}

// Top-k order: a before b when its score is larger, or equal with a smaller class id.
template <typename acc_t>
IMI_HD bool rank_before(acc_t va, int64_t ia, acc_t vb, int64_t ib) {
  return va > vb || (va == vb && ia < ib);
}

// Bounded top-k: a min-heap (root = the worst kept) of up to k (value, id) pairs.
template <typename acc_t>
struct TopK {
  acc_t* vals;
  int64_t* ids;
  int64_t k;
  int64_t size;

  IMI_HD void sift_down(int64_t c) {
    const acc_t v = vals[c];
    const int64_t id = ids[c];
    for (;;) {
      int64_t l = 2 * c + 1;
      if (l >= size) break;
      if (l + 1 < size && rank_before(vals[l], ids[l], vals[l + 1], ids[l + 1])) ++l;  // the worse child
      if (!rank_before(v, id, vals[l], ids[l])) break;
      vals[c] = vals[l];
      ids[c] = ids[l];
      c = l;
    }
    vals[c] = v;
    ids[c] = id;
  }

  IMI_HD void offer(acc_t v, int64_t id) {
    if (k == 0) return;
    if (size < k) {
      int64_t c = size++;
      while (c > 0) {
        const int64_t p = (c - 1) / 2;
        if (!rank_before(vals[p], ids[p], v, id)) break;  // parent already worse than v
        vals[c] = vals[p];
        ids[c] = ids[p];
        c = p;
      }
      vals[c] = v;
      ids[c] = id;
      return;
    }
    if (!rank_before(v, id, vals[0], ids[0])) return;
    vals[0] = v;
    ids[0] = id;
    sift_down(0);
  }

  // Empties the heap into best-first order (in place: vals[0] / ids[0] the best).
  IMI_HD void sort_best_first() {
    while (size > 1) {
      const acc_t v = vals[0];
      const int64_t id = ids[0];
      --size;
      vals[0] = vals[size];
      ids[0] = ids[size];
      vals[size] = v;
      ids[size] = id;
      sift_down(0);
    }
    size = 0;
  }
};

}  // namespace imi
