// assign_rows on CPU: the incremental refresh's re-assignment of the changed rows in one parallel
// region. Each block of rows a thread claims is gathered (widened to float32), checked, assigned to
// the first codebook and then to the second (residuals or the row's second half), all in the
// thread's own buffers: no [C, d] copy, no residual tensor and no torch op between the steps, each
// of which was a region split in equal halves that beside a busy process waited for the thread that
// was off its core (the refresh after 10 steps at N = 1M spent ~60% of its busy time there).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>

#include "../tensor_views.h"
#include "nearest_block.h"
#include "parallel_chunks.h"

namespace imi_softmax {
namespace {

constexpr int64_t kBlock = kAssignBlockRows;

struct Codebook {
  explicit Codebook(const at::Tensor& codebook)
      : rows(codebook.contiguous()), t(rows.t()), sqnorm(rows.mul(rows).sum(1).contiguous()) {}
  at::Tensor rows;    // the contiguous [K, width] codebook
  at::Tensor t;       // [width, K] view of it
  at::Tensor sqnorm;  // [K], computed as assign_codewords computes it
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> assign_rows_cpu(const at::Tensor& weight_in, const at::Tensor& rows_in,
                                                               const at::Tensor& codebook1,
                                                               const at::Tensor& codebook2, bool residual) {
  check_assign_rows_inputs(weight_in, rows_in, codebook1, codebook2, residual);
  const auto weight = weight_in.stride(1) == 1 ? weight_in : weight_in.contiguous();
  const auto rows = rows_in.contiguous();
  const int64_t N = weight.size(0), d = weight.size(1), C = rows.numel(), ld = weight.stride(0);
  const int64_t* rp = rows.data_ptr<int64_t>();
  int64_t first_bad = IMI_NO_BAD_POSITION;  // a row id outside [0, N): recorded at use, raised after the loop
  const Codebook cb1(codebook1), cb2(codebook2);
  const int64_t K1 = codebook1.size(0), K2 = codebook2.size(0), h = residual ? d : codebook1.size(1);
  auto code1 = at::empty({C}, rows.options().dtype(at::kInt));
  auto code2 = at::empty({C}, rows.options().dtype(at::kInt));
  int32_t* c1p = code1.data_ptr<int32_t>();
  int32_t* c2p = code2.data_ptr<int32_t>();
  std::atomic<bool> finite{true};
  const auto f32 = weight.options().dtype(at::kFloat);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "assign_rows_cpu", [&] {
    const scalar_t* wp = weight.data_ptr<scalar_t>();
    parallel_chunks(C, kBlock, [&](ChunkQueue& queue) {
      const int64_t cap = std::min(kBlock, C);
      // the gathered rows, and the second codebook's input (the residuals, or the second halves)
      at::Tensor first = at::empty({cap, h}, f32), second = at::empty({cap, residual ? d : d - h}, f32);
      at::Tensor whole = residual ? first : at::empty({cap, d}, f32);
      at::Tensor dots1 = at::empty({cap, K1}, f32), dots2 = at::empty({cap, K2}, f32);
      bool ok = true;
      for (int64_t b, e; queue.next(b, e);) {
        const int64_t n = e - b, w2 = second.size(1);
        float* xp = whole.data_ptr<float>();
        for (int64_t i = 0; i < n; ++i) {  // widen the row; its float32 squared norm must be finite
          float* dst = xp + i * d;
          if (!imi::in_range(rp[b + i], N)) {
            imi::record_bad_position(&first_bad, b + i);
            std::fill(dst, dst + d, 0.0f);
            continue;
          }
          const scalar_t* src = wp + rp[b + i] * ld;
          for (int64_t t = 0; t < d; ++t) dst[t] = static_cast<float>(src[t]);
          ok = ok && std::isfinite(row_sq_norm(dst, d));
        }
        if (!residual) {  // the two halves of each row, each contiguous (as assign_codewords gets them)
          float* ap = first.data_ptr<float>();
          float* bp = second.data_ptr<float>();
          for (int64_t i = 0; i < n; ++i) {
            std::copy(xp + i * d, xp + i * d + h, ap + i * h);
            std::copy(xp + i * d + h, xp + (i + 1) * d, bp + i * w2);
          }
        }
        nearest_in_block<float, int32_t>(first.narrow(0, 0, n), cb1.t, cb1.sqnorm.data_ptr<float>(),
                                         dots1, c1p + b, nullptr);
        if (residual) {  // x - codebook1[code1], as assign_residual subtracts it
          float* res = second.data_ptr<float>();
          for (int64_t i = 0; i < n; ++i) {
            const float* c = cb1.rows.data_ptr<float>() + static_cast<int64_t>(c1p[b + i]) * d;
            for (int64_t t = 0; t < d; ++t) res[i * d + t] = xp[i * d + t] - c[t];
          }
        }
        nearest_in_block<float, int32_t>(second.narrow(0, 0, n), cb2.t, cb2.sqnorm.data_ptr<float>(),
                                         dots2, c2p + b, nullptr);
      }
      if (!ok) finite.store(false, std::memory_order_relaxed);
    });
  });
  check_no_bad_position("assign_rows", "rows", first_bad, rows, "[0, " + std::to_string(N) + ")");
  return {code1, code2, at::scalar_tensor(finite.load(), rows.options().dtype(at::kBool))};
}

}  // namespace

TORCH_LIBRARY_IMPL(imi_softmax, CPU, m) { m.impl("assign_rows", &assign_rows_cpu); }

}  // namespace imi_softmax
