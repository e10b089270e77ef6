// How the native ops allocate what they write: outputs and scratch, poisoned in the debug mode.
//
// MOE_KERNELS_POISON=1 (read once per process) is the debug mode that `make sanitize` and the poisoned test run
// use: every output and scratch tensor a native op allocates is filled before its kernels run (NaN in floating
// dtypes, 0xA5 bytes in the others), so an element a kernel leaves unwritten shows in the result; and the kept
// buffers (Scratch, kept_empty: memory reused across calls and threads, invisible to AddressSanitizer) are
// allocated fresh per call instead, so an overrun inside them is an overrun of a heap block.
#pragma once

#include <ATen/ATen.h>

namespace moe_kernels {

bool poison_mode();

// at::empty, poisoned in the debug mode.
at::Tensor new_empty(at::IntArrayRef shape, const at::TensorOptions& options);
// new_empty with t's sizes and options (contiguous).
at::Tensor new_empty_like(const at::Tensor& t);

}  // namespace moe_kernels
