// Retrieval on CUDA, in two kernels (the glue in ops_cuda.cpp picks the k best with torch's topk):
//   1. search_visit_kernel, one block per query: the block ranks the K codewords of each list in
//      parallel (imi::codeword_rank: the order of the CPU's sort), then ONE thread walks the cells
//      (imi::CellVisit, the CPU's heap and order) until they hold >= budget classes, writing the
//      visited cells and the class count. The sorted lists and the heap live in a global workspace
//      (one slice per block: K can reach 8192, more than shared memory holds).
//   2. search_score_kernel, one block per query: the classes of the visited cells, in visit order,
//      one thread per candidate scoring imi::class_logit (the CPU's rerank body); class ids are
//      checked at use (a bad one is recorded, scored -inf and given id -1).
#include "device_utils.cuh"
#include "launchers.h"

#include "imi_softmax/search.h"

namespace imi_softmax {
namespace cuda {
namespace {

constexpr int kThreads = 256;

// One block's slice of the visit workspace: order1, order2 [K] int32, sorted1, sorted2 [K] float,
// heap [K] VisitEntry (12 bytes each, 4-byte aligned).
struct VisitSlice {
  int32_t* order1;
  int32_t* order2;
  float* sorted1;
  float* sorted2;
  imi::VisitEntry* heap;
};

__device__ __forceinline__ VisitSlice carve_visit(char* base, int32_t K) {
  VisitSlice s;
  s.order1 = reinterpret_cast<int32_t*>(base);
  s.order2 = s.order1 + K;
  s.sorted1 = reinterpret_cast<float*>(s.order2 + K);
  s.sorted2 = s.sorted1 + K;
  s.heap = reinterpret_cast<imi::VisitEntry*>(s.sorted2 + K);
  return s;
}

__global__ void __launch_bounds__(kThreads)
search_visit_kernel(const float* __restrict__ s1, const float* __restrict__ s2, int64_t B, int32_t K,
                    const int64_t* __restrict__ offsets, int64_t budget, int64_t* __restrict__ cells, int64_t C,
                    int64_t* __restrict__ counts, char* __restrict__ workspace, size_t slice_bytes) {
  const VisitSlice ws = carve_visit(workspace + blockIdx.x * slice_bytes, K);
  int32_t* order1 = ws.order1;
  int32_t* order2 = ws.order2;
  float* sorted1 = ws.sorted1;
  float* sorted2 = ws.sorted2;
  imi::CellVisit visit{sorted1, sorted2, order1, order2, ws.heap, K, 0};
  for (int64_t b = blockIdx.x; b < B; b += gridDim.x) {
    const float* r1 = s1 + b * K;
    const float* r2 = s2 + b * K;
    for (int32_t a = threadIdx.x; a < K; a += blockDim.x) {
      const int32_t p1 = imi::codeword_rank(r1, K, a), p2 = imi::codeword_rank(r2, K, a);
      order1[p1] = a;
      sorted1[p1] = r1[a];
      order2[p2] = a;
      sorted2[p2] = r2[a];
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      visit.start();
      int64_t count = 0, c, v = 0;
      int64_t* row = cells + b * C;
      while (count < budget && (c = visit.next(offsets)) >= 0) {
        row[v++] = c;
        count += offsets[c + 1] - offsets[c];
      }
      for (int64_t t = v; t < C; ++t) row[t] = -1;
      counts[b] = count;
    }
    __syncthreads();  // the workspace is rewritten by the next query
  }
}

template <typename scalar_t, typename id_t>
__global__ void __launch_bounds__(kThreads)
search_score_kernel(const scalar_t* __restrict__ query, const scalar_t* __restrict__ weight,
                    const scalar_t* __restrict__ bias, int64_t B, int64_t d, int64_t N,
                    const int64_t* __restrict__ offsets, const id_t* __restrict__ class_ids,
                    const int64_t* __restrict__ cells, int64_t C, int64_t* __restrict__ cand_ids,
                    typename imi::acc_type<scalar_t>::type* __restrict__ cand_scores, int64_t Cmax,
                    int64_t* __restrict__ first_bad) {
  using acc_t = typename imi::acc_type<scalar_t>::type;
  const auto conv = [](scalar_t v) { return static_cast<acc_t>(to_acc(v)); };
  for (int64_t b = blockIdx.x; b < B; b += gridDim.x) {
    const scalar_t* h = query + b * d;
    int64_t base = 0;
    for (int64_t v = 0; v < C; ++v) {
      const int64_t c = cells[b * C + v];
      if (c < 0) break;
      const int64_t begin = offsets[c], size = offsets[c + 1] - begin;
      for (int64_t t = threadIdx.x; t < size && base + t < Cmax; t += blockDim.x) {
        const int64_t p = begin + t;
        const int64_t i = static_cast<int64_t>(class_ids[p]);
        int64_t* out_id = cand_ids + b * Cmax + base + t;
        acc_t* out_score = cand_scores + b * Cmax + base + t;
        if (!imi::in_range(i, N)) {
          imi::record_bad_position(first_bad, p);
          *out_id = -1;
          *out_score = imi::neg_inf<acc_t>();
          continue;
        }
        *out_id = i;
        *out_score = imi::class_logit<acc_t>(h, weight + i * d, d, bias == nullptr ? nullptr : bias + i, conv);
      }
      base += size;
    }
  }
}

inline unsigned grid_for(int64_t B, int64_t cap) {
  return static_cast<unsigned>(B < cap ? B : cap);
}

}  // namespace

size_t search_visit_slice_bytes(int64_t K) {
  const size_t bytes = static_cast<size_t>(K) * (4 * sizeof(int32_t) + sizeof(imi::VisitEntry));
  return (bytes + 15) / 16 * 16;
}

cudaError_t launch_search_visit(const float* s1, const float* s2, int64_t B, int64_t K, const int64_t* offsets,
                                int64_t budget, int64_t* cells, int64_t C, int64_t* counts, void* workspace,
                                int64_t blocks, cudaStream_t stream) {
  if (B == 0) return cudaSuccess;
  search_visit_kernel<<<grid_for(B, blocks), kThreads, 0, stream>>>(
      s1, s2, B, static_cast<int32_t>(K), offsets, budget, cells, C, counts, static_cast<char*>(workspace),
      search_visit_slice_bytes(K));
  return cudaGetLastError();
}

template <typename scalar_t, typename id_t>
cudaError_t launch_search_score(const scalar_t* query, const scalar_t* weight, const scalar_t* bias, int64_t B,
                                int64_t d, int64_t N, const int64_t* offsets, const id_t* class_ids,
                                const int64_t* cells, int64_t C, int64_t* cand_ids,
                                typename imi::acc_type<scalar_t>::type* cand_scores, int64_t Cmax,
                                int64_t* first_bad, cudaStream_t stream) {
  if (B == 0) return cudaSuccess;
  search_score_kernel<scalar_t, id_t><<<grid_for(B, 65535), kThreads, 0, stream>>>(
      query, weight, bias, B, d, N, offsets, class_ids, cells, C, cand_ids, cand_scores, Cmax, first_bad);
  return cudaGetLastError();
}

#define IMI_INSTANTIATE_SEARCH(T, I)                                                                       \
  template cudaError_t launch_search_score<T, I>(const T*, const T*, const T*, int64_t, int64_t, int64_t, \
                                                 const int64_t*, const I*, const int64_t*, int64_t, int64_t*, \
                                                 typename imi::acc_type<T>::type*, int64_t, int64_t*,       \
                                                 cudaStream_t);
#define IMI_INSTANTIATE_SEARCH_IDS(T) IMI_INSTANTIATE_SEARCH(T, int64_t) IMI_INSTANTIATE_SEARCH(T, int32_t)
IMI_INSTANTIATE_SEARCH_IDS(float)
IMI_INSTANTIATE_SEARCH_IDS(double)
IMI_INSTANTIATE_SEARCH_IDS(__half)
IMI_INSTANTIATE_SEARCH_IDS(__nv_bfloat16)
#undef IMI_INSTANTIATE_SEARCH_IDS
#undef IMI_INSTANTIATE_SEARCH

}  // namespace cuda
}  // namespace imi_softmax
