// Counting sort of the T*k (token, slot) pairs by expert: index-only, stable, deterministic.
//
// experts [T, k] (int32 or int64) -> order [N], inverse [T, k], offsets [E+1]   (N = T*k, all int32)
//   order:   flat indices t*k+j grouped by expert, ascending flat index within an expert; rows that are
//            not kept (id outside [0, E), or beyond `capacity`) follow after offsets[E], in flat order.
//   inverse: inverse[t*k+j] = position of that pair in `order`, or -1 when it was not kept.
//   offsets: exclusive scan of the kept counts per expert.
// capacity < 0: no limit. With a limit, the kept rows of an expert are chosen in priority order:
// all first choices (slot 0) before second choices, token order within a slot.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

namespace moe_kernels {
namespace {

template <typename id_t>
void sort_impl(const id_t* ids, int64_t T, int64_t k, int64_t E, int64_t capacity, int32_t* order,
               int32_t* inverse, int32_t* offsets) {
  const int64_t N = T * k;
  // Rows of a token range are handled by one chunk; the chunk split is fixed (not the thread count),
  // and the result of a stable sort is unique anyway.
  const int64_t grain = 4096;
  const int64_t chunks = std::max<int64_t>(1, (N + grain - 1) / grain);
  // keep[i] = 1 when the pair is kept; expert E stands for "not kept".
  std::vector<int32_t> key(N);
  for (int64_t i = 0; i < N; ++i) {
    const int64_t e = static_cast<int64_t>(ids[i]);
    key[i] = (e >= 0 && e < E) ? static_cast<int32_t>(e) : static_cast<int32_t>(E);
  }
  if (capacity >= 0) {
    std::vector<int64_t> seen(E, 0);
    for (int64_t j = 0; j < k; ++j) {
      for (int64_t t = 0; t < T; ++t) {
        const int64_t i = t * k + j;
        const int32_t e = key[i];
        if (e < E && seen[e]++ >= capacity) key[i] = static_cast<int32_t>(E);
      }
    }
  }
  // Per-chunk histograms over E+1 buckets, then a scan over (bucket, chunk).
  std::vector<int64_t> hist(chunks * (E + 1), 0);
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      int64_t* h = hist.data() + c * (E + 1);
      const int64_t end = std::min(N, (c + 1) * grain);
      for (int64_t i = c * grain; i < end; ++i) ++h[key[i]];
    }
  });
  int64_t running = 0;
  for (int64_t e = 0; e <= E; ++e) {
    offsets[e] = static_cast<int32_t>(running);
    for (int64_t c = 0; c < chunks; ++c) {
      int64_t& h = hist[c * (E + 1) + e];
      const int64_t n = h;
      h = running;  // becomes the chunk's write cursor for bucket e
      running += n;
    }
  }
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      int64_t* cursor = hist.data() + c * (E + 1);
      const int64_t end = std::min(N, (c + 1) * grain);
      for (int64_t i = c * grain; i < end; ++i) {
        const int64_t pos = cursor[key[i]]++;
        order[pos] = static_cast<int32_t>(i);
        inverse[i] = key[i] < E ? static_cast<int32_t>(pos) : -1;
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sort_by_expert(const at::Tensor& experts, int64_t num_experts,
                                                              int64_t capacity) {
  TORCH_CHECK(experts.dim() == 2, "sort_by_expert: experts must be [T, k], got ", experts.sizes());
  TORCH_CHECK(experts.scalar_type() == at::kInt || experts.scalar_type() == at::kLong,
              "sort_by_expert: experts must be int32 or int64, got ", experts.scalar_type());
  TORCH_CHECK(num_experts >= 1, "sort_by_expert: num_experts must be >= 1, got ", num_experts);
  const int64_t T = experts.size(0), k = experts.size(1), N = T * k;
  TORCH_CHECK(N < (int64_t(1) << 31), "sort_by_expert: T*k = ", N, " overflows int32 indices");
  auto ids = experts.contiguous();
  auto opts = experts.options().dtype(at::kInt);
  auto order = at::empty({N}, opts);
  auto inverse = at::empty({T, k}, opts);
  auto offsets = at::empty({num_experts + 1}, opts);
  if (ids.scalar_type() == at::kInt) {
    sort_impl<int32_t>(ids.data_ptr<int32_t>(), T, k, num_experts, capacity, order.data_ptr<int32_t>(),
                       inverse.data_ptr<int32_t>(), offsets.data_ptr<int32_t>());
  } else {
    sort_impl<int64_t>(ids.data_ptr<int64_t>(), T, k, num_experts, capacity, order.data_ptr<int32_t>(),
                       inverse.data_ptr<int32_t>(), offsets.data_ptr<int32_t>());
  }
  return {order, inverse, offsets};
}

}  // namespace

TORCH_LIBRARY(moe_kernels_C, m) {
  m.def("sort_by_expert(Tensor experts, int num_experts, int capacity) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(moe_kernels_C, CPU, m) { m.impl("sort_by_expert", &sort_by_expert); }

}  // namespace moe_kernels
