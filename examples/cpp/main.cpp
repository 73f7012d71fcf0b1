// Calls one imi_softmax op from C++ through the PyTorch dispatcher: the nearest codeword of each
// row (the k-means assignment step of the index build), checked against a brute-force argmin.
// Build: see CMakeLists.txt next to this file (or run scripts/check_cmake_example.sh).
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/torch.h>

#include <iostream>
#include <tuple>

int main() {
  // Linked with --no-as-needed, libimi_softmax.so is loaded at start-up and has registered its ops.
  auto op = c10::Dispatcher::singleton()
                .findSchemaOrThrow("imi_softmax::assign_codewords", "")
                .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&)>();

  torch::manual_seed(0);
  const auto x = torch::randn({1000, 32}, torch::kDouble);       // [N, d] class vectors
  const auto centroids = torch::randn({64, 32}, torch::kDouble); // [K, d] codewords
  auto [codes, sqdist] = op.call(x, centroids);                   // [N] int64, [N] squared distances

  const auto expected = torch::cdist(x, centroids).argmin(1);
  const bool ok = codes.equal(expected);
  std::cout << "imi_softmax::assign_codewords: " << codes.size(0) << " rows, codes of the first three:";
  for (int64_t i = 0; i < 3; ++i) std::cout << " " << codes[i].item<int64_t>();
  std::cout << "\nmatches brute-force argmin: " << (ok ? "yes" : "NO") << "\n";
  return ok ? 0 : 1;
}
