// The grouped-GEMM building blocks that the grouped_mm ops (grouped_gemm.cpp) and the fused expert MLPs
// (expert_mlp.cpp, quantized.cpp) share: the compute dtype, the group bounds, the expert scheduler, the GEMM calls,
// the activation epilogues, the vectorised streaming kernel and the expert MLP's forward around its experts.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include "buffers.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <optional>
#include <utility>
#include <type_traits>
#include <vector>

namespace moe_kernels {

// The base activations (moe_kernels.reference.activations.ACTIVATIONS): relu2 is relu(x)^2.
enum class ActKind { silu, gelu, gelu_tanh, relu, identity, relu2 };

// An activation spec string parsed (moe_kernels.reference.activations: its definition and oracle), e.g. "silu",
// "relu2", "silu[alpha=1.702,limit=7.0,up_offset=1.0,interleaved]", "silu[limit=7.0,clamp_after]",
// "silu[gate_softcap=20.0,up_softcap=30.0]". For gated experts, with the gate and up columns of the [rows, 2N]
// pre-activation as halves (gate first) or interleaved (gate at column 2c, up at 2c+1): with a limit, gate is
// clamped from above to limit before the activation (or, with clamp_after, act(gate) after it) and up to
// [-limit, limit]; an up softcap c' makes up c' tanh(up / c') (after its clamp); h = act(gate) * (up + up_offset),
// where act is the base activation (silu with alpha: g sigmoid(alpha g); with a gate softcap c:
// c tanh(g / c) sigmoid(alpha g)). The clamps pass their gradient where the input lies within the bounds, bounds
// included, and NaN passes through them (with a zero gradient), as torch.clamp does.
struct Activation {
  ActKind kind = ActKind::identity;
  double alpha = 1.0;             // silu only
  bool has_limit = false;         // limit: finite, > 0, when has_limit
  double limit = 0.0;
  bool clamp_after = false;       // needs a limit
  double up_offset = 0.0;
  bool interleaved = false;
  bool has_gate_softcap = false;  // silu only; the softcaps: finite, > 0
  double gate_softcap = 0.0;
  bool has_up_softcap = false;
  double up_softcap = 0.0;
  // the base activation alone (gate half first when gated): the fast paths
  bool plain() const {
    return alpha == 1.0 && !has_limit && !clamp_after && up_offset == 0.0 && !interleaved && !has_gate_softcap &&
           !has_up_softcap;
  }
};

// The Activation of a spec string: a base activation (silu, gelu, gelu_tanh, relu, identity, relu2) and optional
// [alpha=<number>, limit=<number>, clamp_after, up_offset=<number>, interleaved, gate_softcap=<number>,
// up_softcap=<number>] (comma-separated; the canonical form is
// str(moe_kernels.reference.activations.parse_activation(s))). A malformed spec, or options that need gated
// experts on experts that are not, is an error naming `op` and what is wrong.
Activation parse_activation(c10::string_view spec, bool gated, const char* op);

// The dtype epilogues accumulate in: float64 for float64 data, float32 for everything else.
at::ScalarType compute_dtype(at::ScalarType t);

// t in its compute dtype: t itself when it already is, else a widened copy.
at::Tensor to_compute(const at::Tensor& t);

// Whether bfloat16 GEMMs run in bfloat16: on CPUs with bf16 dot products (AVX512-BF16, AMX-BF16) at the avx512 ISA
// level, where oneDNN runs them at about 4x the float32 rate. Elsewhere CPU BLAS has no fast 16-bit GEMM and
// widening each slice to float32 is faster.
bool bf16_gemm();

// The dtype the GEMMs read and write for data of dtype t: bfloat16 itself where bf16_gemm(), else compute_dtype(t).
// A GEMM's inputs and output share it; epilogues read it and accumulate in compute_dtype.
at::ScalarType gemm_dtype(at::ScalarType t);

// t in its GEMM dtype: t itself (contiguous) when it already is, else a widened copy.
at::Tensor to_gemm(const at::Tensor& t);

// The bits of bfloat16(f) from the bits u of a float32 f, rounded to nearest even as c10::BFloat16 rounds; a NaN
// is the caller's to map (to 0x7fc0). U: uint32_t, or a vector of them.
template <typename U>
inline U bf16_rounded_bits(U u) {
  return (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
}

// Memory for one expert's temporaries, kept per thread from call to call (up to kKeptSlotBytes a slot; larger
// requests get a fresh allocation). A fresh buffer costs a page fault per 4 KiB touched, which for the widened
// weights of 16-bit runs cost more than reading half the bytes saves. A slot holds one live tensor per thread:
// each slot has one use, and a tensor from it is dead before the slot is asked again.
enum class Kept { gemm_weight, weight_a, weight_b, input, grad, pre, act, result, count };
constexpr int64_t kKeptSlotBytes = int64_t(8) << 20;
at::Tensor kept_empty(Kept slot, at::IntArrayRef shape, at::ScalarType dtype);
// to_gemm into slot's memory (t itself when already in its GEMM dtype and contiguous).
at::Tensor to_gemm_kept(Kept slot, const at::Tensor& t);

// A tensor for data that lives only within one call (the expert-ordered [T*k, D] buffers of the expert MLP).
// Its memory is kept for the next call (one buffer, up to kMaxBytes): a fresh buffer of that size costs a page
// fault per 4 KiB touched, a tenth of a forward pass on a small CPU. A second call while the kept buffer is in use,
// or a larger request, gets a fresh allocation. The tensor must not outlive the Scratch.
class Scratch {
 public:
  static constexpr int64_t kMaxBytes = int64_t(1) << 30;
  Scratch(at::IntArrayRef shape, const at::TensorOptions& options);
  ~Scratch();
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  const at::Tensor& tensor() const { return tensor_; }

 private:
  at::Tensor tensor_;
  bool kept_ = false;
};

// Rows idx [rows] (int32 or int64) of src [T, D] in src's GEMM dtype: a gather fused with the widening of
// 16-bit data where that applies, one pass. idx values are checked against T.
at::Tensor gather_rows(const at::Tensor& src, const at::Tensor& idx);

// offsets [E+1] int32 read on the host, checked: 0 <= offsets[0] <= ... <= offsets[E] <= rows.
std::vector<int64_t> read_offsets(const at::Tensor& offsets, int64_t rows, const char* op);

// Runs body(e, lo, hi) once for every expert e with rows [lo, hi) non-empty. Experts whose cost alone exceeds
// one thread's share run one at a time with multi-threaded GEMMs; the rest are spread over the threads (longest
// first onto the least loaded thread), each running single-threaded GEMMs, when that spreads evenly, and run
// one at a time otherwise. The cost of an expert is rows + fixed_cost_rows. Groups of at most serial_rows rows
// have a single-threaded body (the streaming decode kernels): never run alone as heavy, and spread over the
// threads however unevenly, since one at a time they would leave all threads but one idle. The schedule depends
// only on the group sizes and the thread count, so reruns are bit-identical. body runs below autograd.
void for_each_group(const std::vector<int64_t>& bounds, int64_t fixed_cost_rows,
                    const std::function<void(int64_t e, int64_t lo, int64_t hi)>& body, int64_t serial_rows = 0);

// Groups of up to kStreamRows rows (decode) stream their weights: a GEMM there is bound by reading w, and BLAS
// would first pack w (and 16-bit w would first be widened).
constexpr int64_t kStreamRows = 8;

// The instruction set the vectorised CPU kernels run with: the widest the CPU has of AVX-512 and AVX2 (with FMA, F16C),
// capped by MOE_KERNELS_CPU_ISA=avx512|avx2|baseline; picked once per process.
enum class CpuIsa { baseline = 0, avx2 = 1, avx512 = 2 };
CpuIsa cpu_isa();
const char* cpu_isa_name();

// out[r, m] = sum_k a[r, k] * w[m, k] (+ bias[m]) for a few rows r: each row of w is read from memory once, in its
// own dtype, and used for every row of a (groups of 4 rows share each load). A dot product keeps 16 partial sums
// in float32 (8 in float64) combined pairwise in a fixed order: the same bits on every run and whatever other rows
// share the call, on a given ISA (the FMA builds round each product-sum once, the baseline twice).
void stream_rows(const float* a, int64_t rows, int64_t K, const float* w, int64_t M, const float* bias, float* out);
void stream_rows(const float* a, int64_t rows, int64_t K, const c10::BFloat16* w, int64_t M, const float* bias,
                 float* out);
void stream_rows(const float* a, int64_t rows, int64_t K, const c10::Half* w, int64_t M, const float* bias,
                 float* out);
void stream_rows(const double* a, int64_t rows, int64_t K, const double* w, int64_t M, const double* bias,
                 double* out);

// --- the vectorised CPU kernels' pieces ---
// Kernels are built once per ISA level (AVX-512, AVX2 with FMA and F16C, the baseline) and picked on first use from
// the features the CPU reports (cpu_isa()). (target_clones with "arch=x86-64-v3" resolves through the CPU model and
// falls back to the baseline on CPUs that have every v3 feature, AMD EPYC in virtual machines among them.)
#if defined(__x86_64__) && defined(__GNUC__)
#define MOE_KERNELS_X86 1
#define MOE_KERNELS_AVX512 __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,f16c")))
#define MOE_KERNELS_AVX2 __attribute__((target("avx2,fma,f16c")))
#else
#define MOE_KERNELS_X86 0
#define MOE_KERNELS_AVX512
#define MOE_KERNELS_AVX2
#endif

// Vectors of VB bytes (32: 8 floats, 4 doubles) in GCC/clang's generic vector extension: each ISA clone lowers them
// to its own registers (two SSE halves on the baseline). The streaming kernel's AVX-512 build takes 64.
template <typename acc_t, int VB = 32>
struct VecOf {
  typedef acc_t type __attribute__((vector_size(VB)));
};
template <typename acc_t, int VB = 32>
using Vec = typename VecOf<acc_t, VB>::type;
typedef uint16_t U16x8 __attribute__((vector_size(16)));
typedef uint32_t U32x8 __attribute__((vector_size(32)));
typedef uint16_t U16x16 __attribute__((vector_size(32)));
typedef uint32_t U32x16 __attribute__((vector_size(64)));
typedef int32_t I32x8 __attribute__((vector_size(32)));
typedef int32_t I32x16 __attribute__((vector_size(64)));

// One vector of acc_t (VB bytes) loaded from p, widened from the storage dtype w_t.
template <typename w_t, typename acc_t, int VB = 32>
inline __attribute__((always_inline)) Vec<acc_t, VB> load_widened(const w_t* p) {
  constexpr int L = VB / sizeof(acc_t);
  Vec<acc_t, VB> v;
  if constexpr (std::is_same_v<w_t, acc_t>) {
    std::memcpy(&v, p, sizeof(v));
  } else if constexpr (std::is_same_v<w_t, c10::BFloat16> && std::is_same_v<acc_t, float>) {
    // bfloat16 is the upper half of a float32
    using U16 = std::conditional_t<L == 16, U16x16, U16x8>;
    using U32 = std::conditional_t<L == 16, U32x16, U32x8>;
    static_assert(L == 8 || L == 16);
    U16 h;
    std::memcpy(&h, p, sizeof(h));
    const U32 bits = __builtin_convertvector(h, U32) << 16;
    std::memcpy(&v, &bits, sizeof(v));
  } else if constexpr (std::is_same_v<w_t, c10::Half> && std::is_same_v<acc_t, float>) {
    // in vector integer and float operations (a conversion per lane is several times slower), without denormal
    // floats anywhere (flush-to-zero modes leave it exact): a normal half's exponent rebased by 112, a subnormal one
    // as its mantissa times 2^-24, inf and NaN given float32's all-ones exponent, the sign put back
    static_assert(L == 8 || L == 16);
    using U16 = std::conditional_t<L == 16, U16x16, U16x8>;
    using U32 = std::conditional_t<L == 16, U32x16, U32x8>;
    using I32 = std::conditional_t<L == 16, I32x16, I32x8>;
    U16 h;
    std::memcpy(&h, p, sizeof(h));
    const U32 x = __builtin_convertvector(h, U32);
    const U32 em = (x & 0x7fffu) << 13, exponent = x & 0x7c00u;
    const Vec<float, VB> sub = __builtin_convertvector(__builtin_convertvector(x & 0x3ffu, I32), Vec<float, VB>) *
                               0x1.0p-24f;
    U32 sub_bits;
    std::memcpy(&sub_bits, &sub, sizeof(sub_bits));
    U32 bits = exponent == 0u ? sub_bits : (exponent == 0x7c00u ? (em | 0x7f800000u) : em + (112u << 23));
    bits |= (x & 0x8000u) << 16;
    std::memcpy(&v, &bits, sizeof(v));
  } else {
    for (int l = 0; l < L; ++l) v[l] = static_cast<acc_t>(p[l]);
  }
  return v;
}

template <typename Fn>
Fn pick_isa(Fn baseline, Fn avx2, Fn avx512) {
  const Fn by_level[] = {baseline, avx2, avx512};  // indexed by CpuIsa
  return by_level[static_cast<int>(cpu_isa())];
}

// The weights of a streaming GEMM as its kernel reads them: row(m) is row m of the [M, K] matrix, a Row whose
// load<VB, acc_t>(k, w) gives the kVectors vectors w of n = VB / sizeof(acc_t) lanes that columns [k, k + kVectors n)
// multiply, in the order the rows of a are laid out in, and load_tail<VB, acc_t>(k, rest, w) the last rest of them,
// zero-padded; bytes_per_row() is what a row takes in memory. A Row with kStepScale loads (k, w, scale) instead:
// the step's products are summed unscaled, then times the vector scale (a power of two a lane: exact). A Row with
// kFlagsNaN may leave NaN weights out of w and say so by nan_seen() after the row: its dot products are then NaN.
// PlainRows: the matrix in its storage dtype w_t, two vectors a step (the quantized ones: quantized.cpp).
template <typename w_t>
struct PlainRows {
  const w_t* w;
  int64_t K;
  struct Row {
    static constexpr int kVectors = 2;
    static constexpr bool kStepScale = false, kFlagsNaN = false;
    const w_t* p;
    template <int VB, typename acc_t>
    inline __attribute__((always_inline)) void load(int64_t k, Vec<acc_t, VB> (&v)[kVectors]) {
      constexpr int64_t n = VB / sizeof(acc_t);
      v[0] = load_widened<w_t, acc_t, VB>(p + k);
      v[1] = load_widened<w_t, acc_t, VB>(p + k + n);
    }
    template <int VB, typename acc_t>
    inline __attribute__((always_inline)) void load_tail(int64_t k, int64_t rest, Vec<acc_t, VB> (&v)[kVectors]) {
      constexpr int64_t n = VB / sizeof(acc_t);
      w_t pad[2 * n] = {};
      std::memcpy(pad, p + k, rest * sizeof(w_t));
      v[0] = load_widened<w_t, acc_t, VB>(pad);
      v[1] = load_widened<w_t, acc_t, VB>(pad + n);
    }
  };
  Row row(int64_t m) const { return {w + m * K}; }
  int64_t bytes_per_row() const { return K * static_cast<int64_t>(sizeof(w_t)); }
};

// v's lanes combined by op halving: op(lower half, upper half), until one lane is left. op: a function object
// (not a lambda, whose body would be compiled for the baseline ISA).
template <typename V, typename Op>
inline __attribute__((always_inline)) auto reduce_halves(V v, Op op) {
  using T = std::remove_reference_t<decltype(v[0])>;
  constexpr int L = sizeof(V) / sizeof(T);
  if constexpr (L == 1) {
    return v[0];
  } else {
    typedef T H __attribute__((vector_size(sizeof(V) / 2)));
    H lo, hi;
    std::memcpy(&lo, &v, sizeof(lo));
    std::memcpy(&hi, reinterpret_cast<const char*>(&v) + sizeof(lo), sizeof(hi));
    return reduce_halves(op(lo, hi), op);
  }
}
struct Plus {
  template <typename V>
  inline __attribute__((always_inline)) V operator()(V a, V b) const {
    return a + b;
  }
};

// The sum of v's lanes, pairwise: the lower half plus the upper half, until one lane is left.
template <typename V>
inline __attribute__((always_inline)) auto sum_halves(V v) {
  return reduce_halves(v, Plus{});
}

// res[r] = sum_k a[r * K + k] * w[k] for R rows of a, each element of w loaded once for all of them. Each row keeps
// two vectors of partial sums (four in the AVX-512 build for rows of four or more vectors a step; vector s of a step
// adds into partial sum s mod their count), combined pairwise: a fixed order that does not depend on the other rows,
// so a row gets the same bits whatever rows share its expert. With kStepScale, a step's products go to two sums
// (vector s into sum s mod 2), whose total times the step's scale adds into the row's first partial sum.
template <int R, int VB, typename Row, typename acc_t>
inline __attribute__((always_inline)) void dot_rows(const acc_t* a, int64_t K, Row w, acc_t* res) {
  constexpr int64_t n = VB / sizeof(acc_t);
  constexpr int S = Row::kVectors;  // vectors a step
  constexpr bool kStep = Row::kStepScale;
  constexpr int A = S >= 4 && VB == 64 && !kStep ? 4 : 2;  // partial sums a row
  using V = Vec<acc_t, VB>;
  V acc[R][A] = {};
  // (the step is written out twice, for the full steps and the tail: GCC keeps acc in registers only so)
  int64_t k = 0;
  for (; k + S * n <= K; k += S * n) {
    V wv[S], scale = {};
    if constexpr (kStep) {
      w.template load<VB, acc_t>(k, wv, scale);
    } else {
      w.template load<VB, acc_t>(k, wv);
    }
    for (int r = 0; r < R; ++r) {
      V part[2] = {};
      for (int v = 0; v < S; ++v) {
        V av;
        std::memcpy(&av, a + r * K + k + v * n, sizeof(av));
        if constexpr (kStep) {
          part[v % 2] += av * wv[v];
        } else {
          acc[r][v % A] += av * wv[v];
        }
      }
      if constexpr (kStep) acc[r][0] += (part[0] + part[1]) * scale;
    }
  }
  if (k < K) {  // the tail, zero-padded to a full step: its products land in the lanes like any others
    const int64_t rest = K - k;
    V wv[S], scale = {};
    if constexpr (kStep) {
      w.template load_tail<VB, acc_t>(k, rest, wv, scale);
    } else {
      w.template load_tail<VB, acc_t>(k, rest, wv);
    }
    for (int r = 0; r < R; ++r) {
      acc_t a_pad[S * n] = {};
      std::memcpy(a_pad, a + r * K + k, rest * sizeof(acc_t));
      V part[2] = {};
      for (int v = 0; v < S; ++v) {
        V av;
        std::memcpy(&av, a_pad + v * n, sizeof(av));
        if constexpr (kStep) {
          part[v % 2] += av * wv[v];
        } else {
          acc[r][v % A] += av * wv[v];
        }
      }
      if constexpr (kStep) acc[r][0] += (part[0] + part[1]) * scale;
    }
  }
  for (int r = 0; r < R; ++r) {
    V s = acc[r][0] + acc[r][1];
    if constexpr (A == 4) s += acc[r][2] + acc[r][3];
    res[r] = sum_halves(s);
  }
  if constexpr (Row::kFlagsNaN) {
    if (w.nan_seen()) {
      for (int r = 0; r < R; ++r) res[r] = std::numeric_limits<acc_t>::quiet_NaN();
    }
  }
}

// Rows with kOwnBlock compute a block of rows of out themselves: block<R>(a, K, m0, m1, M, bias, out) does what
// stream_block does, with a in their own element type and layout (quantized.cpp: bfloat16 dot products).
template <typename Rows, typename = void>
struct OwnBlock : std::false_type {};
template <typename Rows>
struct OwnBlock<Rows, std::void_t<decltype(Rows::kOwnBlock)>> : std::bool_constant<Rows::kOwnBlock> {};

template <int R, int VB, typename Rows, typename a_t, typename acc_t>
inline __attribute__((always_inline)) void stream_block(const a_t* a, int64_t K, Rows& w, int64_t m0, int64_t m1,
                                                        int64_t M, const acc_t* bias, acc_t* out) {
  if constexpr (OwnBlock<Rows>::value) {
    w.template block<R>(a, K, m0, m1, M, bias, out);
  } else {
    acc_t res[R];
    for (int64_t m = m0; m < m1; ++m) {
      dot_rows<R, VB>(a, K, w.row(m), res);
      for (int r = 0; r < R; ++r) out[r * M + m] = bias != nullptr ? res[r] + bias[m] : res[r];
    }
  }
}

// out[r, m] = sum_k a[r, k] w[m, k] (+ bias[m]) for rows m in [m_lo, m_hi) (m_hi < 0: M) of w, out [rows, M].
// Rows of w are taken in blocks of about 16 KiB, so that every group of up to 4 rows of a after the first finds
// the block in L1: w is read from memory once however many rows a has.
template <int VB, typename Rows, typename a_t, typename acc_t>
inline __attribute__((always_inline)) void stream_rows_impl(const a_t* a, int64_t rows, int64_t K, Rows& w,
                                                            int64_t M, const acc_t* bias, acc_t* out,
                                                            int64_t m_lo = 0, int64_t m_hi = -1) {
  const int64_t block = std::max<int64_t>(1, (int64_t(16) << 10) / std::max<int64_t>(1, w.bytes_per_row()));
  if (m_hi < 0) m_hi = M;
  for (int64_t m0 = m_lo; m0 < m_hi; m0 += block) {
    const int64_t m1 = std::min(m_hi, m0 + block);
    int64_t r = 0;
    for (; r + 4 <= rows; r += 4) stream_block<4, VB>(a + r * K, K, w, m0, m1, M, bias, out + r * M);
    switch (rows - r) {
      case 3: stream_block<3, VB>(a + r * K, K, w, m0, m1, M, bias, out + r * M); break;
      case 2: stream_block<2, VB>(a + r * K, K, w, m0, m1, M, bias, out + r * M); break;
      case 1: stream_block<1, VB>(a + r * K, K, w, m0, m1, M, bias, out + r * M); break;
      default: break;
    }
  }
}

// out[i] = exp(x[i]) for n float64 values, vectorised at the process's ISA level: within 1.2 ulp; outside
// [-708, 709] (subnormal or infinite results) and at NaN, std::exp's value. out may alias x.
void exp_into(const double* x, int64_t n, double* out);

// One value through a base activation, for the few-row paths (tensors go through ATen's kernels): the formulas of
// torch's silu (with alpha: v sigmoid(alpha v)), gelu (erf and tanh forms), relu and relu^2 (NaN stays NaN).
template <typename T>
T activate(T v, ActKind a, T alpha = T(1)) {
  switch (a) {
    case ActKind::silu: return alpha == T(1) ? v / (T(1) + std::exp(-v)) : v / (T(1) + std::exp(-(alpha * v)));
    case ActKind::gelu: return T(0.5) * v * (T(1) + std::erf(v * T(M_SQRT1_2)));
    case ActKind::gelu_tanh: {
      const T inner = T(M_2_SQRTPI * M_SQRT1_2) * (v + T(0.044715) * v * v * v);
      return T(0.5) * v * (T(1) + std::tanh(inner));
    }
    case ActKind::relu: return std::isnan(v) || v > T(0) ? v : T(0);
    case ActKind::relu2: {
      const T r = std::isnan(v) || v > T(0) ? v : T(0);
      return r * r;
    }
    case ActKind::identity: return v;
  }
  return v;
}

// One value through the gate's activation with its options (silu's alpha and gate softcap), for the few-row paths.
template <typename T>
T activate_gate(T v, const Activation& a) {
  if (a.has_gate_softcap) {  // silu
    const T cap = T(a.gate_softcap);
    return cap * std::tanh(v / cap) / (T(1) + std::exp(-(T(a.alpha) * v)));
  }
  return activate(v, a.kind, T(a.alpha));
}

// One output of the gated activation with every option of a (the few-row paths): act(gate) * (up + up_offset),
// the clamps of a limit applied as torch.clamp does (NaN stays NaN), the softcaps as a defines them.
template <typename T>
T glu_one(T gate, T up, const Activation& a) {
  const T limit = T(a.limit);
  if (a.has_limit) {
    if (!a.clamp_after) gate = gate > limit ? limit : gate;
    up = up > limit ? limit : (up < -limit ? -limit : up);
  }
  if (a.has_up_softcap) up = T(a.up_softcap) * std::tanh(up / T(a.up_softcap));
  T g = activate_gate(gate, a);
  if (a.has_limit && a.clamp_after) g = g > limit ? limit : g;
  return a.up_offset != 0.0 ? g * (up + T(a.up_offset)) : g * up;
}

// out = a @ w^T (+ bias): a [rows, K], out [rows, M] (a row slice of a larger tensor is fine) and bias [M] in
// the GEMM dtype; w [M, K] in its storage dtype. Up to kStreamRows rows, stream_rows (a bfloat16 a widened, the
// result narrowed); else ATen's matmul on w in the GEMM dtype.
void gemm_bias_out(const at::Tensor& out, const at::Tensor& a, const at::Tensor& w, const at::Tensor& bias);
at::Tensor gemm_bias(const at::Tensor& a, const at::Tensor& w, const at::Tensor& bias);

// dst = a @ b: straight into dst when it has a's dtype, else computed in a's dtype and narrowed into dst.
// token_rows: the rows of a are tokens, whose products must stay apart (rows_apart).
void mm_into(const at::Tensor& dst, const at::Tensor& a, const at::Tensor& b, bool token_rows = false);
// The operands of a [rows, K] @ b [K, N] whose product rows each depend on their own row of a only: oneDNN's
// bfloat16 matmul on CPUs with AMX mixes a NaN of one row of a into a neighbour's product where K is not a multiple
// of 32, so bfloat16 operands are padded there with zero columns of a and rows of b (which add nothing).
std::pair<at::Tensor, at::Tensor> rows_apart(const at::Tensor& a, const at::Tensor& b);

// The expert MLP's activation on a pre-activation h [rows, M] in the GEMM dtype: dst [rows, N] =
// act(gate) * up when gated (M = 2N; gate and up as the spec lays them out, with its options), act(h) otherwise
// (N = M), computed in the compute dtype. save ([rows, M], undefined to skip) gets a copy of h in its own dtype.
// silu, relu, relu2 and identity run as one vectorised pass (float32's exp within 1.02 ulp), a plain spec and one
// with options each in a loop of its own; gelu and gelu_tanh through ATen's kernels.
void gated_act_into(const at::Tensor& dst, const at::Tensor& h, const Activation& act, bool gated,
                    const at::Tensor& save = at::Tensor());
at::Tensor gated_act(const at::Tensor& h, const Activation& act, bool gated);

// The backward of gated_act at pre [rows, M] (any floating dtype, read as it is): dpre [rows, M] = the gradient
// w.r.t. pre given the output's gradient dh [rows, N] times scale [rows] (1 when undefined). h [rows, N] and
// hdot [rows], when defined, get gated_act(pre) and sum_j dh[:, j] * h[:, j] (unscaled) from the same pass. dh,
// dpre and h in the GEMM dtype (bfloat16 only with a bfloat16 pre), scale and hdot in the compute dtype.
void gated_act_backward_into(const at::Tensor& dpre, const at::Tensor& dh, const at::Tensor& pre,
                             const Activation& act, bool gated, const at::Tensor& scale = at::Tensor(),
                             const at::Tensor& h = at::Tensor(), const at::Tensor& hdot = at::Tensor());

// --- the expert MLP's forward, shared by the float and the quantized experts (expert_mlp.cpp, quantized.cpp) ---

// The compute dtype of x_t as a C++ type: double for double, float for everything else.
template <typename x_t>
using acc_of = std::conditional_t<std::is_same_v<x_t, double>, double, float>;

// experts must be [T, k] with fewer than 2^31 (token, slot) pairs (int32 indices): checked before the inputs are
// copied, so that an expanded x of 2^31 rows is refused rather than allocated.
void check_experts(const char* op, const at::Tensor& experts);
// weights must be a floating [T, k] tensor.
void check_weights(const char* op, const at::Tensor& weights, int64_t T, int64_t k);
// An optional bias [E, n] checked to be that shape in `dtype` (errors name op and name): contiguous, or undefined
// when absent.
at::Tensor bias_arg(const char* op, const char* name, const std::optional<at::Tensor>& bias, int64_t E, int64_t n,
                    at::ScalarType dtype);

// Row e of a bias [E, n] in its GEMM dtype, or undefined without a bias.
at::Tensor bias_row(const at::Tensor& bias, int64_t e);

// Row e of a bias [E, n] (x_t) widened to acc_t, or empty without a bias.
template <typename x_t, typename acc_t>
std::vector<acc_t> widened_row(const at::Tensor& bias, int64_t e, int64_t n) {
  if (!bias.defined()) return {};
  const x_t* row = bias.const_data_ptr<x_t>() + e * n;
  return std::vector<acc_t>(row, row + n);
}

// h [rows, H] = the activation of pre [rows, H2] in float32 by the vectorised pass of the GEMM path (silu, relu,
// relu2, identity, with their options): whether it ran.
bool act_rows_vectorised(const float* pre, int64_t rows, int64_t H2, const Activation& a, bool gated, float* h);

// h [rows, H] = the activation of pre [rows, H2] (gated: H2 = 2H, with the spec's options; else H = H2): the few-row
// paths, float32 vectorised where the GEMM path's pass computes the activation, else one value at a time.
template <typename acc_t>
void few_rows_act(const acc_t* pre, int64_t rows, int64_t H2, const Activation& act, bool gated, acc_t* h) {
  if constexpr (std::is_same_v<acc_t, float>) {
    if (act_rows_vectorised(pre, rows, H2, act, gated, h)) return;
  }
  const int64_t H = gated ? H2 / 2 : H2;
  if (act.plain() || !gated) {
    const acc_t alpha = static_cast<acc_t>(act.alpha);  // 1 unless silu's alpha: the one option when not gated
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t j = 0; j < H; ++j) {
        const acc_t a = activate(pre[r * H2 + j], act.kind, alpha);
        h[r * H + j] = gated ? a * pre[r * H2 + H + j] : a;
      }
    }
    return;
  }
  const int64_t gate_col = act.interleaved ? 2 : 1, up_start = act.interleaved ? 1 : H;
  for (int64_t r = 0; r < rows; ++r) {
    const acc_t* p = pre + r * H2;
    for (int64_t j = 0; j < H; ++j) h[r * H + j] = glu_one(p[gate_col * j], p[up_start + gate_col * j], act);
  }
}

// The forward of an expert with at most kStreamRows rows (decode), on raw pointers: rows token[0 .. rows) of x
// [T, D] gathered and widened, pre [rows, H2] = up(xe) (saved into h_pre [rows, H2] unless null), the activation,
// y [rows, O] = down(h) narrowed to y_t (the GEMM dtype). up(a, rows, out) and down(a, rows, out): the expert's
// streaming GEMMs with their biases, out = a @ w^T + b in acc_t. The tensor path costs tens of ATen calls per
// expert, which is most of the time of a group of a row or two.
template <typename x_t, typename acc_t, typename y_t, typename Up, typename Down>
void few_rows_forward(const x_t* x, int64_t D, const int32_t* token, int64_t rows, int64_t H2, int64_t O,
                      const Activation& act, bool gated, const Up& up, const Down& down, x_t* h_pre, y_t* y) {
  const int64_t H = gated ? H2 / 2 : H2;
  std::vector<acc_t> xe(rows * D), pre(rows * H2), h(rows * H);
  for (int64_t r = 0; r < rows; ++r) {
    const x_t* src = x + static_cast<int64_t>(token[r]) * D;
    for (int64_t d = 0; d < D; ++d) xe[r * D + d] = static_cast<acc_t>(src[d]);
  }
  up(xe.data(), rows, pre.data());
  if (h_pre != nullptr) {
    for (int64_t i = 0; i < rows * H2; ++i) h_pre[i] = static_cast<x_t>(pre[i]);
  }
  few_rows_act(pre.data(), rows, H2, act, gated, h.data());
  if constexpr (std::is_same_v<y_t, acc_t>) {
    down(h.data(), rows, y);
  } else {
    std::vector<acc_t> out(rows * O);
    down(h.data(), rows, out.data());
    for (int64_t i = 0; i < rows * O; ++i) y[i] = static_cast<y_t>(out[i]);
  }
}

// fn(x_data, y_data) with x's data as x_t* and y's as y_t* (y: the GEMM dtype of x's: x_t itself or acc_of<x_t>).
template <typename Fn>
void dispatch_x_y(const at::Tensor& x, const at::Tensor& y, const Fn& fn) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dispatch_x_y", [&] {
    if (y.scalar_type() == x.scalar_type()) {
      fn(x.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>());
    } else {
      fn(x.const_data_ptr<scalar_t>(), y.mutable_data_ptr<acc_of<scalar_t>>());
    }
  });
}

// few_rows_forward of expert e's rows [lo, hi) (token: the token of each expert-ordered row, int32) in x's dtype,
// with its biases widened: gemm(x_tag, which, a, rows, bias, out) streams projection `which` (0: gate_up [H2, D],
// 1: down [O, H]) of the expert, out = a @ w^T + bias (bias nullable), x_tag a null x_t* naming x's dtype. h_pre
// [T*k, H2] in x's dtype, when defined, gets the rows' pre-activations.
template <typename Gemm>
void few_rows_expert(const at::Tensor& x, const at::Tensor& y, const at::Tensor& token, int64_t e, int64_t lo,
                     int64_t hi, int64_t H2, int64_t O, const at::Tensor& up_bias, const at::Tensor& down_bias,
                     const Activation& act, bool gated, const Gemm& gemm, const at::Tensor& h_pre = at::Tensor()) {
  dispatch_x_y(x, y, [&](const auto* x_data, auto* y_data) {
    using x_t = std::remove_cv_t<std::remove_pointer_t<decltype(x_data)>>;
    using acc_t = acc_of<x_t>;
    const auto b_up = widened_row<x_t, acc_t>(up_bias, e, H2);
    const auto b_down = widened_row<x_t, acc_t>(down_bias, e, O);
    const x_t* tag = nullptr;
    few_rows_forward<x_t, acc_t>(
        x_data, x.size(1), token.const_data_ptr<int32_t>() + lo, hi - lo, H2, O, act, gated,
        [&](const acc_t* a, int64_t rows, acc_t* out) {
          gemm(tag, 0, a, rows, b_up.empty() ? nullptr : b_up.data(), out);
        },
        [&](const acc_t* a, int64_t rows, acc_t* out) {
          gemm(tag, 1, a, rows, b_down.empty() ? nullptr : b_down.data(), out);
        },
        h_pre.defined() ? h_pre.mutable_data_ptr<x_t>() + lo * H2 : nullptr, y_data + lo * O);
  });
}

// out = a @ w^T + b for one expert's rows on tensors (a and out in the GEMM dtype).
using GemmInto = std::function<void(const at::Tensor& a, const at::Tensor& out)>;

// The forward of an expert's rows on tensors: y = down(act(up(xe))) (xe [rows, D], y [rows, O], both in the GEMM
// dtype); pre [rows, H2] (a kept buffer when undefined) gets the pre-activation and save (undefined: none) a copy
// of it in its own dtype.
void expert_rows_forward(const at::Tensor& xe, int64_t H2, const GemmInto& up, const GemmInto& down,
                         const Activation& act, bool gated, const at::Tensor& y, const at::Tensor& pre = at::Tensor(),
                         const at::Tensor& save = at::Tensor());

// The expert MLP's forward around its per-expert work: the (token, slot) pairs of experts [T, k] sorted by expert
// (index only; ids outside [0, E) and pairs past capacity (< 0: none) dropped), expert(e, lo, hi, token, y) run for
// every expert with rows (for_each_group, serial_rows its single-threaded groups) to write rows [lo, hi) of y [T*k, O] (expert-ordered, in x's GEMM dtype;
// token[i]: the token of row i, int32), then every token's sum of its rows times their routing weights, in slot
// order (deterministic, no atomics; a token routed nowhere gets 0).
struct Routed {
  at::Tensor out, order, inverse, offsets;  // out [T, O] in x's dtype
  int64_t kept;                             // rows [0, kept) of y belong to experts
};
using ExpertRows =
    std::function<void(int64_t e, int64_t lo, int64_t hi, const at::Tensor& token, const at::Tensor& y)>;
Routed routed_forward(const char* op, const at::Tensor& x, const at::Tensor& experts, const at::Tensor& weights,
                      int64_t E, int64_t O, int64_t capacity, const ExpertRows& expert, int64_t serial_rows = 0);

}  // namespace moe_kernels
