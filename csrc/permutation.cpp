// Permutation of the (token, slot) pairs into expert order and back, on CPU.
//
// sort_by_expert: counting sort of the T*k (token, slot) pairs by expert: index-only, stable, deterministic.
// experts [T, k] (int32 or int64) -> order [N], inverse [T, k], offsets [E+1]   (N = T*k, all int32)
//   order:   flat indices t*k+j grouped by expert, ascending flat index within an expert; rows that are
//            not kept (id outside [0, E), or beyond `capacity`) follow after offsets[E], in flat order.
//   inverse: inverse[t*k+j] = position of that pair in `order`, or -1 when it was not kept.
//   offsets: exclusive scan of the kept counts per expert.
// capacity < 0: no limit. With a limit, the kept rows of an expert are chosen in priority order:
// all first choices (slot 0) before second choices, token order within a slot.
//
// permute: x [T, D] -> [N, D], row p = x[order[p] / k] (zero for a pair not kept): a row gather, any dtype.
// unpermute: y [N, D] -> [T, D], out[t] = sum_j w[t, j] * y[inverse[t, j]]: each token sums its own kept rows
// in slot order (float32 accumulation, float64 for float64), parallel over tokens, no atomics.
// permute_backward is unpermute without weights; unpermute_backward writes each kept row's gradient once
// (rows not kept are zero) and the weight gradients as dot products.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "grouped_gemm.h"
#include "permutation.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
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

// Grain of the per-token loops: about 16k elements of work per chunk.
int64_t token_grain(int64_t k, int64_t D) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, k * D)); }

void check_pairs(const char* op, const at::Tensor& order, const at::Tensor& inverse) {
  TORCH_CHECK(inverse.dim() == 2 && inverse.scalar_type() == at::kInt, op,
              ": inverse must be [T, k] int32, got ", inverse.sizes(), " ", inverse.scalar_type());
  if (order.defined()) {
    TORCH_CHECK(order.dim() == 1 && order.scalar_type() == at::kInt && order.size(0) == inverse.numel(), op,
                ": order must be [T*k] int32 with T*k = ", inverse.numel(), " (inverse ", inverse.sizes(), "), got ",
                order.sizes(), " ", order.scalar_type());
  }
}

void check_rows(const char* op, const char* name, const at::Tensor& t, int64_t rows, const char* rows_name) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == rows, op, ": ", name, " must be [", rows_name, " = ", rows,
              ", D], got ", t.sizes());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), op, ": ", name, " must be a floating tensor, got ",
              t.scalar_type());
}

// o[d] = acc[d] in out_t. float to bfloat16 rounds to nearest even (NaN stays NaN), as c10::BFloat16 does, in
// integer operations that the compiler vectorises.
template <typename acc_t, typename out_t>
void store_row(const acc_t* acc, int64_t D, out_t* o) {
  if constexpr (std::is_same_v<acc_t, float> && std::is_same_v<out_t, c10::BFloat16>) {
    uint16_t* bits_out = reinterpret_cast<uint16_t*>(o);
    for (int64_t d = 0; d < D; ++d) {
      uint32_t u;
      std::memcpy(&u, acc + d, sizeof(u));
      bits_out[d] = static_cast<uint16_t>(acc[d] != acc[d] ? 0x7fc0u : bf16_rounded_bits(u));
    }
  } else {
    for (int64_t d = 0; d < D; ++d) o[d] = static_cast<out_t>(acc[d]);
  }
}

// out[t] = sum over kept j of w[t, j] * y[inverse[t, j]]; acc_t: the accumulation type, w already in acc_t.
// Rows [0, rows) of y are the written ones: an inverse pointing past them is refused.
template <typename in_t, typename out_t, typename acc_t>
void unpermute_kernel(const char* op, const in_t* y, const int32_t* inverse, const acc_t* w, int64_t T, int64_t k,
                      int64_t D, int64_t rows, out_t* out) {
  at::parallel_for(0, T, token_grain(k, D), [&](int64_t t0, int64_t t1) {
    std::vector<acc_t> acc(D);
    for (int64_t t = t0; t < t1; ++t) {
      std::fill(acc.begin(), acc.end(), acc_t(0));
      for (int64_t j = 0; j < k; ++j) {
        const int64_t p = inverse[t * k + j];
        if (p < 0) continue;  // not kept: contributes nothing (no multiply by zero: a NaN there stays there)
        TORCH_CHECK(p < rows, op, ": inverse[", t, ", ", j, "] = ", p, " is past the ", rows,
                    " rows that hold results (the kept pairs' rows)");
        const in_t* row = y + p * D;
        if (w != nullptr) {
          const acc_t a = w[t * k + j];
          for (int64_t d = 0; d < D; ++d) acc[d] += static_cast<acc_t>(row[d]) * a;
        } else {
          for (int64_t d = 0; d < D; ++d) acc[d] += static_cast<acc_t>(row[d]);
        }
      }
      store_row(acc.data(), D, out + t * D);
    }
  });
}

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

}  // namespace

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
  auto order = new_empty({N}, opts);
  auto inverse = new_empty({T, k}, opts);
  auto offsets = new_empty({num_experts + 1}, opts);
  if (ids.scalar_type() == at::kInt) {
    sort_impl<int32_t>(ids.data_ptr<int32_t>(), T, k, num_experts, capacity, order.data_ptr<int32_t>(),
                       inverse.data_ptr<int32_t>(), offsets.data_ptr<int32_t>());
  } else {
    sort_impl<int64_t>(ids.data_ptr<int64_t>(), T, k, num_experts, capacity, order.data_ptr<int32_t>(),
                       inverse.data_ptr<int32_t>(), offsets.data_ptr<int32_t>());
  }
  return {order, inverse, offsets};
}

at::Tensor unpermute_to(const at::Tensor& y_in, const at::Tensor& inverse_in, const at::Tensor& weights,
                        at::ScalarType out_dtype, int64_t rows, const char* op) {
  const auto y = y_in.contiguous();
  const auto inverse = inverse_in.contiguous();
  const int64_t T = inverse.size(0), k = inverse.size(1), D = y.size(1);
  const int64_t N = rows < 0 ? y.size(0) : std::min(rows, y.size(0));
  const auto acc = acc_type(y.scalar_type());
  at::Tensor w;
  if (weights.defined()) {
    TORCH_CHECK(weights.sizes() == inverse.sizes(), op, ": weights must be [T, k] = ", inverse.sizes(),
                ", got ", weights.sizes());
    w = weights.to(acc).contiguous();
  }
  auto out = new_empty({T, D}, y.options().dtype(out_dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "unpermute", [&] {
    using in_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out_dtype, "unpermute_out", [&] {
      using out_t = scalar_t;
      if (acc == at::kDouble) {
        unpermute_kernel<in_t, out_t, double>(op, y.const_data_ptr<in_t>(), inverse.const_data_ptr<int32_t>(),
                                              w.defined() ? w.const_data_ptr<double>() : nullptr, T, k, D, N,
                                              out.mutable_data_ptr<out_t>());
      } else {
        unpermute_kernel<in_t, out_t, float>(op, y.const_data_ptr<in_t>(), inverse.const_data_ptr<int32_t>(),
                                             w.defined() ? w.const_data_ptr<float>() : nullptr, T, k, D, N,
                                             out.mutable_data_ptr<out_t>());
      }
    });
  });
  return out;
}

namespace {

at::Tensor permute(const at::Tensor& x_in, const at::Tensor& order_in, const at::Tensor& inverse_in) {
  check_pairs("permute", order_in, inverse_in);
  TORCH_CHECK(x_in.dim() == 2 && x_in.size(0) == inverse_in.size(0), "permute: x must be [T, D] with T = ",
              inverse_in.size(0), " (inverse ", inverse_in.sizes(), "), got ", x_in.sizes());
  const auto x = x_in.contiguous();
  const auto order = order_in.contiguous();
  const auto inverse = inverse_in.contiguous();
  const int64_t k = inverse.size(1), N = order.size(0), D = x.size(1);
  auto out = new_empty({N, D}, x.options());
  if (N == 0 || D == 0) return out;
  const size_t row_bytes = static_cast<size_t>(D) * x.element_size();
  const char* src = static_cast<const char*>(x.const_data_ptr());
  char* dst = static_cast<char*>(out.mutable_data_ptr());
  const int32_t* ord = order.const_data_ptr<int32_t>();
  const int32_t* inv = inverse.const_data_ptr<int32_t>();
  at::parallel_for(0, N, token_grain(1, D), [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t i = ord[p];
      TORCH_CHECK(i >= 0 && i < N, "permute: order[", p, "] = ", i, " is not a pair index in [0, ", N, ")");
      if (inv[i] >= 0) {
        std::memcpy(dst + p * row_bytes, src + (i / k) * row_bytes, row_bytes);
      } else {
        std::memset(dst + p * row_bytes, 0, row_bytes);  // +0.0 in every floating dtype
      }
    }
  });
  return out;
}

at::Tensor permute_backward(const at::Tensor& grad, const at::Tensor& inverse) {
  check_pairs("permute_backward", at::Tensor(), inverse);
  check_rows("permute_backward", "grad", grad, inverse.numel(), "T*k");
  return unpermute_to(grad, inverse, at::Tensor(), grad.scalar_type(), -1, "permute_backward");
}

at::Tensor unpermute(const at::Tensor& y, const at::Tensor& inverse, const std::optional<at::Tensor>& weights) {
  check_pairs("unpermute", at::Tensor(), inverse);
  check_rows("unpermute", "y", y, inverse.numel(), "T*k");
  return unpermute_to(y, inverse, weights.value_or(at::Tensor()), y.scalar_type(), -1, "unpermute");
}

// -> (grad_y [N, D] in y's dtype, grad_weights [T, k] in the weights' dtype, or [0] without weights).
// grad_y[p] = sum over the pairs (t, j) with inverse[t, j] = p of w[t, j] * grad[t]; rows no pair keeps are zero.
// grad_w[t, j] = y[inverse[t, j]] . grad[t] (float64 dot products), zero for a pair not kept.
// sort_by_expert's inverse gives each kept pair its own row below the kept count: each of those rows is then one
// pair's gradient, written once, in parallel over tokens. Any other inverse (a caller's, where the Python check
// does not run, as under torch.compile) sums the pairs of each row in flat pair order on one thread.
template <typename scalar_t, typename acc_t>
void unpermute_backward_kernel(const scalar_t* grad, const scalar_t* y, const int32_t* inverse, const acc_t* w,
                               int64_t T, int64_t k, int64_t D, int64_t N, bool one_row_per_pair, scalar_t* grad_y,
                               double* grad_w) {
  // the pair's routing-weight gradient; its row's gradient goes to `row_grad`
  auto pair = [&](int64_t t, int64_t j, auto&& row_grad) {
    const int64_t p = inverse[t * k + j];
    if (p < 0) {
      if (grad_w != nullptr) grad_w[t * k + j] = 0;
      return;
    }
    TORCH_CHECK(p < N, "unpermute_backward: inverse[", t, ", ", j, "] = ", p, " is not a row of y (", N, " rows)");
    const scalar_t* g = grad + t * D;
    const acc_t a = w != nullptr ? w[t * k + j] : acc_t(1);
    row_grad(p, g, a);
    if (w != nullptr) {
      const scalar_t* row = y + p * D;
      double dot = 0;
      for (int64_t d = 0; d < D; ++d) dot += static_cast<double>(row[d]) * static_cast<double>(g[d]);
      grad_w[t * k + j] = dot;
    }
  };
  if (one_row_per_pair) {
    at::parallel_for(0, T, token_grain(k, D), [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        for (int64_t j = 0; j < k; ++j) {
          pair(t, j, [&](int64_t p, const scalar_t* g, acc_t a) {
            scalar_t* gy = grad_y + p * D;
            for (int64_t d = 0; d < D; ++d) gy[d] = static_cast<scalar_t>(static_cast<acc_t>(g[d]) * a);
          });
        }
      }
    });
    return;
  }
  std::vector<acc_t> acc(static_cast<size_t>(N * D), acc_t(0));
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t j = 0; j < k; ++j) {
      pair(t, j, [&](int64_t p, const scalar_t* g, acc_t a) {
        acc_t* row = acc.data() + p * D;
        for (int64_t d = 0; d < D; ++d) row[d] += static_cast<acc_t>(g[d]) * a;
      });
    }
  }
  for (int64_t i = 0; i < N * D; ++i) grad_y[i] = static_cast<scalar_t>(acc[i]);
}

// The kept count (pairs with inverse >= 0) when every kept pair has a row of its own below it, as sort_by_expert
// makes it; -1 otherwise (a row shared by pairs, or a row past the kept count).
int64_t kept_when_one_row_per_pair(const int32_t* inverse, int64_t pairs) {
  int64_t kept = 0;
  for (int64_t i = 0; i < pairs; ++i) kept += inverse[i] >= 0;
  std::vector<uint8_t> seen(static_cast<size_t>(kept), 0);
  for (int64_t i = 0; i < pairs; ++i) {
    const int64_t p = inverse[i];
    if (p < 0) continue;
    if (p >= kept || seen[p]) return -1;
    seen[p] = 1;
  }
  return kept;
}

std::tuple<at::Tensor, at::Tensor> unpermute_backward(const at::Tensor& grad_in, const at::Tensor& y_in,
                                                      const at::Tensor& inverse_in,
                                                      const std::optional<at::Tensor>& weights) {
  check_pairs("unpermute_backward", at::Tensor(), inverse_in);
  check_rows("unpermute_backward", "y", y_in, inverse_in.numel(), "T*k");
  check_rows("unpermute_backward", "grad", grad_in, inverse_in.size(0), "T");
  TORCH_CHECK(grad_in.size(1) == y_in.size(1), "unpermute_backward: grad ", grad_in.sizes(), " and y ",
              y_in.sizes(), " must share D");
  const auto y = y_in.contiguous();
  const auto grad = grad_in.to(y.scalar_type()).contiguous();
  const auto inverse = inverse_in.contiguous();
  const int64_t T = inverse.size(0), k = inverse.size(1), N = y.size(0), D = y.size(1);
  // N = T*k (check_rows), so a kept count is never past y's rows
  const int64_t n_kept = kept_when_one_row_per_pair(inverse.const_data_ptr<int32_t>(), T * k);
  const bool distinct = n_kept >= 0;
  auto grad_y = new_empty({N, D}, y.options());
  if (distinct) grad_y.narrow(0, n_kept, N - n_kept).zero_();  // rows [0, kept) are each written once below
  const auto acc = acc_type(y.scalar_type());
  at::Tensor w, grad_w64;
  if (weights.has_value()) {
    TORCH_CHECK(weights->sizes() == inverse.sizes(), "unpermute_backward: weights must be [T, k] = ",
                inverse.sizes(), ", got ", weights->sizes());
    w = weights->to(acc).contiguous();
    grad_w64 = new_empty({T, k}, y.options().dtype(at::kDouble));
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "unpermute_backward", [&] {
    double* gw = grad_w64.defined() ? grad_w64.mutable_data_ptr<double>() : nullptr;
    if (acc == at::kDouble) {
      unpermute_backward_kernel<scalar_t, double>(grad.const_data_ptr<scalar_t>(), y.const_data_ptr<scalar_t>(),
                                                  inverse.const_data_ptr<int32_t>(),
                                                  w.defined() ? w.const_data_ptr<double>() : nullptr, T, k, D, N,
                                                  distinct, grad_y.mutable_data_ptr<scalar_t>(), gw);
    } else {
      unpermute_backward_kernel<scalar_t, float>(grad.const_data_ptr<scalar_t>(), y.const_data_ptr<scalar_t>(),
                                                 inverse.const_data_ptr<int32_t>(),
                                                 w.defined() ? w.const_data_ptr<float>() : nullptr, T, k, D, N,
                                                 distinct, grad_y.mutable_data_ptr<scalar_t>(), gw);
    }
  });
  auto grad_w = weights.has_value() ? grad_w64.to(weights->scalar_type()) : new_empty({0}, y.options());
  return {grad_y, grad_w};
}

}  // namespace

TORCH_LIBRARY(moe_kernels_C, m) {
  m.def("sort_by_expert(Tensor experts, int num_experts, int capacity) -> (Tensor, Tensor, Tensor)");
  m.def("permute(Tensor x, Tensor order, Tensor inverse) -> Tensor");
  m.def("permute_backward(Tensor grad, Tensor inverse) -> Tensor");
  m.def("unpermute(Tensor y, Tensor inverse, Tensor? weights) -> Tensor");
  m.def("unpermute_backward(Tensor grad, Tensor y, Tensor inverse, Tensor? weights) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(moe_kernels_C, CPU, m) {
  m.impl("sort_by_expert", &sort_by_expert);
  m.impl("permute", &permute);
  m.impl("permute_backward", &permute_backward);
  m.impl("unpermute", &unpermute);
  m.impl("unpermute_backward", &unpermute_backward);
}

}  // namespace moe_kernels
