// The permutation pieces that the fused expert MLP (expert_mlp.cpp) composes; their ops are registered in
// permutation.cpp.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace moe_kernels {

// Counting sort of experts [T, k] by expert id -> (order [T*k], inverse [T, k], offsets [E+1]), all int32.
// capacity < 0: no limit.
std::tuple<at::Tensor, at::Tensor, at::Tensor> sort_by_expert(const at::Tensor& experts, int64_t num_experts,
                                                              int64_t capacity);

// out[t] = sum_j w[t, j] * y[inverse[t, j]] over the kept pairs (inverse >= 0), in slot order, accumulated in
// float32 (float64 for float64 y) and stored in `out_dtype`. weights: [T, k] or undefined (plain sum).
// rows: how many leading rows of y hold results (-1: all); an inverse pointing past them is an error naming op.
at::Tensor unpermute_to(const at::Tensor& y, const at::Tensor& inverse, const at::Tensor& weights,
                        at::ScalarType out_dtype, int64_t rows, const char* op);

}  // namespace moe_kernels
