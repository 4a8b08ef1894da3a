// hadamard_rotate: see rotation.h. Compiled on every platform (setup.py globs csrc/*.cpp).
#include "rotation.h"

#include <c10/core/InferenceMode.h>

#include <cmath>
#include <map>
#include <mutex>
#include <tuple>
#include <vector>

namespace flash_quant {
namespace {

// The (block, block) Sylvester Hadamard matrix / sqrt(block), built in double on the CPU.
at::Tensor hadamard_block_cpu(int64_t block) {
  std::vector<double> h(static_cast<size_t>(block * block));
  h[0] = 1.0;
  for (int64_t n = 1; n < block; n *= 2) {
    // The top-left n x n holds H_n; fill the other three quadrants of H_2n.
    for (int64_t i = 0; i < n; ++i) {
      for (int64_t j = 0; j < n; ++j) {
        const double v = h[i * block + j];
        h[i * block + (j + n)] = v;
        h[(i + n) * block + j] = v;
        h[(i + n) * block + (j + n)] = -v;
      }
    }
  }
  const double inv = 1.0 / std::sqrt(static_cast<double>(block));
  for (double& v : h) v *= inv;
  return at::tensor(h, at::TensorOptions().dtype(at::kDouble)).view({block, block});
}

// One float32 block per (block, device): a host-to-device copy on every call would stall
// an accelerator's queue. The map is never destroyed (device tensors must not be freed
// after their allocator at exit).
at::Tensor hadamard_block(int64_t block, const at::Device& device) {
  using Key = std::tuple<int64_t, int, int>;
  static std::mutex mu;
  static auto* cache = new std::map<Key, at::Tensor>();
  const Key key{block, static_cast<int>(device.type()), static_cast<int>(device.index())};
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache->find(key);
  if (it != cache->end()) return it->second;
  // A normal tensor even when first asked for under inference mode (an inference tensor
  // could not be used by calls outside it).
  c10::InferenceMode not_inference(/*enabled=*/false);
  at::Tensor h = hadamard_block_cpu(block).to(at::kFloat).to(device);
  cache->emplace(key, h);
  return h;
}

}  // namespace

at::Tensor hadamard_rotate(const at::Tensor& x) {
  TORCH_CHECK(x.dim() >= 1, "hadamard_rotate: x must have rank >= 1, got a 0-dim tensor");
  const int64_t D = x.size(-1);
  at::Tensor xf = x.to(at::kFloat);
  if (D == 0) return xf.contiguous();
  const int64_t block = D & -D;
  // The last dim as (D / block, block): one matmul with the block applies the
  // block-diagonal H without multiplying by its zeros.
  std::vector<int64_t> blocked(x.sizes().begin(), x.sizes().end());
  blocked.back() = D / block;
  blocked.push_back(block);
  return at::matmul(xf.reshape(blocked), hadamard_block(block, x.device())).reshape(x.sizes()).contiguous();
}

}  // namespace flash_quant
