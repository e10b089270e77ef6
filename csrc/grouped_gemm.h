// The grouped-GEMM building blocks that the grouped_mm ops (grouped_gemm.cpp) and the fused expert MLP
// (expert_mlp.cpp) share: the compute dtype, the group bounds, the expert scheduler, the GEMM calls and the
// activation epilogues.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <functional>
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
// one at a time otherwise. The cost of an expert is rows + fixed_cost_rows. The schedule depends only on the
// group sizes and the thread count, so reruns are bit-identical. body runs below autograd.
void for_each_group(const std::vector<int64_t>& bounds, int64_t fixed_cost_rows,
                    const std::function<void(int64_t e, int64_t lo, int64_t hi)>& body);

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
void mm_into(const at::Tensor& dst, const at::Tensor& a, const at::Tensor& b);

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

}  // namespace moe_kernels
