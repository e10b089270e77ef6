// See buffers.h.
#include "buffers.h"

#include <cstdlib>
#include <cstring>
#include <limits>

namespace moe_kernels {

bool poison_mode() {
  static const bool on = [] {
    const char* v = std::getenv("MOE_KERNELS_POISON");
    return v != nullptr && *v != '\0' && std::strcmp(v, "0") != 0;
  }();
  return on;
}

at::Tensor new_empty(at::IntArrayRef shape, const at::TensorOptions& options) {
  auto t = at::empty(shape, options);
  if (poison_mode() && t.numel() > 0) {
    if (t.is_floating_point()) {
      t.fill_(std::numeric_limits<double>::quiet_NaN());
    } else {
      std::memset(t.mutable_data_ptr(), 0xA5, t.nbytes());
    }
  }
  return t;
}

at::Tensor new_empty_like(const at::Tensor& t) { return new_empty(t.sizes(), t.options()); }

}  // namespace moe_kernels
