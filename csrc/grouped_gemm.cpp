// Grouped GEMM over variable-sized expert groups on CPU (the native backend of moe_kernels::grouped_mm and its
// backward): rows [offsets[e], offsets[e+1]) of `a` use expert e's weight w[e] [M, K].
//
// Each expert's slice goes through ATen's matmul (at::mm_out / at::addmm_out into slices of a preallocated
// output: MKL or oneDNN underneath), the activation runs on the slice while it is in cache, and the backward
// recomputes the pre-activation per expert and writes dA, dW and the bias gradient of that expert only.
// Small groups are not left to tiny multi-threaded GEMMs: experts are spread over the threads (see
// for_each_group). bfloat16 GEMMs run in bfloat16 where the CPU has bf16 dot products (bf16_gemm: oneDNN, about 4x
// the float32 rate); elsewhere float16/bfloat16 operands are widened to float32 one slice at a time (CPU BLAS has no
// fast 16-bit GEMM there, and the widened slice is cache-resident). Epilogues compute in float32 either way.
// Rows outside every group (at or past offsets[E]) are zero in the output and get zero gradient. The activation
// is a spec string (parse_activation: a base activation and the GLU options), parsed once per call.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "grouped_gemm.h"

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <locale>
#include <mutex>
#include <numeric>
#include <sstream>
#include <string>
#include <type_traits>

namespace moe_kernels {

namespace {

constexpr const char* kActivationNames[] = {"silu", "gelu", "gelu_tanh", "relu", "identity", "relu2"};  // by ActKind
constexpr const char* kActivationUsage =
    "one of silu, gelu, gelu_tanh, relu, identity, relu2, optionally with options in brackets: [alpha=<number>, "
    "limit=<number>, clamp_after, up_offset=<number>, interleaved, gate_softcap=<number>, up_softcap=<number>], "
    "e.g. 'silu[alpha=1.702,limit=7.0,up_offset=1.0,interleaved]'";

bool is_space(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v'; }

std::string stripped(const std::string& s) {
  size_t lo = 0, hi = s.size();
  while (lo < hi && is_space(s[lo])) ++lo;
  while (hi > lo && is_space(s[hi - 1])) --hi;
  return s.substr(lo, hi - lo);
}

// A number as the spec writes it: [-+0-9.eE]+ optionally followed by "inf", the whole text read as a double.
bool parse_number(const std::string& text, double& value) {
  size_t body = text.size();
  if (body >= 3 && text.compare(body - 3, 3, "inf") == 0) body -= 3;
  if (body == 0) return false;
  for (size_t i = 0; i < body; ++i) {
    const char c = text[i];
    if (!((c >= '0' && c <= '9') || c == '-' || c == '+' || c == '.' || c == 'e' || c == 'E')) return false;
  }
  std::istringstream in(text);
  in.imbue(std::locale::classic());
  if (body < text.size()) {  // [sign]inf
    const std::string sign = text.substr(0, body);
    if (sign != "-" && sign != "+") return false;
    value = sign == "-" ? -std::numeric_limits<double>::infinity() : std::numeric_limits<double>::infinity();
    return true;
  }
  if (text[0] == '+' && text.size() > 1 && (text[1] == '+' || text[1] == '-')) return false;
  in >> value;
  return !in.fail() && in.peek() == std::char_traits<char>::eof();
}

}  // namespace

Activation parse_activation(c10::string_view spec_view, bool gated, const char* op) {
  const std::string spec(spec_view);
  const std::string s = stripped(spec);
  size_t i = 0;
  while (i < s.size() && ((s[i] >= 'a' && s[i] <= 'z') || (s[i] >= '0' && s[i] <= '9') || s[i] == '_')) ++i;
  const std::string name = s.substr(0, i);
  int kind = -1;
  for (int k = 0; k < 6; ++k) {
    if (name == kActivationNames[k]) kind = k;
  }
  std::string rest = stripped(s.substr(i));
  const bool bracketed = rest.size() >= 2 && rest.front() == '[' && rest.back() == ']';
  TORCH_CHECK(kind >= 0 && (rest.empty() || bracketed), op, ": activation must be ", kActivationUsage, "; got '",
              spec, "'");
  Activation a;
  a.kind = static_cast<ActKind>(kind);
  const std::string options = bracketed ? rest.substr(1, rest.size() - 2) : std::string();
  size_t start = 0;
  while (start <= options.size()) {
    size_t end = options.find(',', start);
    if (end == std::string::npos) end = options.size();
    const std::string part = stripped(options.substr(start, end - start));
    start = end + 1;
    if (part.empty()) continue;
    if (part == "clamp_after") {
      a.clamp_after = true;
      continue;
    }
    if (part == "interleaved") {
      a.interleaved = true;
      continue;
    }
    const size_t eq = part.find('=');
    const std::string key = part.substr(0, eq);
    TORCH_CHECK(eq != std::string::npos && (key == "alpha" || key == "limit" || key == "up_offset" ||
                                            key == "gate_softcap" || key == "up_softcap"),
                op, ": activation '", spec, "': unknown option '", part,
                "' (alpha=<number>, limit=<number>, clamp_after, up_offset=<number>, interleaved, "
                "gate_softcap=<number>, up_softcap=<number>)");
    double value = 0.0;
    TORCH_CHECK(parse_number(part.substr(eq + 1), value), op, ": activation '", spec, "': ", key,
                " must be a number, got '", part.substr(eq + 1), "'");
    if (key == "alpha") {
      a.alpha = value;
    } else if (key == "limit") {
      a.has_limit = true;
      a.limit = value;
    } else if (key == "gate_softcap") {
      a.has_gate_softcap = true;
      a.gate_softcap = value;
    } else if (key == "up_softcap") {
      a.has_up_softcap = true;
      a.up_softcap = value;
    } else {
      a.up_offset = value;
    }
  }
  TORCH_CHECK((a.alpha == 1.0 && !a.has_gate_softcap) || a.kind == ActKind::silu, op, ": activation '", spec,
              "': alpha and gate_softcap apply to silu only");
  for (const auto& [has, cap] : {std::make_pair(a.has_gate_softcap, a.gate_softcap),
                                 std::make_pair(a.has_up_softcap, a.up_softcap)}) {
    TORCH_CHECK(!has || (cap > 0 && std::isfinite(cap)), op, ": activation '", spec,
                "': a softcap must be a finite number > 0");
  }
  TORCH_CHECK(!a.has_limit || (a.limit > 0 && std::isfinite(a.limit)), op, ": activation '", spec,
              "': limit must be a finite number > 0");
  TORCH_CHECK(std::isfinite(a.alpha) && std::isfinite(a.up_offset), op, ": activation '", spec,
              "': alpha and up_offset must be finite");
  TORCH_CHECK(!a.clamp_after || a.has_limit, op, ": activation '", spec, "': clamp_after needs a limit");
  TORCH_CHECK(gated || (!a.has_limit && a.up_offset == 0.0 && !a.interleaved && !a.has_gate_softcap &&
                        !a.has_up_softcap),
              op, ": activation '", spec,
              "': limit, up_offset, interleaved and the softcaps need gated experts (gated=True)");
  return a;
}

at::ScalarType compute_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

at::Tensor to_compute(const at::Tensor& t) {
  const auto ct = compute_dtype(t.scalar_type());
  return t.scalar_type() == ct ? t.contiguous() : t.to(ct).contiguous();
}

namespace {

struct KeptSlots {
  at::Tensor bytes[static_cast<int>(Kept::count)];
};
thread_local KeptSlots kept_slots;

}  // namespace

at::Tensor kept_empty(Kept slot, at::IntArrayRef shape, at::ScalarType dtype) {
  const int64_t bytes = c10::multiply_integers(shape) * static_cast<int64_t>(c10::elementSize(dtype));
  if (bytes > kKeptSlotBytes || poison_mode()) return new_empty(shape, at::TensorOptions().dtype(dtype));
  auto& buf = kept_slots.bytes[static_cast<int>(slot)];
  if (!buf.defined() || buf.numel() < bytes) buf = at::empty({std::max<int64_t>(bytes, 1)}, at::kByte);
  return buf.narrow(0, 0, bytes).view(dtype).view(shape);
}

at::ScalarType gemm_dtype(at::ScalarType t) {
  return t == at::kBFloat16 && bf16_gemm() ? at::kBFloat16 : compute_dtype(t);
}

at::Tensor to_gemm(const at::Tensor& t) {
  const auto gt = gemm_dtype(t.scalar_type());
  return t.scalar_type() == gt ? t.contiguous() : t.to(gt).contiguous();
}

at::Tensor to_gemm_kept(Kept slot, const at::Tensor& t) {
  const auto gt = gemm_dtype(t.scalar_type());
  if (t.scalar_type() == gt) return t.contiguous();
  auto out = kept_empty(slot, t.sizes(), gt);
  out.copy_(t);
  return out;
}

namespace {

template <typename src_t, typename dst_t, typename idx_t>
void gather_kernel(const src_t* src, const idx_t* idx, int64_t rows, int64_t T, int64_t D, dst_t* dst) {
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t r = idx[i];
    TORCH_CHECK(r >= 0 && r < T, "gather_rows: index ", r, " is not a row of the [", T, ", ", D, "] source");
    const src_t* s = src + r * D;
    dst_t* d = dst + i * D;
    if constexpr (std::is_same_v<src_t, dst_t>) {
      std::memcpy(d, s, D * sizeof(dst_t));
    } else {
      for (int64_t j = 0; j < D; ++j) d[j] = static_cast<dst_t>(s[j]);
    }
  }
}

}  // namespace

at::Tensor gather_rows(const at::Tensor& src_in, const at::Tensor& idx_in) {
  const auto src = src_in.contiguous();
  const auto idx = idx_in.contiguous();
  const int64_t rows = idx.size(0), T = src.size(0), D = src.size(1);
  const auto gt = gemm_dtype(src.scalar_type());
  auto out = new_empty({rows, D}, src.options().dtype(gt));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "gather_rows", [&] {
    using src_t = scalar_t;
    AT_DISPATCH_INDEX_TYPES(idx.scalar_type(), "gather_rows_index", [&] {
      if (gt == src.scalar_type()) {
        gather_kernel<src_t, src_t, index_t>(src.const_data_ptr<src_t>(), idx.const_data_ptr<index_t>(), rows, T, D,
                                             out.mutable_data_ptr<src_t>());
      } else {
        gather_kernel<src_t, float, index_t>(src.const_data_ptr<src_t>(), idx.const_data_ptr<index_t>(), rows, T, D,
                                             out.mutable_data_ptr<float>());
      }
    });
  });
  return out;
}

std::vector<int64_t> read_offsets(const at::Tensor& offsets, int64_t rows, const char* op) {
  TORCH_CHECK(offsets.dim() == 1 && offsets.size(0) >= 2 && offsets.scalar_type() == at::kInt, op,
              ": offsets must be [E+1] int32, got ", offsets.sizes(), " ", offsets.scalar_type());
  const auto o = offsets.contiguous();
  const int32_t* p = o.const_data_ptr<int32_t>();
  std::vector<int64_t> bounds(p, p + o.size(0));
  TORCH_CHECK(bounds.front() >= 0, op, ": offsets[0] = ", bounds.front(), " is negative");
  for (size_t e = 0; e + 1 < bounds.size(); ++e) {
    TORCH_CHECK(bounds[e] <= bounds[e + 1], op, ": offsets must be non-decreasing, got offsets[", e, "] = ",
                bounds[e], " > offsets[", e + 1, "] = ", bounds[e + 1]);
  }
  TORCH_CHECK(bounds.back() <= rows, op, ": offsets[E] = ", bounds.back(), " exceeds the ", rows, " rows");
  return bounds;
}

void for_each_group(const std::vector<int64_t>& bounds, int64_t fixed_cost_rows,
                    const std::function<void(int64_t, int64_t, int64_t)>& body, int64_t serial_rows) {
  // Within 15% of a perfect spread, single-threaded GEMMs on every thread beat multi-threaded ones in turn.
  constexpr double kBalance = 1.15;
  const int64_t E = static_cast<int64_t>(bounds.size()) - 1;
  std::vector<int64_t> active;
  int64_t total = 0;
  for (int64_t e = 0; e < E; ++e) {
    if (bounds[e + 1] > bounds[e]) {
      active.push_back(e);
      total += bounds[e + 1] - bounds[e] + fixed_cost_rows;
    }
  }
  auto cost = [&](int64_t e) { return bounds[e + 1] - bounds[e] + fixed_cost_rows; };
  auto threaded = [&](int64_t e) { return bounds[e + 1] - bounds[e] > serial_rows; };
  auto run = [&](int64_t e) { body(e, bounds[e], bounds[e + 1]); };
  const int64_t threads = at::get_num_threads();
  if (threads == 1 || active.size() < 2 || at::in_parallel_region()) {
    for (int64_t e : active) run(e);
    return;
  }
  // heavy experts: one at a time, multi-threaded
  std::vector<int64_t> light;
  for (int64_t e : active) {
    if (threaded(e) && cost(e) * threads > total) {
      run(e);
    } else {
      light.push_back(e);
    }
  }
  if (light.size() < 2) {
    for (int64_t e : light) run(e);
    return;
  }
  // light experts: longest first onto the least loaded thread
  std::stable_sort(light.begin(), light.end(), [&](int64_t a, int64_t b) { return cost(a) > cost(b); });
  std::vector<std::vector<int64_t>> bins(threads);
  std::vector<int64_t> load(threads, 0);
  for (int64_t e : light) {
    const auto b = std::min_element(load.begin(), load.end()) - load.begin();
    bins[b].push_back(e);
    load[b] += cost(e);
  }
  const int64_t light_total = std::accumulate(load.begin(), load.end(), int64_t(0));
  const int64_t makespan = *std::max_element(load.begin(), load.end());
  const bool any_threaded = std::any_of(light.begin(), light.end(), threaded);
  if (any_threaded && static_cast<double>(makespan) * threads > kBalance * static_cast<double>(light_total)) {
    for (int64_t e : light) run(e);
    return;
  }
  at::parallel_for(0, threads, 1, [&](int64_t b0, int64_t b1) {
    // worker threads do not inherit the caller's dispatch state: keep autograd out of the per-expert ops
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    for (int64_t b = b0; b < b1; ++b) {
      for (int64_t e : bins[b]) run(e);
    }
  });
}

// --- the few-row streaming GEMM (decode) ---
// Built once per ISA level (see the ISA macros in grouped_gemm.h) and picked on first use from the features the CPU
// reports, capped by MOE_KERNELS_CPU_ISA=avx512|avx2|baseline when set.

namespace {
constexpr const char* kIsaNames[] = {"baseline", "avx2", "avx512"};  // indexed by CpuIsa
}  // namespace

CpuIsa cpu_isa() {
  static const CpuIsa isa = [] {
    CpuIsa best = CpuIsa::baseline;
#if MOE_KERNELS_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")) {
      best = CpuIsa::avx2;
    }
    if (best == CpuIsa::avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq")) {
      best = CpuIsa::avx512;
    }
#endif
    const char* cap = std::getenv("MOE_KERNELS_CPU_ISA");
    if (cap == nullptr || *cap == '\0') return best;
    for (int level = 0; level < 3; ++level) {
      if (std::strcmp(cap, kIsaNames[level]) == 0) return std::min(best, static_cast<CpuIsa>(level));
    }
    TORCH_CHECK(false, "MOE_KERNELS_CPU_ISA must be avx512, avx2 or baseline, got '", cap, "'");
  }();
  return isa;
}

const char* cpu_isa_name() { return kIsaNames[static_cast<int>(cpu_isa())]; }

bool bf16_gemm() {
  static const bool native = [] {
#if MOE_KERNELS_X86
    __builtin_cpu_init();
    return cpu_isa() == CpuIsa::avx512 &&
           (__builtin_cpu_supports("avx512bf16") || __builtin_cpu_supports("amx-bf16"));
#else
    return false;
#endif
  }();
  return native;
}

#define MOE_KERNELS_STREAM_ROWS(w_t, acc_t, avx512_bytes, name)                                                   \
  static void name##_baseline(const acc_t* a, int64_t rows, int64_t K, const w_t* w, int64_t M, const acc_t* bias, \
                              acc_t* out) {                                                                        \
    PlainRows<w_t> src{w, K};                                                                                      \
    stream_rows_impl<32>(a, rows, K, src, M, bias, out);                                                           \
  }                                                                                                                \
  MOE_KERNELS_AVX2 static void name##_avx2(const acc_t* a, int64_t rows, int64_t K, const w_t* w, int64_t M,       \
                                           const acc_t* bias, acc_t* out) {                                        \
    PlainRows<w_t> src{w, K};                                                                                      \
    stream_rows_impl<32>(a, rows, K, src, M, bias, out);                                                           \
  }                                                                                                                \
  MOE_KERNELS_AVX512 static void name##_avx512(const acc_t* a, int64_t rows, int64_t K, const w_t* w, int64_t M,   \
                                               const acc_t* bias, acc_t* out) {                                    \
    PlainRows<w_t> src{w, K};                                                                                      \
    stream_rows_impl<avx512_bytes>(a, rows, K, src, M, bias, out);                                                 \
  }                                                                                                                \
  void stream_rows(const acc_t* a, int64_t rows, int64_t K, const w_t* w, int64_t M, const acc_t* bias,            \
                   acc_t* out) {                                                                                   \
    static const auto fn = pick_isa(&name##_baseline, &name##_avx2, &name##_avx512);                               \
    fn(a, rows, K, w, M, bias, out);                                                                               \
  }
// 16-bit weights take 64-byte vectors in the AVX-512 build: widening them bounds the loop there (0.42 -> 0.30 ms on a
// decode step of the OLMoE-like layer in bf16). 32-bit weights gained nothing measurable from them.
MOE_KERNELS_STREAM_ROWS(float, float, 32, stream_rows_f32)
MOE_KERNELS_STREAM_ROWS(c10::BFloat16, float, 64, stream_rows_bf16)
MOE_KERNELS_STREAM_ROWS(c10::Half, float, 64, stream_rows_f16)
MOE_KERNELS_STREAM_ROWS(double, double, 32, stream_rows_f64)
#undef MOE_KERNELS_STREAM_ROWS

std::pair<at::Tensor, at::Tensor> rows_apart(const at::Tensor& a, const at::Tensor& b) {
  const int64_t pad = (32 - a.size(1) % 32) % 32;
  if (pad == 0 || a.scalar_type() != at::kBFloat16) return {a, b};
  return {at::constant_pad_nd(a, {0, pad}), at::constant_pad_nd(b, {0, 0, 0, pad})};
}

void gemm_bias_out(const at::Tensor& out_c, const at::Tensor& a_in, const at::Tensor& w_in, const at::Tensor& bias) {
  auto& out = const_cast<at::Tensor&>(out_c);
  if (a_in.size(0) > kStreamRows || !out.is_contiguous()) {
    const auto [a, wt] = rows_apart(a_in, to_gemm_kept(Kept::gemm_weight, w_in).t());
    if (bias.defined()) {
      at::addmm_out(out, bias, a, wt);
    } else {
      at::mm_out(out, a, wt);
    }
    return;
  }
  const auto& a = a_in;
  const auto w = w_in.contiguous();
  const auto ct = compute_dtype(w.scalar_type());
  // a bfloat16 a (bf16_gemm) is widened: a few rows
  const auto ac = a.scalar_type() == ct ? a.contiguous() : a.to(ct).contiguous();
  const auto bc = !bias.defined() || bias.scalar_type() == ct ? bias : bias.to(ct);
  const auto res = out.scalar_type() == ct ? out : new_empty(out.sizes(), out.options().dtype(ct));
  const int64_t rows = ac.size(0), K = ac.size(1), M = w.size(0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "gemm_bias_out", [&] {
    using w_t = scalar_t;
    using acc_t = std::conditional_t<std::is_same_v<w_t, double>, double, float>;  // the compute dtype
    stream_rows(ac.const_data_ptr<acc_t>(), rows, K, w.const_data_ptr<w_t>(), M,
                bc.defined() ? bc.const_data_ptr<acc_t>() : nullptr, res.mutable_data_ptr<acc_t>());
  });
  if (!res.is_same(out)) out.copy_(res);
}

at::Tensor gemm_bias(const at::Tensor& a, const at::Tensor& w, const at::Tensor& bias) {
  auto out = new_empty({a.size(0), w.size(0)}, a.options());
  gemm_bias_out(out, a, w, bias);
  return out;
}

void mm_into(const at::Tensor& dst, const at::Tensor& a_in, const at::Tensor& b_in, bool token_rows) {
  const auto [a, b] = token_rows ? rows_apart(a_in, b_in) : std::pair<at::Tensor, at::Tensor>{a_in, b_in};
  if (dst.scalar_type() == a.scalar_type()) {
    at::mm_out(const_cast<at::Tensor&>(dst), a, b);
  } else {
    auto result = kept_empty(Kept::result, {a.size(0), b.size(1)}, a.scalar_type());
    at::mm_out(result, a, b);
    const_cast<at::Tensor&>(dst).copy_(result);
  }
}

// --- the activation epilogues ---
// silu, relu, relu2 and identity run as one vectorised pass over the rows (built per ISA level like stream_rows), a
// loop of its own per base activation and per plain spec or spec with options; gelu and gelu_tanh go through ATen's
// kernels.
namespace {

bool fused_activation(ActKind a) {
  return a == ActKind::silu || a == ActKind::relu || a == ActKind::relu2 || a == ActKind::identity;
}

template <typename acc_t>
inline __attribute__((always_inline)) Vec<acc_t> splat(acc_t v) {
  return Vec<acc_t>{} + v;
}

typedef uint64_t U64x4 __attribute__((vector_size(32)));

// exp per lane, by Cody-Waite reduction by ln 2: x = n ln 2 + r, |r| <= ln 2 / 2, exp(x) = 2^n exp(r).
// float32: Cephes' degree-6 polynomial, within 1.02 ulp of the exact value (measured over all of [-86.9, 88.72]);
// past ln(FLT_MAX) it overflows to inf as the exact value does, below -86.9 (where exp falls under 2^-125) it gives
// 0; NaN kept. float64: Taylor's series to r^13 (its remainder under 5e-18 relative), within 1.2 ulp (measured over
// [-745, 710]); outside [-708, 709] (subnormal or infinite results) and at NaN, std::exp.
template <typename acc_t>
inline __attribute__((always_inline)) Vec<acc_t> exp_lanes(Vec<acc_t> x) {
  if constexpr (std::is_same_v<acc_t, double>) {
    const Vec<double> xc = x < splat(-708.0) ? splat(-708.0) : (x > splat(709.0) ? splat(709.0) : x);
    // round(x / ln 2) lands in the low mantissa bits of t: t = 1.5 * 2^52 + n exactly
    const Vec<double> t = xc * 1.4426950408889634 + 6755399441055744.0;
    const Vec<double> n = t - 6755399441055744.0;
    const Vec<double> r = (xc - n * 6.93147180369123816490e-01) - n * 1.90821492927058770002e-10;  // n ln2_hi exact
    constexpr double inv[] = {1.0 / 6227020800.0, 1.0 / 479001600.0, 1.0 / 39916800.0, 1.0 / 3628800.0,
                              1.0 / 362880.0,     1.0 / 40320.0,     1.0 / 5040.0,     1.0 / 720.0,
                              1.0 / 120.0,        1.0 / 24.0,        1.0 / 6.0,        0.5,
                              1.0,                1.0};  // 1/13! ... 1/0!
    Vec<double> p = splat(inv[0]);
    for (int i = 1; i < 14; ++i) p = p * r + inv[i];
    U64x4 bits;
    std::memcpy(&bits, &t, sizeof(bits));
    bits = (bits - 0x4338000000000000ull + 1023u) << 52;  // 2^n: n + 1023 in the exponent field
    Vec<double> scale;
    std::memcpy(&scale, &bits, sizeof(scale));
    Vec<double> e = p * scale;
    for (int l = 0; l < 4; ++l) {
      if (!(x[l] >= -708.0 && x[l] <= 709.0)) e[l] = std::exp(x[l]);
    }
    return e;
  } else {
    const Vec<float> low = splat(-86.9f);
    const Vec<float> xc = x > splat(88.7228394f) ? splat(88.7228394f) : (x < low ? low : x);  // NaN stays
    // round(x / ln 2) lands in the low mantissa bits of t: t = 1.5 * 2^23 + n exactly, -125 <= n <= 128
    const Vec<float> t = xc * 1.44269504088896341f + 12582912.0f;
    const Vec<float> n = t - 12582912.0f;
    const Vec<float> r = xc - n * 0.693359375f + n * 2.12194440e-4f;  // x - n ln 2, ln 2 split in two
    Vec<float> p = splat(1.9875691500e-4f);
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    const Vec<float> y = p * r * r + r + 1.0f;
    U32x8 bits;
    std::memcpy(&bits, &t, sizeof(bits));
    bits = (bits - 0x4B400000u + 126u) << 23;  // 2^(n-1), a normal float for every n in range
    Vec<float> half_scale;
    std::memcpy(&half_scale, &bits, sizeof(half_scale));
    const Vec<float> e = (y * 2.0f) * half_scale;  // one rounding; overflows to inf past ln(FLT_MAX)
    return x < low ? Vec<float>{} : e;
  }
}

// tanh per lane (libm's): the softcaps' only use, off the plain paths.
template <typename acc_t>
inline __attribute__((always_inline)) Vec<acc_t> tanh_lanes(Vec<acc_t> x) {
  constexpr int L = 32 / sizeof(acc_t);
  for (int l = 0; l < L; ++l) x[l] = std::tanh(x[l]);
  return x;
}

// The options of an Activation as the vectorised loops take them.
template <typename acc_t>
struct GluLanes {
  Vec<acc_t> alpha, limit, neg_limit, offset, gate_cap, up_cap;
  bool has_limit, clamp_before, clamp_after, has_offset, interleaved, has_gate_cap, has_up_cap;
  explicit GluLanes(const Activation& a)
      : alpha(splat(acc_t(a.alpha))),
        limit(splat(acc_t(a.limit))),
        neg_limit(splat(-acc_t(a.limit))),
        offset(splat(acc_t(a.up_offset))),
        gate_cap(splat(acc_t(a.has_gate_softcap ? a.gate_softcap : 1.0))),
        up_cap(splat(acc_t(a.has_up_softcap ? a.up_softcap : 1.0))),
        has_limit(a.has_limit),
        clamp_before(a.has_limit && !a.clamp_after),
        clamp_after(a.has_limit && a.clamp_after),
        has_offset(a.up_offset != 0.0),
        interleaved(a.interleaved),
        has_gate_cap(a.has_gate_softcap),
        has_up_cap(a.has_up_softcap) {}
};

// act(g) and, when wanted, act'(g) (not for relu and relu2: see times_slope), per lane, with torch's semantics (relu
// and relu2 keep NaN). kOpts: silu with o's alpha (g sigmoid(alpha g)) and gate softcap (c tanh(g / c) sigmoid(alpha
// g)); without, torch's silu.
template <ActKind K, typename acc_t, bool derivative, bool kOpts>
inline __attribute__((always_inline)) void act_lanes(Vec<acc_t> g, const GluLanes<acc_t>& o, Vec<acc_t>& value,
                                                     Vec<acc_t>& slope) {
  const Vec<acc_t> zero = {}, one = splat(acc_t(1));
  if constexpr (K == ActKind::silu) {
    const Vec<acc_t> ag = kOpts ? o.alpha * g : g;
    const Vec<acc_t> s = one / (one + exp_lanes<acc_t>(-ag));
    if (kOpts && o.has_gate_cap) {
      const Vec<acc_t> t = tanh_lanes<acc_t>(g / o.gate_cap);
      value = (o.gate_cap * t) * s;
      if constexpr (derivative) slope = (one - t * t) * s + o.gate_cap * t * o.alpha * s * (one - s);
    } else {
      value = g * s;
      if constexpr (derivative) slope = s * (one + ag * (one - s));
    }
  } else if constexpr (K == ActKind::relu) {  // the slope is applied by times_slope
    value = g > zero ? g : (g != g ? g : zero);
  } else if constexpr (K == ActKind::relu2) {  // the slope is applied by times_slope
    const Vec<acc_t> r = g > zero ? g : (g != g ? g : zero);
    value = r * r;
  } else {  // identity (the others are not fused)
    static_assert(K == ActKind::identity);
    value = g;
    if constexpr (derivative) slope = one;
  }
}

// grad * act'(g): a product, except for relu and relu2, which select as torch's threshold_backward does: 0 where
// g <= 0, grad itself (relu) or grad * 2g (relu2) elsewhere (at a NaN g too; an infinite grad at g <= 0 gives 0
// rather than 0 * inf).
template <ActKind K, typename acc_t>
inline __attribute__((always_inline)) Vec<acc_t> times_slope(Vec<acc_t> grad, Vec<acc_t> g, Vec<acc_t> slope) {
  if constexpr (K == ActKind::relu) return g <= Vec<acc_t>{} ? Vec<acc_t>{} : grad;
  if constexpr (K == ActKind::relu2) return g <= Vec<acc_t>{} ? Vec<acc_t>{} : grad * (g + g);
  return grad * slope;
}

// torch.clamp's forms, per lane: NaN stays NaN.
template <typename acc_t>
inline __attribute__((always_inline)) Vec<acc_t> clamp_max_lanes(Vec<acc_t> v, Vec<acc_t> high) {
  return v > high ? high : v;
}
template <typename acc_t>
inline __attribute__((always_inline)) Vec<acc_t> clamp_lanes(Vec<acc_t> v, Vec<acc_t> low, Vec<acc_t> high) {
  return v > high ? high : (v < low ? low : v);
}

template <typename acc_t>
inline __attribute__((always_inline)) Vec<acc_t> load_lanes(const acc_t* p, int64_t n) {
  constexpr int64_t L = 32 / sizeof(acc_t);
  Vec<acc_t> v = {};
  if (n >= L) {
    std::memcpy(&v, p, sizeof(v));  // a fixed size: one vector load
  } else {
    std::memcpy(&v, p, n * sizeof(acc_t));
  }
  return v;
}

template <typename p_t, typename acc_t>
inline __attribute__((always_inline)) Vec<acc_t> load_widened_lanes(const p_t* p, int64_t n) {
  constexpr int64_t L = 32 / sizeof(acc_t);
  if (n >= L) return load_widened<p_t, acc_t>(p);
  p_t pad[L] = {};
  std::memcpy(pad, p, n * sizeof(p_t));
  return load_widened<p_t, acc_t>(pad);
}

template <typename acc_t>
inline __attribute__((always_inline)) void store_lanes(acc_t* p, Vec<acc_t> v, int64_t n) {
  constexpr int64_t L = 32 / sizeof(acc_t);
  if (n >= L) {
    std::memcpy(p, &v, sizeof(v));
  } else {
    std::memcpy(p, &v, n * sizeof(acc_t));
  }
}

// store_lanes into a GEMM operand of dtype o_t: acc_t itself, or float32 narrowed to bfloat16 (round to nearest
// even, NaN kept NaN, as c10::BFloat16 rounds).
template <typename o_t, typename acc_t>
inline __attribute__((always_inline)) void store_narrowed_lanes(o_t* p, Vec<acc_t> v, int64_t n) {
  if constexpr (std::is_same_v<o_t, acc_t>) {
    store_lanes(p, v, n);
  } else {
    static_assert(std::is_same_v<o_t, c10::BFloat16> && std::is_same_v<acc_t, float>);
    U32x8 bits;
    std::memcpy(&bits, &v, sizeof(bits));
    const U32x8 rounded = v != v ? U32x8{} + 0x7fc0u : bf16_rounded_bits(bits);
    const U16x8 h = __builtin_convertvector(rounded, U16x8);
    if (n >= 8) {
      std::memcpy(p, &h, sizeof(h));  // a fixed size: one vector store, not a call
    } else {
      std::memcpy(p, &h, n * sizeof(o_t));
    }
  }
}

template <typename acc_t>
inline __attribute__((always_inline)) acc_t sum_lanes(Vec<acc_t> v) {
  constexpr int64_t L = 32 / sizeof(acc_t);
  acc_t lanes[L];
  std::memcpy(lanes, &v, sizeof(lanes));
  for (int64_t width = L / 2; width > 0; width /= 2) {
    for (int64_t l = 0; l < width; ++l) lanes[l] += lanes[l + width];
  }
  return lanes[0];
}

// The gate and up lanes of columns [j, j + n) (up to a vector of them) of a gated row of width 2N: from the halves
// (gate at j, up at N + j), or interleaved (gate at 2j, up at 2j + 1: two vectors split into their even and odd
// lanes).
template <typename p_t, typename acc_t>
inline __attribute__((always_inline)) void load_gate_up(const p_t* row, int64_t N, int64_t j, int64_t n,
                                                        bool interleaved, Vec<acc_t>& gate, Vec<acc_t>& up) {
  constexpr int64_t L = 32 / sizeof(acc_t);
  if (!interleaved) {
    gate = load_widened_lanes<p_t, acc_t>(row + j, n);
    up = load_widened_lanes<p_t, acc_t>(row + N + j, n);
    return;
  }
  const int64_t both = 2 * std::min(n, L);
  const Vec<acc_t> lo = load_widened_lanes<p_t, acc_t>(row + 2 * j, std::min(both, L));
  const Vec<acc_t> hi = both > L ? load_widened_lanes<p_t, acc_t>(row + 2 * j + L, both - L) : Vec<acc_t>{};
  if constexpr (L == 8) {
    gate = __builtin_shufflevector(lo, hi, 0, 2, 4, 6, 8, 10, 12, 14);
    up = __builtin_shufflevector(lo, hi, 1, 3, 5, 7, 9, 11, 13, 15);
  } else {
    static_assert(L == 4);
    gate = __builtin_shufflevector(lo, hi, 0, 2, 4, 6);
    up = __builtin_shufflevector(lo, hi, 1, 3, 5, 7);
  }
}

// Stores the gate and up lanes of columns [j, j + n) of a gated row of width 2N, laid out as load_gate_up reads them.
template <typename o_t, typename acc_t>
inline __attribute__((always_inline)) void store_gate_up(o_t* row, int64_t N, int64_t j, int64_t n, bool interleaved,
                                                         Vec<acc_t> gate, Vec<acc_t> up) {
  constexpr int64_t L = 32 / sizeof(acc_t);
  if (!interleaved) {
    store_narrowed_lanes<o_t, acc_t>(row + j, gate, n);
    store_narrowed_lanes<o_t, acc_t>(row + N + j, up, n);
    return;
  }
  Vec<acc_t> lo, hi;
  if constexpr (L == 8) {
    lo = __builtin_shufflevector(gate, up, 0, 8, 1, 9, 2, 10, 3, 11);
    hi = __builtin_shufflevector(gate, up, 4, 12, 5, 13, 6, 14, 7, 15);
  } else {
    static_assert(L == 4);
    lo = __builtin_shufflevector(gate, up, 0, 4, 1, 5);
    hi = __builtin_shufflevector(gate, up, 2, 6, 3, 7);
  }
  const int64_t both = 2 * std::min(n, L);
  store_narrowed_lanes<o_t, acc_t>(row + 2 * j, lo, std::min(both, L));
  if (both > L) store_narrowed_lanes<o_t, acc_t>(row + 2 * j + L, hi, both - L);
}

// out [rows, N] = act(gate) * up (gated, M = 2N) or act(h) (M = N), for h [rows, M]; h and out in g_t (the GEMM
// dtype: acc_t, or bfloat16 under bf16_gemm); save [rows, M] (nullable) gets h narrowed to s_t in the same pass.
// kOpts: with the options of a (alpha, the limit's clamps, the softcaps, up_offset, the interleaved layout); without,
// the plain activation of the halves (a's options unread).
template <ActKind K, bool kOpts, typename s_t, typename g_t, typename acc_t>
inline __attribute__((always_inline)) void act_rows_impl(const g_t* h, int64_t rows, int64_t M, const Activation& a,
                                                         bool gated, g_t* out, s_t* save) {
  constexpr int64_t L = 32 / sizeof(acc_t);
  const int64_t N = gated ? M / 2 : M;
  const GluLanes<acc_t> o(a);
  for (int64_t r = 0; r < rows; ++r) {
    const g_t* hr = h + r * M;
    for (int64_t j = 0; j < N; j += L) {
      const int64_t n = N - j;
      Vec<acc_t> value, unused;
      if constexpr (!kOpts) {
        act_lanes<K, acc_t, false, false>(load_widened_lanes<g_t, acc_t>(hr + j, n), o, value, unused);
        if (gated) value *= load_widened_lanes<g_t, acc_t>(hr + N + j, n);
      } else if (!gated) {  // alpha is the one option of experts that are not gated
        act_lanes<K, acc_t, false, true>(load_widened_lanes<g_t, acc_t>(hr + j, n), o, value, unused);
      } else {
        Vec<acc_t> gate, up;
        load_gate_up<g_t, acc_t>(hr, N, j, n, o.interleaved, gate, up);
        if (o.clamp_before) gate = clamp_max_lanes<acc_t>(gate, o.limit);
        if (o.has_limit) up = clamp_lanes<acc_t>(up, o.neg_limit, o.limit);
        if (o.has_up_cap) up = o.up_cap * tanh_lanes<acc_t>(up / o.up_cap);
        act_lanes<K, acc_t, false, true>(gate, o, value, unused);
        if (o.clamp_after) value = clamp_max_lanes<acc_t>(value, o.limit);
        value *= o.has_offset ? up + o.offset : up;
      }
      store_narrowed_lanes<g_t, acc_t>(out + r * N + j, value, n);
    }
    if (save != nullptr) {
      for (int64_t j = 0; j < M; ++j) save[r * M + j] = static_cast<s_t>(static_cast<acc_t>(hr[j]));
    }
  }
}

// From pre [rows, M] in its storage dtype p_t and dh [rows, N]: dpre [rows, M] = the gradient of act_rows' output
// w.r.t. pre given dh * scale[r] (scale nullable: 1); h [rows, N] = act_rows(pre) and hdot[r] = sum_j dh * h
// (unscaled; lanes summed in a fixed order), each nullable. dh, dpre and h in g_t (the GEMM dtype), scale and
// hdot in acc_t. kOpts as for act_rows_impl; the clamps pass the gradient where their input lies within the
// bounds (bounds included, NaN nowhere) and give 0 elsewhere, selected (an infinite gradient there gives 0).
template <ActKind K, bool kOpts, typename p_t, typename g_t, typename acc_t>
inline __attribute__((always_inline)) void act_backward_rows_impl(const p_t* pre, int64_t rows, int64_t M,
                                                                  const Activation& a, bool gated, const g_t* dh,
                                                                  const acc_t* scale, g_t* dpre, g_t* h,
                                                                  acc_t* hdot) {
  constexpr int64_t L = 32 / sizeof(acc_t);
  const int64_t N = gated ? M / 2 : M;
  const GluLanes<acc_t> o(a);
  const Vec<acc_t> zero = {}, one = splat(acc_t(1));
  for (int64_t r = 0; r < rows; ++r) {
    const p_t* pr = pre + r * M;
    const g_t* dr = dh + r * N;
    const Vec<acc_t> s = splat(scale != nullptr ? scale[r] : acc_t(1));
    Vec<acc_t> dot = {};
    for (int64_t j = 0; j < N; j += L) {
      const int64_t n = N - j;
      const Vec<acc_t> grad = load_widened_lanes<g_t, acc_t>(dr + j, n);
      const Vec<acc_t> d = grad * s;
      Vec<acc_t> value, slope = {};
      if constexpr (!kOpts) {
        const Vec<acc_t> gate = load_widened_lanes<p_t, acc_t>(pr + j, n);
        act_lanes<K, acc_t, true, false>(gate, o, value, slope);
        if (gated) {
          const Vec<acc_t> up = load_widened_lanes<p_t, acc_t>(pr + N + j, n);
          store_narrowed_lanes<g_t, acc_t>(dpre + r * M + j, times_slope<K, acc_t>(d * up, gate, slope), n);
          store_narrowed_lanes<g_t, acc_t>(dpre + r * M + N + j, d * value, n);
          value *= up;
        } else {
          store_narrowed_lanes<g_t, acc_t>(dpre + r * M + j, times_slope<K, acc_t>(d, gate, slope), n);
        }
      } else if (!gated) {  // alpha only
        const Vec<acc_t> gate = load_widened_lanes<p_t, acc_t>(pr + j, n);
        act_lanes<K, acc_t, true, true>(gate, o, value, slope);
        store_narrowed_lanes<g_t, acc_t>(dpre + r * M + j, times_slope<K, acc_t>(d, gate, slope), n);
      } else {
        Vec<acc_t> gate0, up0;
        load_gate_up<p_t, acc_t>(pr, N, j, n, o.interleaved, gate0, up0);
        const Vec<acc_t> gate = o.clamp_before ? clamp_max_lanes<acc_t>(gate0, o.limit) : gate0;
        Vec<acc_t> up = o.has_limit ? clamp_lanes<acc_t>(up0, o.neg_limit, o.limit) : up0;
        Vec<acc_t> t_up = {};
        if (o.has_up_cap) {
          t_up = tanh_lanes<acc_t>(up / o.up_cap);
          up = o.up_cap * t_up;
        }
        if (o.has_offset) up += o.offset;
        act_lanes<K, acc_t, true, true>(gate, o, value, slope);
        Vec<acc_t> d_act = d * up;
        if (o.clamp_after) {
          d_act = value <= o.limit ? d_act : zero;
          value = clamp_max_lanes<acc_t>(value, o.limit);
        }
        Vec<acc_t> d_gate = times_slope<K, acc_t>(d_act, gate, slope);
        Vec<acc_t> d_up = d * value;
        if (o.has_up_cap) d_up *= one - t_up * t_up;
        if (o.clamp_before) d_gate = gate0 <= o.limit ? d_gate : zero;
        if (o.has_limit) d_up = (up0 >= o.neg_limit) & (up0 <= o.limit) ? d_up : zero;
        store_gate_up<g_t, acc_t>(dpre + r * M, N, j, n, o.interleaved, d_gate, d_up);
        value *= up;
      }
      if (h != nullptr) store_narrowed_lanes<g_t, acc_t>(h + r * N + j, value, n);
      dot += grad * value;  // zero-padded lanes of a tail add 0 * value
    }
    if (hdot != nullptr) hdot[r] = sum_lanes<acc_t>(dot);
  }
}

// act_rows_impl / act_backward_rows_impl for a's kind and whether it has options: a loop of its own for each, the
// choice made once per call.
template <typename s_t, typename g_t, typename acc_t>
inline __attribute__((always_inline)) void act_rows_any(const g_t* h, int64_t rows, int64_t M, const Activation& a,
                                                        bool gated, g_t* out, s_t* save) {
  const bool opts = !a.plain();
#define MOE_KERNELS_CASE(K)                                                                          \
  case ActKind::K:                                                                                   \
    return opts ? act_rows_impl<ActKind::K, true, s_t, g_t, acc_t>(h, rows, M, a, gated, out, save) \
                : act_rows_impl<ActKind::K, false, s_t, g_t, acc_t>(h, rows, M, a, gated, out, save)
  switch (a.kind) {
    MOE_KERNELS_CASE(silu);
    MOE_KERNELS_CASE(relu);
    MOE_KERNELS_CASE(relu2);
    MOE_KERNELS_CASE(identity);
    default: TORCH_CHECK(false, "the vectorised activation pass has no ", kActivationNames[int(a.kind)]);
  }
#undef MOE_KERNELS_CASE
}

template <typename p_t, typename g_t, typename acc_t>
inline __attribute__((always_inline)) void act_backward_rows_any(const p_t* pre, int64_t rows, int64_t M,
                                                                 const Activation& a, bool gated, const g_t* dh,
                                                                 const acc_t* scale, g_t* dpre, g_t* h, acc_t* hdot) {
  const bool opts = !a.plain();
#define MOE_KERNELS_CASE(K)                                                                                    \
  case ActKind::K:                                                                                             \
    return opts ? act_backward_rows_impl<ActKind::K, true, p_t, g_t, acc_t>(pre, rows, M, a, gated, dh, scale, \
                                                                            dpre, h, hdot)                     \
                : act_backward_rows_impl<ActKind::K, false, p_t, g_t, acc_t>(pre, rows, M, a, gated, dh, scale, \
                                                                             dpre, h, hdot)
  switch (a.kind) {
    MOE_KERNELS_CASE(silu);
    MOE_KERNELS_CASE(relu);
    MOE_KERNELS_CASE(relu2);
    MOE_KERNELS_CASE(identity);
    default: TORCH_CHECK(false, "the vectorised activation pass has no ", kActivationNames[int(a.kind)]);
  }
#undef MOE_KERNELS_CASE
}

#define MOE_KERNELS_ACT_ROWS(p_t, g_t, acc_t, name)                                                               \
  static void name##_fwd_baseline(const g_t* h, int64_t rows, int64_t M, const Activation& a, bool gated,         \
                                  g_t* out, p_t* save) {                                                          \
    act_rows_any<p_t, g_t, acc_t>(h, rows, M, a, gated, out, save);                                               \
  }                                                                                                               \
  MOE_KERNELS_AVX2 static void name##_fwd_avx2(const g_t* h, int64_t rows, int64_t M, const Activation& a,        \
                                               bool gated, g_t* out, p_t* save) {                                 \
    act_rows_any<p_t, g_t, acc_t>(h, rows, M, a, gated, out, save);                                               \
  }                                                                                                               \
  MOE_KERNELS_AVX512 static void name##_fwd_avx512(const g_t* h, int64_t rows, int64_t M, const Activation& a,    \
                                                   bool gated, g_t* out, p_t* save) {                             \
    act_rows_any<p_t, g_t, acc_t>(h, rows, M, a, gated, out, save);                                               \
  }                                                                                                               \
  static void name##_bwd_baseline(const p_t* pre, int64_t rows, int64_t M, const Activation& a, bool gated,       \
                                  const g_t* dh, const acc_t* scale, g_t* dpre, g_t* h, acc_t* hdot) {            \
    act_backward_rows_any<p_t, g_t, acc_t>(pre, rows, M, a, gated, dh, scale, dpre, h, hdot);                     \
  }                                                                                                               \
  MOE_KERNELS_AVX2 static void name##_bwd_avx2(const p_t* pre, int64_t rows, int64_t M, const Activation& a,      \
                                               bool gated, const g_t* dh, const acc_t* scale, g_t* dpre, g_t* h,  \
                                               acc_t* hdot) {                                                     \
    act_backward_rows_any<p_t, g_t, acc_t>(pre, rows, M, a, gated, dh, scale, dpre, h, hdot);                     \
  }                                                                                                               \
  MOE_KERNELS_AVX512 static void name##_bwd_avx512(const p_t* pre, int64_t rows, int64_t M, const Activation& a,  \
                                                   bool gated, const g_t* dh, const acc_t* scale, g_t* dpre,      \
                                                   g_t* h, acc_t* hdot) {                                         \
    act_backward_rows_any<p_t, g_t, acc_t>(pre, rows, M, a, gated, dh, scale, dpre, h, hdot);                     \
  }                                                                                                               \
  void act_rows(const g_t* h, int64_t rows, int64_t M, const Activation& a, bool gated, g_t* out, p_t* save) {    \
    static const auto fn = pick_isa(&name##_fwd_baseline, &name##_fwd_avx2, &name##_fwd_avx512);                  \
    fn(h, rows, M, a, gated, out, save);                                                                          \
  }                                                                                                               \
  void act_backward_rows(const p_t* pre, int64_t rows, int64_t M, const Activation& a, bool gated, const g_t* dh, \
                         const acc_t* scale, g_t* dpre, g_t* h, acc_t* hdot) {                                    \
    static const auto fn = pick_isa(&name##_bwd_baseline, &name##_bwd_avx2, &name##_bwd_avx512);                  \
    fn(pre, rows, M, a, gated, dh, scale, dpre, h, hdot);                                                         \
  }
MOE_KERNELS_ACT_ROWS(float, float, float, act_rows_f32)
MOE_KERNELS_ACT_ROWS(c10::BFloat16, float, float, act_rows_bf16)
MOE_KERNELS_ACT_ROWS(c10::Half, float, float, act_rows_f16)
MOE_KERNELS_ACT_ROWS(double, double, double, act_rows_f64)
MOE_KERNELS_ACT_ROWS(c10::BFloat16, c10::BFloat16, float, act_rows_bf16_gemm)
#undef MOE_KERNELS_ACT_ROWS

inline __attribute__((always_inline)) void exp_doubles_impl(const double* x, int64_t n, double* out) {
  for (int64_t i = 0; i < n; i += 4) {
    const int64_t m = n - i;  // a tail is zero-padded to a full vector; its extra lanes are not stored
    store_lanes(out + i, exp_lanes<double>(load_lanes(x + i, m)), m);
  }
}
static void exp_doubles_baseline(const double* x, int64_t n, double* out) { exp_doubles_impl(x, n, out); }
MOE_KERNELS_AVX2 static void exp_doubles_avx2(const double* x, int64_t n, double* out) {
  exp_doubles_impl(x, n, out);
}
MOE_KERNELS_AVX512 static void exp_doubles_avx512(const double* x, int64_t n, double* out) {
  exp_doubles_impl(x, n, out);
}

at::Tensor act(const at::Tensor& x, const Activation& a) {
  switch (a.kind) {
    case ActKind::silu:
      if (a.has_gate_softcap) return at::tanh(x / a.gate_softcap) * a.gate_softcap * at::sigmoid(x * a.alpha);
      return a.alpha == 1.0 ? at::silu(x) : x * at::sigmoid(x * a.alpha);
    case ActKind::gelu: return at::gelu(x);
    case ActKind::gelu_tanh: return at::gelu(x, "tanh");
    case ActKind::relu: return at::relu(x);
    case ActKind::relu2: return at::relu(x).square();
    case ActKind::identity: return x;
  }
  TORCH_CHECK(false, "unreachable activation");
}

// dst = grad * act'(x); relu and relu2 select as threshold_backward does (0 where x <= 0)
void act_backward_out(const at::Tensor& dst_c, const at::Tensor& grad, const at::Tensor& x, const Activation& a) {
  auto& dst = const_cast<at::Tensor&>(dst_c);
  switch (a.kind) {
    case ActKind::silu:
      if (a.has_gate_softcap) {
        const auto s = at::sigmoid(x * a.alpha);
        const auto t = at::tanh(x / a.gate_softcap);
        at::mul_out(dst, grad, (1 - t * t) * s + t * a.gate_softcap * a.alpha * s * (1 - s));
      } else if (a.alpha == 1.0) {
        at::silu_backward_out(dst, grad, x);
      } else {
        const auto ax = x * a.alpha;
        const auto s = at::sigmoid(ax);
        at::mul_out(dst, grad, s * (ax * (1 - s) + 1));
      }
      return;
    case ActKind::gelu: at::gelu_backward_out(dst, grad, x); return;
    case ActKind::gelu_tanh: at::gelu_backward_out(dst, grad, x, "tanh"); return;
    case ActKind::relu: at::threshold_backward_out(dst, grad, x, 0); return;
    case ActKind::relu2: at::threshold_backward_out(dst, grad * (x * 2), x, 0); return;
    case ActKind::identity: dst.copy_(grad); return;
  }
}

// The gate and up columns of a gated [rows, 2N] tensor as a lays them out (views).
std::pair<at::Tensor, at::Tensor> gate_and_up(const at::Tensor& t, const Activation& a) {
  const int64_t M = t.size(1), N = M / 2;
  if (a.interleaved) return {t.slice(1, 0, M, 2), t.slice(1, 1, M, 2)};
  return {t.narrow(1, 0, N), t.narrow(1, N, N)};
}

bool fused_rows(const at::Tensor& t) { return t.dim() == 2 && t.is_contiguous(); }

}  // namespace

void exp_into(const double* x, int64_t n, double* out) {
  static const auto fn = pick_isa(&exp_doubles_baseline, &exp_doubles_avx2, &exp_doubles_avx512);
  fn(x, n, out);
}

bool act_rows_vectorised(const float* pre, int64_t rows, int64_t H2, const Activation& a, bool gated, float* h) {
  if (!fused_activation(a.kind)) return false;
  act_rows(pre, rows, H2, a, gated, h, static_cast<float*>(nullptr));
  return true;
}

void gated_act_into(const at::Tensor& dst_c, const at::Tensor& h, const Activation& a, bool gated,
                    const at::Tensor& save) {
  auto& dst = const_cast<at::Tensor&>(dst_c);
  const auto ct = compute_dtype(h.scalar_type());
  const int64_t rows = h.size(0), M = h.size(1);
  if (fused_activation(a.kind) && fused_rows(h) && h.scalar_type() == at::kBFloat16 && !save.defined()) {
    const auto out = dst.scalar_type() == at::kBFloat16 && fused_rows(dst)
                         ? dst
                         : kept_empty(Kept::act, dst.sizes(), at::kBFloat16);
    act_rows(h.const_data_ptr<c10::BFloat16>(), rows, M, a, gated, out.mutable_data_ptr<c10::BFloat16>(),
             static_cast<c10::BFloat16*>(nullptr));
    if (!out.is_same(dst)) dst.copy_(out);
    return;
  }
  if (fused_activation(a.kind) && h.scalar_type() == ct && fused_rows(h) &&
      (!save.defined() || (fused_rows(save) && compute_dtype(save.scalar_type()) == ct))) {
    const auto out = dst.scalar_type() == ct && fused_rows(dst) ? dst : kept_empty(Kept::act, dst.sizes(), ct);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, save.defined() ? save.scalar_type() : ct,
                                    "gated_act_into", [&] {
      using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
      act_rows(h.const_data_ptr<acc_t>(), rows, M, a, gated, out.mutable_data_ptr<acc_t>(),
               save.defined() ? save.mutable_data_ptr<scalar_t>() : nullptr);
    });
    if (!out.is_same(dst)) dst.copy_(out);
    return;
  }
  if (save.defined()) const_cast<at::Tensor&>(save).copy_(h);
  // ATen's kernels, in the compute dtype (a bfloat16 h is widened)
  const auto hc = h.to(ct);
  if (!gated) {
    dst.copy_(act(hc, a));
    return;
  }
  const int64_t half = M / 2;
  if (a.plain()) {
    if (dst.scalar_type() == ct) {
      at::mul_out(dst, act(hc.narrow(1, 0, half), a), hc.narrow(1, half, half));
    } else {
      dst.copy_(act(hc.narrow(1, 0, half), a) * hc.narrow(1, half, half));
    }
    return;
  }
  // the options, as moe_kernels.reference.activations.glu writes them
  auto [gate, up] = gate_and_up(hc, a);
  if (a.has_limit) {
    if (!a.clamp_after) gate = at::clamp_max(gate, a.limit);
    up = at::clamp(up, -a.limit, a.limit);
  }
  if (a.has_up_softcap) up = at::tanh(up / a.up_softcap) * a.up_softcap;
  auto g = act(gate, a);
  if (a.has_limit && a.clamp_after) g = at::clamp_max(g, a.limit);
  if (a.up_offset != 0.0) up = up + a.up_offset;
  dst.copy_(g * up);
}

at::Tensor gated_act(const at::Tensor& h, const Activation& a, bool gated) {
  auto out = new_empty({h.size(0), gated ? h.size(1) / 2 : h.size(1)}, h.options());
  gated_act_into(out, h, a, gated);
  return out;
}

void gated_act_backward_into(const at::Tensor& dpre_c, const at::Tensor& dh, const at::Tensor& pre,
                             const Activation& a, bool gated, const at::Tensor& scale, const at::Tensor& h_c,
                             const at::Tensor& hdot_c) {
  auto &dpre = const_cast<at::Tensor&>(dpre_c), &h = const_cast<at::Tensor&>(h_c),
       &hdot = const_cast<at::Tensor&>(hdot_c);
  const auto ct = compute_dtype(pre.scalar_type());
  const auto gt = dh.scalar_type();  // the GEMM dtype: ct, or bfloat16 under bf16_gemm
  const int64_t rows = pre.size(0), M = pre.size(1), N = gated ? M / 2 : M;
  TORCH_CHECK(dpre.sizes() == pre.sizes() && dpre.scalar_type() == gt && dh.sizes() == at::IntArrayRef({rows, N}) &&
                  (gt == ct || (gt == at::kBFloat16 && pre.scalar_type() == at::kBFloat16)) &&
                  (!scale.defined() || (scale.numel() == rows && scale.scalar_type() == ct)) &&
                  (!h.defined() || (h.sizes() == dh.sizes() && h.scalar_type() == gt)) &&
                  (!hdot.defined() || (hdot.numel() == rows && hdot.scalar_type() == ct)),
              "gated_act_backward_into: shapes or dtypes disagree");
  if (fused_activation(a.kind) && fused_rows(pre) && fused_rows(dpre) && fused_rows(dh) &&
      (!scale.defined() || scale.is_contiguous()) && (!h.defined() || fused_rows(h)) &&
      (!hdot.defined() || hdot.is_contiguous())) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pre.scalar_type(), "gated_act_backward_into", [&] {
      using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
      using g_t = std::conditional_t<std::is_same_v<scalar_t, c10::BFloat16>, c10::BFloat16, acc_t>;
      if (gt == ct || std::is_same_v<g_t, acc_t>) {
        act_backward_rows(pre.const_data_ptr<scalar_t>(), rows, M, a, gated, dh.const_data_ptr<acc_t>(),
                          scale.defined() ? scale.const_data_ptr<acc_t>() : nullptr, dpre.mutable_data_ptr<acc_t>(),
                          h.defined() ? h.mutable_data_ptr<acc_t>() : nullptr,
                          hdot.defined() ? hdot.mutable_data_ptr<acc_t>() : nullptr);
      } else {
        act_backward_rows(pre.const_data_ptr<scalar_t>(), rows, M, a, gated, dh.const_data_ptr<g_t>(),
                          scale.defined() ? scale.const_data_ptr<acc_t>() : nullptr, dpre.mutable_data_ptr<g_t>(),
                          h.defined() ? h.mutable_data_ptr<g_t>() : nullptr,
                          hdot.defined() ? hdot.mutable_data_ptr<acc_t>() : nullptr);
      }
    });
    return;
  }
  // ATen's kernels, in the compute dtype; results narrowed into the GEMM dtype where that is bfloat16
  const auto p = to_compute(pre);
  const auto dhc = dh.to(ct);
  const auto d = scale.defined() ? dhc * scale.reshape({rows, 1}) : dhc;
  auto dp = gt == ct ? dpre : new_empty(dpre.sizes(), dpre.options().dtype(ct));
  at::Tensor value;
  if (!gated) {
    value = act(p, a);
    act_backward_out(dp, d, p, a);
  } else if (a.plain()) {
    const auto gate = p.narrow(1, 0, N);
    const auto a_gate = act(gate, a);
    value = a_gate * p.narrow(1, N, N);
    act_backward_out(dp.narrow(1, 0, N), d * p.narrow(1, N, N), gate, a);
    auto d_up = dp.narrow(1, N, N);
    at::mul_out(d_up, d, a_gate);
  } else {
    // the options, as moe_kernels.reference.activations.glu_backward writes them
    const auto [gate0, up0] = gate_and_up(p, a);
    const auto gate = a.has_limit && !a.clamp_after ? at::clamp_max(gate0, a.limit) : gate0;
    auto up = a.has_limit ? at::clamp(up0, -a.limit, a.limit) : up0;
    at::Tensor t_up;
    if (a.has_up_softcap) {
      t_up = at::tanh(up / a.up_softcap);
      up = t_up * a.up_softcap;
    }
    if (a.up_offset != 0.0) up = up + a.up_offset;
    auto g = act(gate, a);
    auto d_act = d * up;
    if (a.has_limit && a.clamp_after) {
      d_act = at::where(g <= a.limit, d_act, 0);
      g = at::clamp_max(g, a.limit);
    }
    auto d_gate = new_empty_like(gate);
    act_backward_out(d_gate, d_act, gate, a);
    auto d_up = d * g;
    if (a.has_up_softcap) d_up = d_up * (1 - t_up * t_up);
    if (a.has_limit) {
      if (!a.clamp_after) d_gate = at::where(gate0 <= a.limit, d_gate, 0);
      d_up = at::where(at::logical_and(up0 >= -a.limit, up0 <= a.limit), d_up, 0);
    }
    auto [dp_gate, dp_up] = gate_and_up(dp, a);
    dp_gate.copy_(d_gate);
    dp_up.copy_(d_up);
    value = g * up;
  }
  if (h.defined()) h.copy_(value);
  if (hdot.defined()) hdot.copy_((dhc * value).sum(1));
  if (!dp.is_same(dpre)) dpre.copy_(dp);
}

namespace {

struct KeptScratch {
  std::mutex mutex;
  at::Tensor buffer;  // bytes
  bool in_use = false;
};

// Never destroyed: no destructor runs at exit, when torch's allocator may already be gone.
KeptScratch& kept_scratch() {
  static auto* kept = new KeptScratch();
  return *kept;
}

}  // namespace

Scratch::Scratch(at::IntArrayRef shape, const at::TensorOptions& options) {
  const int64_t bytes = c10::multiply_integers(shape) * static_cast<int64_t>(options.dtype().itemsize());
  if (bytes > 0 && bytes <= kMaxBytes && !poison_mode()) {
    auto& kept = kept_scratch();
    std::lock_guard<std::mutex> lock(kept.mutex);
    if (!kept.in_use) {
      if (!kept.buffer.defined() || kept.buffer.numel() < bytes) {
        kept.buffer = at::empty({bytes}, options.dtype(at::kByte));
      }
      tensor_ = kept.buffer.narrow(0, 0, bytes).view(options.dtype().toScalarType()).view(shape);
      kept.in_use = kept_ = true;
    }
  }
  if (!kept_) tensor_ = new_empty(shape, options);
}

Scratch::~Scratch() {
  if (!kept_) return;
  tensor_.reset();
  auto& kept = kept_scratch();
  std::lock_guard<std::mutex> lock(kept.mutex);
  kept.in_use = false;
}

namespace {

struct GroupedArgs {
  at::Tensor a, w, bias;  // contiguous; bias undefined when absent
  std::vector<int64_t> bounds;
  Activation act;
  bool gated;
};

GroupedArgs grouped_args(const char* op, const at::Tensor& a, const at::Tensor& w, const at::Tensor& offsets,
                         const std::optional<at::Tensor>& bias, c10::string_view activation, bool gated) {
  TORCH_CHECK(a.dim() == 2 && w.dim() == 3 && a.size(1) == w.size(2), op,
              ": a must be [N, K] and w [E, M, K], got a ", a.sizes(), " and w ", w.sizes());
  TORCH_CHECK(at::isFloatingType(a.scalar_type()) && a.scalar_type() == w.scalar_type(), op,
              ": a and w must share a floating dtype, got ", a.scalar_type(), " and ", w.scalar_type());
  TORCH_CHECK(offsets.dim() == 1 && offsets.size(0) == w.size(0) + 1, op, ": offsets must be [E+1] = [",
              w.size(0) + 1, "], got ", offsets.sizes());
  TORCH_CHECK(!gated || w.size(1) % 2 == 0, op, ": gated needs an even M (gate and up halves), got w ", w.sizes());
  TORCH_CHECK(a.size(0) < (int64_t(1) << 31), op, ": a ", a.sizes(), " has more rows than int32 offsets address");
  GroupedArgs g{a.contiguous(), w.contiguous(), at::Tensor(), read_offsets(offsets, a.size(0), op),
                parse_activation(activation, gated, op), gated};
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 2 && bias->size(0) == w.size(0) && bias->size(1) == w.size(1), op,
                ": bias must be [E, M] = [", w.size(0), ", ", w.size(1), "], got ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == a.scalar_type(), op, ": bias must have a's dtype ", a.scalar_type(),
                ", got ", bias->scalar_type());
    g.bias = bias->contiguous();
  }
  return g;
}

// Zero the rows of t outside [bounds[0], bounds[E]).
void zero_outside(at::Tensor& t, const std::vector<int64_t>& bounds) {
  t.narrow(0, 0, bounds.front()).zero_();
  t.narrow(0, bounds.back(), t.size(0) - bounds.back()).zero_();
}

at::Tensor grouped_mm(const at::Tensor& a_in, const at::Tensor& w_in, const at::Tensor& offsets,
                      const std::optional<at::Tensor>& bias_in, c10::string_view activation, bool gated) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const GroupedArgs g = grouped_args("grouped_mm", a_in, w_in, offsets, bias_in, activation, gated);
  const int64_t N = g.a.size(0), M = g.w.size(1);
  auto out = new_empty({N, gated ? M / 2 : M}, g.a.options());
  zero_outside(out, g.bounds);
  const bool in_place = !gated && g.act.kind == ActKind::identity && g.act.plain() &&
                        g.a.scalar_type() == gemm_dtype(g.a.scalar_type());
  for_each_group(g.bounds, 16, [&](int64_t e, int64_t lo, int64_t hi) {
    const auto a = to_gemm_kept(Kept::input, g.a.slice(0, lo, hi));
    const auto w = g.w[e];
    const auto b = g.bias.defined() ? to_gemm(g.bias[e]) : at::Tensor();
    if (in_place) {
      gemm_bias_out(out.slice(0, lo, hi), a, w, b);
    } else {
      gated_act_into(out.slice(0, lo, hi), gemm_bias(a, w, b), g.act, g.gated);
    }
  }, kStreamRows);
  return out;
}

// -> (grad_a [N, K], grad_w [E, M, K] ([0] unless want_grad_w: a frozen weight skips its GEMM), grad_bias [E, M]
// or [0] without bias). The pre-activation is recomputed per expert.
std::tuple<at::Tensor, at::Tensor, at::Tensor> grouped_mm_backward(const at::Tensor& grad_in, const at::Tensor& a_in,
                                                                   const at::Tensor& w_in, const at::Tensor& offsets,
                                                                   const std::optional<at::Tensor>& bias_in,
                                                                   c10::string_view activation, bool gated,
                                                                   bool want_grad_w) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const GroupedArgs g = grouped_args("grouped_mm_backward", a_in, w_in, offsets, bias_in, activation, gated);
  const int64_t N = g.a.size(0), E = g.w.size(0), M = g.w.size(1);
  TORCH_CHECK(grad_in.dim() == 2 && grad_in.size(0) == N && grad_in.size(1) == (gated ? M / 2 : M),
              "grouped_mm_backward: grad must be [N, ", gated ? M / 2 : M, "] = the output's shape, got ",
              grad_in.sizes());
  const auto grad = grad_in.contiguous();
  auto grad_a = new_empty_like(g.a);
  auto grad_w = want_grad_w ? new_empty_like(g.w) : new_empty({0}, g.a.options());
  auto grad_b = g.bias.defined() ? new_empty_like(g.bias) : new_empty({0}, g.a.options());
  zero_outside(grad_a, g.bounds);
  for (int64_t e = 0; e < E; ++e) {
    if (g.bounds[e + 1] > g.bounds[e]) continue;
    if (want_grad_w) grad_w[e].zero_();
    if (g.bias.defined()) grad_b[e].zero_();
  }
  const bool recompute = gated || g.act.kind != ActKind::identity || !g.act.plain();
  for_each_group(g.bounds, 16, [&](int64_t e, int64_t lo, int64_t hi) {
    const auto a = to_gemm_kept(Kept::input, g.a.slice(0, lo, hi));
    const auto w = to_gemm_kept(Kept::weight_a, g.w[e]);
    auto dh = to_gemm_kept(Kept::grad, grad.slice(0, lo, hi));
    if (recompute) {
      const auto pre = gemm_bias(a, w, g.bias.defined() ? to_gemm(g.bias[e]) : at::Tensor());
      auto dpre = kept_empty(Kept::pre, pre.sizes(), pre.scalar_type());
      gated_act_backward_into(dpre, dh, pre, g.act, g.gated);
      dh = dpre;
    }
    mm_into(grad_a.slice(0, lo, hi), dh, w, true);
    if (want_grad_w) mm_into(grad_w[e], dh.t(), a);
    if (g.bias.defined()) grad_b[e].copy_(dh.sum(0));
  });
  return {grad_a, grad_w, grad_b};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(moe_kernels_C, m) {
  m.def("grouped_mm(Tensor a, Tensor w, Tensor offsets, Tensor? bias, str activation, bool gated) -> Tensor");
  m.def("grouped_mm_backward(Tensor grad, Tensor a, Tensor w, Tensor offsets, Tensor? bias, str activation, "
        "bool gated, bool grad_w=True) -> (Tensor, Tensor, Tensor)");
  m.def("cpu_isa() -> str", []() { return std::string(cpu_isa_name()); });
  m.def("cpu_bf16_gemm() -> bool", []() { return bf16_gemm(); });
}

TORCH_LIBRARY_IMPL(moe_kernels_C, CPU, m) {
  m.impl("grouped_mm", &grouped_mm);
  m.impl("grouped_mm_backward", &grouped_mm_backward);
}

}  // namespace moe_kernels
