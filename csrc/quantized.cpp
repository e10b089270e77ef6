// The expert MLP with quantized expert weights on CPU (the native backend of moe_kernels::moe_mlp_quantized,
// inference): FP8 block-scaled and MXFP4 weights (moe_kernels.reference.quantized), dequantised inside the kernels,
// never as a whole weight.
//
// The forward around the experts is the float expert MLP's (routed_forward, grouped_gemm.h): the pairs sorted by
// expert, the experts run by for_each_group, the weighted combine in slot order. Per expert:
// - up to kStreamRows rows (decode; kAmxRows on AMX tiles): the streaming kernel of stream_rows (dot_rows, grouped_gemm.h) reading
//   quantized rows: each weight row is read from memory once and dequantised in registers, for the dot products of
//   all the expert's rows. The rows of x are laid out so that the codes a 32-bit lane packs (four e4m3, eight e2m1)
//   multiply lanes of as many vectors, each code taken out with shifts, without cross-lane shuffles.
//   FP8: the e4m3 bits moved into a float32's exponent and mantissa (e4m3's subnormals land on float32's: the value
//   times 2^-120, exactly), the block scales times 2^120 folded into a copy of x's rows once per block of bn weight
//   rows, NaN codes noted once per 64 bytes. MXFP4: each nibble through a permute of the 16 e2m1 values, a step's
//   products summed unscaled, then times its scales (powers of two: exact).
//   bfloat16 x on CPUs with AVX512-BF16 and AVX512-VBMI: the codes become bfloat16 (exact) through byte and word
//   permutes of tables, and vdpbf16ps sums their products with x's in pairs; 16 weight rows' sums are reduced at
//   once (the --- bfloat16 dot products --- section). On CPUs with AMX-BF16 experts of 2 or more rows convert the
//   codes of 16 weight rows into a tile and multiply on AMX tiles instead, the scales applied per group of columns
//   (--- AMX tiles ---).
// - more rows: the expert's weight dequantised (in chunks of rows of up to kKeptSlotBytes) into a per-thread kept
//   buffer in the GEMM dtype (bfloat16 where bf16_gemm(), else float32; float64 for float64 x) by the same row
//   decoders, then the float expert MLP's GEMMs and activation on it.
// The bit conversion of FP8 is exact where denormals are read as they are (not under DAZ, as
// torch.set_flush_denormal(True) sets) and the scales are below 2^8; elsewhere, and in float64, the FP8 rows go
// through a 256-entry table of the e4m3 values times the scale, and MXFP4 in float64 through tables.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "grouped_gemm.h"

#include <array>
#include <cmath>
#include <limits>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <xmmintrin.h>
#if defined(__GNUC__)
#include <cpuid.h>
#include <immintrin.h>
#endif
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif
#endif

namespace moe_kernels {
namespace {

enum class Format { fp8, mxfp4 };

// One expert's quantized projection [M, K] (moe_kernels.reference.quantized).
struct QMatrix {
  Format format;
  const uint8_t* data;  // fp8: [M, K] e4m3 codes; mxfp4: [M, K / 2], two e2m1 codes a byte (low nibble first)
  const float* fp8_scale;      // fp8: [ceil(M / bn), ceil(K / bk)]
  const uint8_t* mx_scale;     // mxfp4: [M, K / 32] e8m0 exponents
  int64_t M, K, bn, bk;
  bool fp8_bits;  // fp8: every finite scale is below 2^8 (the bit conversion is exact, denormals read: fp8_bits_here)
  bool bf16_dot;  // the streaming kernel may round a to bfloat16 and use bfloat16 dot products
};

// The most rows of a the AMX decode kernel takes in one pass (four token groups, an accumulator tile each).
constexpr int64_t kAmxRows = 16;

// Whether denormal inputs are read as zero (MXCSR.DAZ, as torch.set_flush_denormal(True) sets): then the bit
// conversion of FP8 would lose e4m3's subnormals. Off x86, assumed so.
bool denormals_are_zero() {
#if defined(__x86_64__) || defined(_M_X64)
  return (_mm_getcsr() & 0x0040u) != 0;
#else
  return true;
#endif
}

// Whether the bit conversion of FP8 is exact for w in the thread that runs it (each thread has its own MXCSR).
inline bool fp8_bits_here(const QMatrix& w) { return w.fp8_bits && !denormals_are_zero(); }

// The values of the codes, exact: e4m3fn (NaN at 0x7f and 0xff) in float32 and float64, e8m0 (2^(s - 127), NaN at
// 255) in float64.
struct Tables {
  float fp8[256];
  double fp8_f64[256];
  double e8m0[256];
  Tables() {
    for (int c = 0; c < 256; ++c) {
      const int e = (c >> 3) & 15, m = c & 7;
      double v = (c & 0x7f) == 0x7f ? std::numeric_limits<double>::quiet_NaN()
                                     : (e == 0 ? std::ldexp(m, -9) : std::ldexp(8 + m, e - 10));
      fp8_f64[c] = c & 0x80 ? -v : v;
      fp8[c] = static_cast<float>(fp8_f64[c]);
      e8m0[c] = c == 255 ? std::numeric_limits<double>::quiet_NaN() : std::ldexp(1.0, c - 127);
    }
  }
};
const Tables& tables() {
  static const Tables t;
  return t;
}

template <typename acc_t>
const acc_t* fp8_table() {
  if constexpr (std::is_same_v<acc_t, double>) {
    return tables().fp8_f64;
  } else {
    return tables().fp8;
  }
}

// The 16 e2m1 values (sign bit 3, exponent bits 1-2, mantissa bit 0).
alignas(64) constexpr float kE2m1[16] = {0.0f,  0.5f,  1.0f,  1.5f,  2.0f,  3.0f,  4.0f,  6.0f,
                                         -0.0f, -0.5f, -1.0f, -1.5f, -2.0f, -3.0f, -4.0f, -6.0f};

template <typename T, int N>
struct VecN {
  typedef T type __attribute__((vector_size(N * sizeof(T))));
};

// The OR of v's lanes.
struct BitOr {
  template <typename V>
  inline __attribute__((always_inline)) V operator()(V a, V b) const {
    return a | b;
  }
};

// The n bytes at p (n >= 0, possibly fewer than N) into a zero-padded buffer of N, in a loop of fixed length: a call
// to memcpy in a kernel's loop would make the compiler keep its accumulators in memory across it.
template <int N, typename T>
inline __attribute__((always_inline)) void load_padded(T& out, const uint8_t* p, int64_t n, uint8_t fill = 0) {
  static_assert(sizeof(T) == N);
  uint8_t pad[N];
  for (int i = 0; i < N; ++i) pad[i] = i < n ? p[i] : fill;
  std::memcpy(&out, pad, N);
}

// How far ahead of a step the streaming kernels ask for a weight row's bytes: the rows an expert streams lie one
// after another, and a new expert's rows start cold.
constexpr int64_t kPrefetchBytes = 4096;
// The bfloat16 dot-product sources ask for the line `near` bytes ahead into L1 and, with far > 0, the line far bytes
// ahead into L2 (measured on Zen 4: MXFP4, which spends fewer instructions a byte, gains from the second; FP8 not).
template <int64_t near, int64_t far>
inline __attribute__((always_inline)) void dot_prefetch(const uint8_t* p) {
  __builtin_prefetch(p + near);
  if constexpr (far > 0) __builtin_prefetch(p + far, 0, 2);
}

// The row sources of the quantized weights for the streaming kernel (the PlainRows interface, grouped_gemm.h), and
// the layout of a's rows they read them against: kInterleave G = 1, a's columns as they are; else (G = kVectors)
// lane i of vector j of a step holds column G i + j of the step, so that the codes packed in one 32-bit lane (four
// e4m3, eight e2m1) land in the same lane of G vectors, each taken out with a shift (no cross-lane shuffle). a's rows
// are copied into that layout zero-padded to a whole number of steps (Kp columns): a step past K reads the codes and
// scales zero-padded too (load never reads past a row), and load_tail is never reached.

// The layout of a's columns in a step of n-lane vectors: lane i of vector j holds column G i + j of the step (G = 1:
// the columns in order).
template <int n, int G>
struct Interleaved {
  static constexpr int64_t column(int64_t in) { return G == 1 ? in : G * (in % n) + in / n; }
};

// The FP8 scales of the row block of the rows being read, spread over the columns (times a factor; zero past K):
// update(m) makes them row m's, and says whether they changed (the rows come in order, a block of bn at a time).
template <typename acc_t>
struct BlockScales {
  const float* scale;
  int64_t K, bn, bk, kb;
  acc_t factor;
  std::vector<acc_t> col;  // [Kp]
  int64_t lo = 0, hi = 0;  // the rows of the current block
  BlockScales(const QMatrix& w, int64_t Kp, acc_t factor)
      : scale(w.fp8_scale), K(w.K), bn(w.bn), bk(w.bk), kb((w.K + w.bk - 1) / w.bk), factor(factor), col(Kp) {}
  bool update(int64_t m) {
    if (m >= lo && m < hi) return false;
    const int64_t b = m / bn;
    lo = b * bn;
    hi = lo + bn;
    const float* s = scale + b * kb;
    for (int64_t j = 0; j < kb; ++j) {
      const acc_t v = static_cast<acc_t>(s[j]) * factor;
      for (int64_t k = j * bk; k < std::min(K, (j + 1) * bk); ++k) col[k] = v;
    }
    return true;
  }
};

// FP8 as float32 by its bits: code j of each 32-bit lane moved to the top byte, then its exponent and mantissa into
// a float32's (e4m3's subnormals land on float32's: value * 2^-120, exactly where denormals are read as they are),
// the sign kept. kScaled: times the scale of the column's block * 2^120 (exact for scales below 2^8; else the
// caller has folded the scales into a: fp8_stream). kLaneNaN: NaN codes made NaN in their lanes; else a step
// only notes whether it has one (a test of its 64 bytes at once), and the row's dot products are NaN (kFlagsNaN).
template <int VB, bool kScaled, bool kLaneNaN>
struct Fp8BitRows : Interleaved<VB / 4, 4> {
  static constexpr int n = VB / 4, kVectors = 4, kInterleave = 4, kStep = 4 * n;
  using V = Vec<float, VB>;
  using U32 = typename VecN<uint32_t, n>::type;
  using I32 = typename VecN<int32_t, n>::type;
  const uint8_t* data;
  int64_t K, Kp;
  BlockScales<float> scales;
  std::vector<float> col_scale;  // [Kp]: scales.col at each position of a's layout
  Fp8BitRows(const QMatrix& w, int64_t Kp)
      : data(w.data), K(w.K), Kp(Kp), scales(w, kScaled ? Kp : 0, 0x1p120f), col_scale(kScaled ? Kp : 0) {}
  struct Row {
    static constexpr int kVectors = 4;
    static constexpr bool kStepScale = false, kFlagsNaN = !kLaneNaN;
    const uint8_t* p;
    const float* s;
    int64_t K;
    U32 nan = {};  // a byte 0x80 where a step had a NaN code (kFlagsNaN)
    template <int VB_, typename acc_t>
    inline __attribute__((always_inline)) void load(int64_t k, V (&w)[kVectors]) {
      U32 raw;
      if (k + kStep <= K) {
        std::memcpy(&raw, p + k, sizeof(raw));
        __builtin_prefetch(p + k + kPrefetchBytes);
      } else {
        load_padded<kStep>(raw, p + k, K - k);
      }
      if constexpr (!kLaneNaN) {  // a byte of ~raw & 0x7f7f7f7f is zero where the code is NaN
        const U32 y = ~raw & 0x7f7f7f7fu;
        nan |= (y - 0x01010101u) & ~y & 0x80808080u;
      }
      for (int j = 0; j < kVectors; ++j) {
        const I32 t = (I32)(raw << (24 - 8 * j));  // code j in the top byte
        U32 bits = (U32)(t >> 4) & 0x87f00000u;
        if constexpr (kLaneNaN) bits = ((U32)t & 0x7f000000u) == 0x7f000000u ? bits | 0x7fc00000u : bits;
        std::memcpy(&w[j], &bits, sizeof(bits));
        if constexpr (kScaled) {
          V sc;
          std::memcpy(&sc, s + k + j * n, sizeof(sc));
          w[j] *= sc;
        }
      }
    }
    template <int VB_, typename acc_t>
    inline __attribute__((always_inline)) void load_tail(int64_t k, int64_t, V (&w)[kVectors]) {
      load<VB_, acc_t>(k, w);
    }
    bool nan_seen() const { return reduce_halves(nan, BitOr{}) != 0; }
  };
  Row row(int64_t m) {
    if (kScaled && scales.update(m)) {
      if (scales.bk % kStep == 0 && K % kStep == 0) {  // one scale a step: the layout's order is the columns'
        std::copy(scales.col.begin(), scales.col.end(), col_scale.begin());
      } else {
        for (int64_t pos = 0; pos < Kp; ++pos) {
          const int64_t in = pos % kStep;
          col_scale[pos] = scales.col[pos - in + this->column(in)];
        }
      }
    }
    return {data + m * K, col_scale.data(), K};
  }
  int64_t bytes_per_row() const { return K; }
};

// The MXFP4 weight the MXFP4 sources read: row m's codes and scales.
struct Mxfp4Matrix {
  const uint8_t* data;
  const uint8_t* scale;
  int64_t K;
  Mxfp4Matrix(const QMatrix& w, int64_t) : data(w.data), scale(w.mx_scale), K(w.K) {}
  const uint8_t* codes(int64_t m) const { return data + m * (K / 2); }
  const uint8_t* scales(int64_t m) const { return scale + m * (K / 32); }
  // whether no scale of row m is 0 or 255 (e8m0_lanes' normal), eight bytes at a time
  bool normal_scales(int64_t m) const {
    const uint8_t* s = scales(m);
    uint64_t special = 0;
    for (int64_t i = 0; i < K / 32; i += 8) {
      uint64_t v = ~uint64_t(0) / 255 * 0x80;  // bytes past the row: 0x80, neither
      std::memcpy(&v, s + i, std::min<int64_t>(8, K / 32 - i));
      const uint64_t ones = ~uint64_t(0) / 255, high = ones * 0x80, inv = ~v;
      special |= ((v - ones) & ~v & high) | ((inv - ones) & ~inv & high);  // a zero byte in v or in ~v
    }
    return special == 0;
  }
  int64_t bytes_per_row() const { return K / 2 + K / 32; }
};

// The bytes of a step of `step` MXFP4 columns from column k of a row (codes p, scales s, K columns): its codes
// into raw (step / 2 bytes) and its step / 32 scales into sw, the low byte first; past K code 0 at scale 2^0.
template <int step, typename Raw>
inline __attribute__((always_inline)) void mxfp4_step(const uint8_t* p, const uint8_t* s, int64_t K, int64_t k,
                                                      Raw& raw, uint32_t& sw) {
  static_assert(sizeof(Raw) == step / 2 && step / 32 <= 4);
  sw = 0;
  if (k + step <= K) {
    std::memcpy(&raw, p + k / 2, sizeof(raw));
    std::memcpy(&sw, s + k / 32, step / 32);
    __builtin_prefetch(p + k / 2 + kPrefetchBytes);
    __builtin_prefetch(s + k / 32 + kPrefetchBytes / 16);
  } else {
    load_padded<step / 2>(raw, p + k / 2, (K - k) / 2);
    load_padded<4>(sw, s + k / 32, (K - k) / 32, 127);
  }
}

// n float32 lanes of 2^(s - 127) for the scale bytes of sw: byte q in lanes 4q .. 4q + 3. normal: no byte is 0 or
// 255, so that s << 23 are the bits; else those are 2^-127 and NaN.
template <int n>
inline __attribute__((always_inline)) Vec<float, 4 * n> e8m0_lanes(uint32_t sw, bool normal) {
  using U32 = typename VecN<uint32_t, n>::type;
  U32 shift;
  for (int i = 0; i < n; ++i) shift[i] = 8 * (i / 4);
  const U32 e = ((U32{} + sw) >> shift) & 0xffu;
  U32 bits = e << 23;
  if (!normal) bits = e == 0u ? U32{} + 0x00400000u : (e == 255u ? U32{} + 0x7fc00000u : bits);
  Vec<float, 4 * n> v;
  std::memcpy(&v, &bits, sizeof(v));
  return v;
}

// MXFP4 as float32: nibble j of each 32-bit lane (code 8i + j of the step) through a permute of the 16 e2m1 values;
// lanes 4q .. 4q + 3 share scale q of the step, 2^(s - 127) as float32 bits. kStepScale: the values unscaled and
// the scales as the step's scale vector (the dot products scale the step's sums); else the values scaled.
template <int VB, bool kStepScaled>
struct Mxfp4BitRows : Mxfp4Matrix, Interleaved<VB / 4, 8> {
  static constexpr int n = VB / 4, kVectors = 8, kInterleave = 8, kStep = 8 * n;
  using V = Vec<float, VB>;
  using U32 = typename VecN<uint32_t, n>::type;
  using I32 = typename VecN<int32_t, n>::type;
  using Mxfp4Matrix::Mxfp4Matrix;
  struct Row {
    static constexpr int kVectors = 8;
    static constexpr bool kStepScale = kStepScaled, kFlagsNaN = false;
    const uint8_t* p;
    const uint8_t* s;
    int64_t K;
    bool normal;  // Mxfp4Matrix::normal_scales
    template <int VB_, typename acc_t>
    inline __attribute__((always_inline)) void load(int64_t k, V (&w)[kVectors], V& sv) {
      U32 raw;
      uint32_t sw;
      mxfp4_step<kStep>(p, s, K, k, raw, sw);
      sv = e8m0_lanes<n>(sw, normal);
      for (int j = 0; j < kVectors; ++j) {
        const I32 idx = (I32)(raw >> (4 * j));  // the permutes read its low 4 bits
        if constexpr (n == 16) {
          V t;
          std::memcpy(&t, kE2m1, sizeof(t));
          w[j] = __builtin_shuffle(t, idx);
        } else {
          static_assert(n == 8);
          V t0, t1;
          std::memcpy(&t0, kE2m1, sizeof(t0));
          std::memcpy(&t1, kE2m1 + 8, sizeof(t1));
          w[j] = __builtin_shuffle(t0, t1, idx);
        }
        if constexpr (!kStepScaled) w[j] *= sv;
      }
    }
    template <int VB_, typename acc_t>
    inline __attribute__((always_inline)) void load(int64_t k, V (&w)[kVectors]) {
      V sv;
      load<VB_, acc_t>(k, w, sv);
    }
    template <int VB_, typename acc_t>
    inline __attribute__((always_inline)) void load_tail(int64_t k, int64_t, V (&w)[kVectors], V& sv) {
      load<VB_, acc_t>(k, w, sv);
    }
    template <int VB_, typename acc_t>
    inline __attribute__((always_inline)) void load_tail(int64_t k, int64_t, V (&w)[kVectors]) {
      load<VB_, acc_t>(k, w);
    }
  };
  Row row(int64_t m) const { return {codes(m), scales(m), K, normal_scales(m)}; }
};

// FP8 through a table of the codes' values, times the scale of each column's block (natural layout, two vectors a
// step): float64, and float32 where the bit conversion would not be exact.
template <typename acc_t, int VB>
struct Fp8TableRows : Interleaved<VB / sizeof(acc_t), 1> {
  static constexpr int n = VB / sizeof(acc_t), kVectors = 2, kInterleave = 1, kStep = 2 * n;
  using V = Vec<acc_t, VB>;
  const uint8_t* data;
  int64_t K;
  BlockScales<acc_t> scales;
  Fp8TableRows(const QMatrix& w, int64_t Kp) : data(w.data), K(w.K), scales(w, Kp, acc_t(1)) {}
  struct Row {
    static constexpr int kVectors = 2;
    static constexpr bool kStepScale = false, kFlagsNaN = false;
    const uint8_t* p;
    const acc_t* s;
    int64_t K;
    const acc_t* t;  // fp8_table
    template <int VB_, typename a_t>
    inline __attribute__((always_inline)) void load(int64_t k, V (&w)[kVectors]) {
      uint8_t q[kStep] = {};
      std::memcpy(q, p + k, k + kStep <= K ? kStep : std::max<int64_t>(0, K - k));
      for (int j = 0; j < kVectors; ++j) {
        V sc;
        std::memcpy(&sc, s + k + j * n, sizeof(sc));
        for (int l = 0; l < n; ++l) w[j][l] = t[q[j * n + l]];
        w[j] *= sc;
      }
    }
    template <int VB_, typename a_t>
    inline __attribute__((always_inline)) void load_tail(int64_t k, int64_t, V (&w)[kVectors]) {
      load<VB_, a_t>(k, w);
    }
  };
  Row row(int64_t m) {
    scales.update(m);
    return {data + m * K, scales.col.data(), K, fp8_table<acc_t>()};
  }
  int64_t bytes_per_row() const { return K; }
};

// MXFP4 through tables (float64): vector 0 of a step gets the low nibbles of its n bytes (the even columns), vector 1
// the high ones; the step's 2n columns (2n divides 32) share one scale.
template <typename acc_t, int VB>
struct Mxfp4TableRows : Mxfp4Matrix, Interleaved<VB / sizeof(acc_t), 2> {
  static constexpr int n = VB / sizeof(acc_t), kVectors = 2, kInterleave = 2, kStep = 2 * n;
  using V = Vec<acc_t, VB>;
  using Mxfp4Matrix::Mxfp4Matrix;
  struct Row {
    static constexpr int kVectors = 2;
    static constexpr bool kStepScale = false, kFlagsNaN = false;
    const uint8_t* p;
    const uint8_t* s;
    int64_t K;
    const double* e8m0;  // Tables::e8m0
    template <int VB_, typename a_t>
    inline __attribute__((always_inline)) void load(int64_t k, V (&w)[kVectors]) {
      if (k >= K) {  // past K (a step never straddles it: K is a multiple of 32)
        w[0] = w[1] = V{};
        return;
      }
      const uint8_t* bytes = p + k / 2;
      const acc_t sc = static_cast<acc_t>(e8m0[s[k / 32]]);
      for (int l = 0; l < n; ++l) {
        w[0][l] = kE2m1[bytes[l] & 15] * sc;
        w[1][l] = kE2m1[bytes[l] >> 4] * sc;
      }
    }
    template <int VB_, typename a_t>
    inline __attribute__((always_inline)) void load_tail(int64_t k, int64_t, V (&w)[kVectors]) {
      load<VB_, a_t>(k, w);
    }
  };
  Row row(int64_t m) const { return {codes(m), scales(m), K, tables().e8m0}; }
};

// The element type of a's copy that Rows reads: its a_t (bfloat16 bits for the bfloat16 dot products), else acc_t.
template <typename Rows, typename acc_t, typename = void>
struct AOf {
  using type = acc_t;
};
template <typename Rows, typename acc_t>
struct AOf<Rows, acc_t, std::void_t<typename Rows::a_t>> {
  using type = typename Rows::a_t;
};

// a [rows, K] in the layout of Rows (its column(i): the column of position i of a step), zero-padded to Kp columns;
// as bfloat16 bits (rounded to nearest even, NaN kept) where Rows reads them so.
template <typename Rows, typename acc_t>
auto rows_layout(const acc_t* a, int64_t rows, int64_t K, int64_t Kp) {
  using a_t = typename AOf<Rows, acc_t>::type;
  constexpr int64_t step = Rows::kStep;
  constexpr auto columns = [] {
    std::array<int32_t, step> c{};
    for (int64_t i = 0; i < step; ++i) c[i] = static_cast<int32_t>(Rows::column(i));
    return c;
  }();
  const auto convert = [](acc_t v) {
    if constexpr (std::is_same_v<a_t, uint16_t>) {
      const float f = static_cast<float>(v);
      uint32_t bits;
      std::memcpy(&bits, &f, sizeof(bits));
      return static_cast<uint16_t>(f != f ? 0x7fc0u : bf16_rounded_bits(bits));
    } else {
      return v;
    }
  };
  std::vector<a_t> out(rows * Kp, a_t(0));
  for (int64_t r = 0; r < rows; ++r) {
    const acc_t* ar = a + r * K;
    a_t* o = out.data() + r * Kp;
    for (int64_t k = 0; k < Kp; k += step) {
      if (k + step <= K) {
        for (int64_t i = 0; i < step; ++i) o[k + i] = convert(ar[k + columns[i]]);
      } else {
        for (int64_t i = 0; i < step; ++i) {
          if (k + columns[i] < K) o[k + i] = convert(ar[k + columns[i]]);
        }
      }
    }
  }
  return out;
}

#if MOE_KERNELS_X86
// --- bfloat16 dot products (x in bfloat16, on CPUs with AVX512-BF16 and AVX512-VBMI) ---
// The weights' values are exact in bfloat16 (e4m3's and e2m1's, subnormals included), and so is x; vdpbf16ps sums
// the products of pairs of them into float32 lanes, for half the instructions of widening each code to float32. The
// activations between the projections are rounded to bfloat16, as bfloat16 compute rounds them. Built for that ISA
// level alone (MOE_KERNELS_AVX512_BF16) and used where bf16_dot_available().
#define MOE_KERNELS_AVX512_BF16 \
  __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,f16c,avx512vbmi,avx512bf16")))

typedef short BF16x32 __attribute__((vector_size(64)));  // bfloat16 bits, vdpbf16ps's operands
typedef uint8_t U8x64 __attribute__((vector_size(64)));
typedef uint16_t U16x32 __attribute__((vector_size(64)));
typedef float F32x16 __attribute__((vector_size(64)));
constexpr int kTileRows = 16;  // weight rows of an AMX tile (amx_stream)

// acc + the products of a and b summed in pairs (vdpbf16ps; a template so that it is only ever compiled inlined into
// the functions of its ISA level).
template <typename T = void>
inline __attribute__((always_inline)) F32x16 dot_bf16(F32x16 acc, BF16x32 a, BF16x32 b) {
  return __builtin_ia32_dpbf16ps_v16sf(acc, a, b);
}

// The bfloat16 bits of e4m3's 128 magnitudes, high and low bytes (NaN: 0x7fc0), for vpermi2b; and of the 16 e2m1
// codes, twice over (vpermw reads 5 bits of its index).
struct Bf16Tables {
  alignas(64) uint8_t fp8_hi[128];
  alignas(64) uint8_t fp8_lo[128];
  alignas(64) uint16_t e2m1[32];
  Bf16Tables() {
    for (int c = 0; c < 128; ++c) {
      uint32_t bits;
      std::memcpy(&bits, &tables().fp8[c], sizeof(bits));
      const uint32_t h = c == 127 ? 0x7fc0u : bits >> 16;  // exact: no bits below the top 16
      fp8_hi[c] = static_cast<uint8_t>(h >> 8);
      fp8_lo[c] = static_cast<uint8_t>(h & 0xff);
    }
    for (int c = 0; c < 32; ++c) {
      uint32_t bits;
      std::memcpy(&bits, &kE2m1[c % 16], sizeof(bits));
      e2m1[c] = static_cast<uint16_t>(bits >> 16);
    }
  }
};
const Bf16Tables& bf16_tables() {
  static const Bf16Tables t;
  return t;
}

// The bytes of a and b interleaved within each 128-bit lane, the lower 8 of each (lo) and the upper 8 (hi):
// vpunpcklbw and vpunpckhbw, bfloat16 words from their low and high bytes.
inline __attribute__((always_inline)) void zip_bytes_in_lanes(U8x64 a, U8x64 b, U8x64& lo, U8x64& hi) {
  lo = __builtin_shufflevector(a, b, 0, 64, 1, 65, 2, 66, 3, 67, 4, 68, 5, 69, 6, 70, 7, 71, 16, 80, 17, 81, 18, 82,
                               19, 83, 20, 84, 21, 85, 22, 86, 23, 87, 32, 96, 33, 97, 34, 98, 35, 99, 36, 100, 37,
                               101, 38, 102, 39, 103, 48, 112, 49, 113, 50, 114, 51, 115, 52, 116, 53, 117, 54, 118,
                               55, 119);
  hi = __builtin_shufflevector(a, b, 8, 72, 9, 73, 10, 74, 11, 75, 12, 76, 13, 77, 14, 78, 15, 79, 24, 88, 25, 89, 26,
                               90, 27, 91, 28, 92, 29, 93, 30, 94, 31, 95, 40, 104, 41, 105, 42, 106, 43, 107, 44, 108,
                               45, 109, 46, 110, 47, 111, 56, 120, 57, 121, 58, 122, 59, 123, 60, 124, 61, 125, 62,
                               126, 63, 127);
}

// The levels of sum_halves_16: of two vectors a and b of partial sums, each holding sums of 16 / W lanes in W-lane
// groups, one vector of the pairwise sums of their groups' halves (a's in the lower half, b's in the upper).
inline __attribute__((always_inline)) F32x16 halves_8(F32x16 a, F32x16 b) {
  return __builtin_shufflevector(a, b, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
         __builtin_shufflevector(a, b, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
}
inline __attribute__((always_inline)) F32x16 halves_4(F32x16 a, F32x16 b) {
  return __builtin_shufflevector(a, b, 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
         __builtin_shufflevector(a, b, 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
}
inline __attribute__((always_inline)) F32x16 halves_2(F32x16 a, F32x16 b) {
  return __builtin_shufflevector(a, b, 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29) +
         __builtin_shufflevector(a, b, 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
}
inline __attribute__((always_inline)) F32x16 halves_1(F32x16 a, F32x16 b) {
  return __builtin_shufflevector(a, b, 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30) +
         __builtin_shufflevector(a, b, 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
}

// The sums of the lanes of 16 vectors v[0..15], as sum_halves sums each (the lower half plus the upper half, until
// one lane is left) but 16 at once: each level adds the halves of two vectors' lanes in one vector, and the last
// leaves sum i in lane i.
inline __attribute__((always_inline)) F32x16 sum_halves_16(const F32x16 (&v)[16]) {
  F32x16 w8[8], w4[4], w2[2];
  for (int j = 0; j < 8; ++j) w8[j] = halves_8(v[2 * j], v[2 * j + 1]);
  for (int j = 0; j < 4; ++j) w4[j] = halves_4(w8[2 * j], w8[2 * j + 1]);
  for (int j = 0; j < 2; ++j) w2[j] = halves_2(w4[2 * j], w4[2 * j + 1]);
  return halves_1(w2[0], w2[1]);
}

// The first n bytes at p (0 <= n < N, N = 16 or 64), zero past them, by a masked load: no byte past them is read.
// (The bfloat16 sources' functions are templates, compiled only inlined into stream_bf16_dot's ISA level.)
template <int N, typename T>
inline __attribute__((always_inline)) void load_first(T& out, const uint8_t* p, int64_t n) {
  static_assert(sizeof(T) == N);
  typedef char C16 __attribute__((vector_size(16)));
  typedef char C64 __attribute__((vector_size(64)));
  if constexpr (N == 16) {
    const C16 v = __builtin_ia32_loaddquqi128_mask(reinterpret_cast<const char*>(p), C16{},
                                                   static_cast<uint16_t>((1u << n) - 1));
    std::memcpy(&out, &v, N);
  } else {
    static_assert(N == 64);
    const C64 v = __builtin_ia32_loaddquqi512_mask(reinterpret_cast<const char*>(p), C64{}, (uint64_t(1) << n) - 1);
    std::memcpy(&out, &v, N);
  }
}

// The products of S vectors of bfloat16 weights w with columns [k, k + 32 S) of R rows of a [R, Kp] (bfloat16 bits
// in the source's layout), added into part[r] by vdpbf16ps, vector by vector (a fixed order for every R).
template <int R, int S>
inline __attribute__((always_inline)) void dot_into(const uint16_t* a, int64_t Kp, int64_t k, const BF16x32 (&w)[S],
                                                    F32x16 (&part)[R]) {
  #pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
    #pragma GCC unroll 16
    for (int v = 0; v < S; ++v) {
      BF16x32 av;
      std::memcpy(&av, a + r * Kp + k + 32 * v, sizeof(av));
      part[r] = dot_bf16(part[r], av, w[v]);
    }
  }
}

// The rows of weights of a source of bfloat16 dot products (its dot_rows<R, G>(m, a, Kp, sum): the dot products of
// rows m .. m + G - 1 with R rows of a [R, Kp], bfloat16 bits in the source's layout, as the lanes of sum[g][r])
// against R rows of a: G rows at once (up to its kGroup; G R chains of vdpbf16ps, few enough for the registers) so
// that the chains' latencies overlap, the sums of 16 weight rows reduced at once (sum_halves_16). A row's sums do not
// depend on G: the same bits whatever rows share the call.
template <typename Rows>
struct Bf16DotBlock {
  static constexpr bool kOwnBlock = true;
  template <int R>
  inline __attribute__((always_inline)) void block(const uint16_t* a, int64_t Kp, int64_t m0, int64_t m1, int64_t M,
                                                   const float* bias, float* out) {
    constexpr int G = std::min(Rows::kGroup, R == 1 ? 4 : (R == 2 ? 2 : 1));
    auto& self = static_cast<Rows&>(*this);
    for (int64_t mb = m0; mb < m1; mb += 16) {
      const int64_t count = std::min<int64_t>(16, m1 - mb);
      F32x16 acc[R][16] = {};
      int64_t i = 0;
      for (; i + G <= count; i += G) rows_into<R, G>(self, mb + i, a, Kp, acc, i);
      for (; i < count; ++i) rows_into<R, 1>(self, mb + i, a, Kp, acc, i);
      #pragma GCC unroll 16
      for (int r = 0; r < R; ++r) {
        F32x16 res = sum_halves_16(acc[r]);
        if (bias != nullptr) {
          float b[16] = {};
          std::memcpy(b, bias + mb, count * sizeof(float));
          F32x16 bv;
          std::memcpy(&bv, b, sizeof(bv));
          res += bv;
        }
        std::memcpy(out + r * M + mb, &res, count * sizeof(float));
      }
    }
  }
  template <int R, int G>
  static inline __attribute__((always_inline)) void rows_into(const Rows& self, int64_t m, const uint16_t* a,
                                                              int64_t Kp, F32x16 (&acc)[R][16], int64_t i) {
    F32x16 sum[G][R] = {};
    self.template dot_rows<R, G>(m, a, Kp, sum);
    #pragma GCC unroll 16
    for (int g = 0; g < G; ++g) {
      #pragma GCC unroll 16
      for (int r = 0; r < R; ++r) acc[r][i + g] = sum[g][r];
    }
  }
};

// FP8 by bfloat16 dot products, K blocks of a multiple of 64 columns: a step is 64 codes, each code's bfloat16 high
// and low bytes from tables (vpermi2b of its 7 magnitude bits; the sign put back), interleaved into two vectors of
// 32 bfloat16 (word p of vector v: column 16 (p / 8) + 8 v + p % 8 of the step); a K block's products summed
// unscaled, then times its scale.
struct Bf16Fp8Rows : Bf16DotBlock<Bf16Fp8Rows> {
  static constexpr int kStep = 64, kGroup = 1;  // rows at once: more made the cold weights' streams slower
  using a_t = uint16_t;
  static constexpr int64_t column(int64_t in) { return 16 * (in % 32 / 8) + 8 * (in / 32) + in % 8; }
  const uint8_t* data;
  const float* scale;
  int64_t K, bn, bk, kb;
  const Bf16Tables* t = &bf16_tables();
  Bf16Fp8Rows(const QMatrix& w, int64_t)
      : data(w.data), scale(w.fp8_scale), K(w.K), bn(w.bn), bk(w.bk), kb((w.K + w.bk - 1) / w.bk) {}
  // the 64 codes of row p from column k as bfloat16 (zero past K)
  template <typename = void>
  inline __attribute__((always_inline)) void load(const uint8_t* p, int64_t k, BF16x32 (&w)[2]) const {
    U8x64 raw;
    if (k + kStep <= K) {
      std::memcpy(&raw, p + k, sizeof(raw));
      dot_prefetch<kPrefetchBytes, 0>(p + k);
    } else {
      load_first<kStep>(raw, p + k, K - k);
    }
    U8x64 h0, h1, l0, l1;
    std::memcpy(&h0, t->fp8_hi, sizeof(h0));
    std::memcpy(&h1, t->fp8_hi + 64, sizeof(h1));
    std::memcpy(&l0, t->fp8_lo, sizeof(l0));
    std::memcpy(&l1, t->fp8_lo + 64, sizeof(l1));
    const U8x64 hi_bytes = __builtin_shuffle(h0, h1, raw) | (raw & 0x80);  // the permute reads 7 bits
    const U8x64 lo_bytes = __builtin_shuffle(l0, l1, raw);
    U8x64 w0, w1;
    zip_bytes_in_lanes(lo_bytes, hi_bytes, w0, w1);
    std::memcpy(&w[0], &w0, sizeof(w0));
    std::memcpy(&w[1], &w1, sizeof(w1));
  }
  template <int R, int G>
  inline __attribute__((always_inline)) void dot_rows(int64_t m, const uint16_t* a, int64_t Kp,
                                                      F32x16 (&sum)[G][R]) const {
    const uint8_t* p[G];
    const float* s[G];
    #pragma GCC unroll 16
    for (int g = 0; g < G; ++g) {
      p[g] = data + (m + g) * K;
      s[g] = scale + (m + g) / bn * kb;
    }
    for (int64_t j = 0, k = 0; k < Kp; ++j) {  // K block j: bk / 64 steps (fewer at the end of a row)
      F32x16 part[G][R] = {};
      for (const int64_t end = std::min(Kp, k + bk); k < end; k += kStep) {
        #pragma GCC unroll 16
        for (int g = 0; g < G; ++g) {
          BF16x32 w[2];
          load(p[g], k, w);
          dot_into<R>(a, Kp, k, w, part[g]);
        }
      }
      #pragma GCC unroll 16
      for (int g = 0; g < G; ++g) {
        const F32x16 sv = F32x16{} + s[g][j];
        #pragma GCC unroll 16
        for (int r = 0; r < R; ++r) sum[g][r] += part[g][r] * sv;
      }
    }
  }
  int64_t bytes_per_row() const { return K; }
  // --- the AMX tile interface (amx_stream): a step is two chunks of 32 bfloat16; group = K block
  static constexpr int kChunks = 2;
  template <typename = void>
  inline __attribute__((always_inline)) void tile_row(int64_t m, int64_t k, uint16_t* abuf, int rr) const {
    const uint8_t* p = data + m * K;
    __builtin_prefetch(p + kTileRows * K + k, 0, 2);  // the row a block of tile rows ahead
    BF16x32 w[2];
    load(p, k, w);
    std::memcpy(abuf + rr * 32, &w[0], sizeof(w[0]));
    std::memcpy(abuf + (kTileRows + rr) * 32, &w[1], sizeof(w[1]));
  }
  int64_t group(int64_t q, int) const { return q * kStep / bk; }
  int64_t groups() const { return kb; }
  int64_t segment_steps(int S) const { return S * (bk / kStep); }
  template <typename = void>
  inline __attribute__((always_inline)) F32x16 group_scales(int64_t m, int64_t g0, int64_t n) const {
    const float* s = scale + m / bn * kb + g0;
    return __builtin_ia32_loadups512_mask(s, F32x16{}, static_cast<uint16_t>(n >= 16 ? 0xffff : (1u << n) - 1));
  }
};

// 16 float32 lanes of 2^(s - 127) for the e8m0 scale bytes s[0 .. n) (lane i: s[i]; past n: 2^-127, for codes
// past K), 0 and 255 as 2^-127 and NaN.
template <typename = void>
inline __attribute__((always_inline)) F32x16 e8m0_16(const uint8_t* s, int64_t n) {
  typedef uint8_t U8x16 __attribute__((vector_size(16)));
  U8x16 b;
  if (n >= 16) {
    std::memcpy(&b, s, sizeof(b));
  } else {
    load_first<16>(b, s, n);
  }
  typedef char C16 __attribute__((vector_size(16)));
  typedef int S32x16 __attribute__((vector_size(64)));
  C16 bc;
  std::memcpy(&bc, &b, sizeof(bc));
  // vpmovzxbd (a __builtin_convertvector of the bytes became byte extracts and inserts)
  const S32x16 widened = __builtin_ia32_pmovzxbd512_mask(bc, S32x16{}, 0xffff);
  U32x16 e;
  std::memcpy(&e, &widened, sizeof(e));
  const U32x16 bits = e == 0u ? U32x16{} + 0x00400000u : (e == 255u ? U32x16{} + 0x7fc00000u : e << 23);
  F32x16 v;
  std::memcpy(&v, &bits, sizeof(v));
  return v;
}

// MXFP4 by bfloat16 dot products: a step is 128 codes, nibble j of each 16-bit word through vpermw of the e2m1
// values' bfloat16 bits (word p of vector j: column 4 p + j of the step); the pairs vdpbf16ps sums, codes 8 i + j and
// 8 i + 4 + j, share scale i / 4 of the step: a step's products summed unscaled, then times its four scales, taken
// from the 16 scales of four steps converted at once.
// Nibble j of each 16-bit word of raw as the bfloat16 bits of its e2m1 value, into w[j]: vpermw reads 5 bits of a
// word (the table holds the 16 values twice). (A one-table __builtin_shuffle becomes vpermi2w, three micro-ops on
// Intel cores.)
template <typename = void>
inline __attribute__((always_inline)) void nibbles_bf16(U16x32 table, U16x32 raw, BF16x32 (&w)[4]) {
  typedef short S16x32 __attribute__((vector_size(64)));
  S16x32 t;
  std::memcpy(&t, &table, sizeof(t));
  #pragma GCC unroll 4
  for (int j = 0; j < 4; ++j) {
    const U16x32 shifted = raw >> (4 * j);
    S16x32 idx;
    std::memcpy(&idx, &shifted, sizeof(idx));
    const S16x32 v = __builtin_ia32_permvarhi512_mask(t, idx, S16x32{}, ~0u);
    std::memcpy(&w[j], &v, sizeof(v));
  }
}

struct Bf16Mxfp4Rows : Mxfp4Matrix, Bf16DotBlock<Bf16Mxfp4Rows> {
  static constexpr int kStep = 128, kGroup = 4;
  static constexpr int64_t kNear = 1024, kFar = 8192;  // dot_prefetch's distances
  using a_t = uint16_t;
  static constexpr int64_t column(int64_t in) { return 4 * (in % 32) + in / 32; }
  using Mxfp4Matrix::Mxfp4Matrix;
  const uint16_t* e2m1 = bf16_tables().e2m1;
  template <int R, int G>
  inline __attribute__((always_inline)) void dot_rows(int64_t m, const uint16_t* a, int64_t Kp,
                                                      F32x16 (&sum)[G][R]) const {
    U16x32 table;
    std::memcpy(&table, e2m1, sizeof(table));
    I32x16 quarter;  // lane i: scale i / 4 of a step
    for (int i = 0; i < 16; ++i) quarter[i] = i / 4;
    for (int64_t k0 = 0; k0 < Kp; k0 += 4 * kStep) {
      F32x16 sv[G];
      #pragma GCC unroll 16
      for (int g = 0; g < G; ++g) {
        const uint8_t* s = scales(m + g) + k0 / 32;
        sv[g] = e8m0_16(s, (K - k0) / 32);
        __builtin_prefetch(s + kFar / 16);
      }
      #pragma GCC unroll 4
      for (int q = 0; q < 4; ++q) {
        const int64_t k = k0 + q * kStep;
        if (k >= Kp) break;
        #pragma GCC unroll 16
        for (int g = 0; g < G; ++g) {
          const uint8_t* p = codes(m + g) + k / 2;
          U16x32 raw;
          if (k + kStep <= K) {
            std::memcpy(&raw, p, sizeof(raw));
            dot_prefetch<kNear, kFar>(p);
          } else {  // K is a multiple of 32
            load_first<kStep / 2>(raw, p, (K - k) / 2);
          }
          BF16x32 w[4];
          nibbles_bf16(table, raw, w);
          F32x16 part[R] = {};
          dot_into<R>(a, Kp, k, w, part);
          const F32x16 scale = __builtin_shuffle(sv[g], quarter + 4 * q);
          #pragma GCC unroll 16
          for (int r = 0; r < R; ++r) sum[g][r] += part[r] * scale;
        }
      }
    }
  }
  // --- the AMX tile interface (amx_stream): a step is four chunks of 32 bfloat16 (nibble j of each word); pair row
  // i of a chunk (columns 8 i + j and 8 i + 4 + j of the step) lies in group (scale) i / 4 of the step
  static constexpr int kChunks = 4;
  template <typename = void>
  inline __attribute__((always_inline)) void tile_row(int64_t m, int64_t k, uint16_t* abuf, int rr) const {
    U16x32 table;
    std::memcpy(&table, e2m1, sizeof(table));
    const uint8_t* p = codes(m) + k / 2;
    U16x32 raw;
    if (k + kStep <= K) {
      std::memcpy(&raw, p, sizeof(raw));
      __builtin_prefetch(p + kTileRows * (K / 2), 0, 2);  // the row a block of tile rows ahead
      if (k == 0) __builtin_prefetch(scales(m + kTileRows), 0, 2);
    } else {
      load_first<kStep / 2>(raw, p, (K - k) / 2);
    }
    BF16x32 w[4];
    nibbles_bf16(table, raw, w);
    #pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) std::memcpy(abuf + (j * kTileRows + rr) * 32, &w[j], sizeof(w[j]));
  }
  int64_t group(int64_t q, int i) const { return 4 * q + i / 4; }
  int64_t groups() const { return K / 32; }
  int64_t segment_steps(int S) const { return S / 4; }
  template <typename = void>
  inline __attribute__((always_inline)) F32x16 group_scales(int64_t m, int64_t g0, int64_t n) const {
    return e8m0_16(scales(m) + g0, n);
  }
};

// --- AMX tiles (CPUs with AMX-BF16: Sapphire Rapids and later) ---
// TDPBF16PS multiplies a tile of 16 weight rows x 32 bfloat16 (one chunk of the source's step, converted by
// tile_row) with a tile of activations, 16 pair rows x 16 columns of bfloat16 pairs, into 16 x 16 float32 sums, for
// the price of a few vdpbf16ps; the conversion of the codes is then the work. The scales differ per row and group
// (MXFP4: 32 columns, FP8: a K block), so the activation tile spreads them: column gl * Rp + t holds token t's pair
// where the pair row lies in group gl of the segment (S = 16 / Rp groups), zero elsewhere, and the sums of one group
// stay apart until a segment ends: then each row's 16 sums are scaled by its groups' scales and added up in float32
// (the same order for every row and token of a group size: a token's result does not depend on the other tokens'
// values). 2 to kAmxRows rows of a: Rp = 2 or 4 columns per group, from 5 rows on in token groups of 4, an
// accumulator tile each. (One row stays on the dot products: bf16_stream.)
#if defined(__linux__)
#define MOE_KERNELS_AMX_BF16 \
  __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,f16c,avx512vbmi,avx512bf16,amx-tile,amx-bf16")))

// Whether the AMX path runs: the CPU has AMX-TILE and AMX-BF16, the kernel grants this process the tile state
// (arch_prctl ARCH_REQ_XCOMP_PERM), and MOE_KERNELS_CPU_AMX is not 0 (read once).
bool amx_available() {
  static const bool available = [] {
    const char* env = std::getenv("MOE_KERNELS_CPU_AMX");
    if (env != nullptr && std::string(env) == "0") return false;
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
    if (!((d >> 22) & 1u) || !((d >> 24) & 1u)) return false;  // AMX-BF16, AMX-TILE
    constexpr long kReqXcompPerm = 0x1023, kXtiledata = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXtiledata) == 0;
  }();
  return available;
}

// Tile instructions on tile numbers given as template arguments (GCC's _tile_* macros take literal numbers, and its
// _tile_loadd does not tell the compiler that it reads memory: the stores of the chunk it loads could be moved past
// it). Rows of 64 bytes.
template <int T>
inline __attribute__((always_inline)) void tile_load(const void* base) {
  __asm__ volatile("tileloadd (%0,%1,1), %%tmm%c2" ::"r"(base), "r"(64L), "i"(T) : "memory");
}
template <int T>
inline __attribute__((always_inline)) void tile_store(void* base) {
  __asm__ volatile("tilestored %%tmm%c2, (%0,%1,1)" ::"r"(base), "r"(64L), "i"(T) : "memory");
}
template <int T>
inline __attribute__((always_inline)) void tile_zero() {
  __asm__ volatile("tilezero %%tmm%c0" ::"i"(T));
}
template <int C, int A, int B>  // C += A B (bfloat16 pairs, float32 sums)
inline __attribute__((always_inline)) void tile_dot() {
  __asm__ volatile("tdpbf16ps %%tmm%c2, %%tmm%c1, %%tmm%c0" ::"i"(C), "i"(A), "i"(B));
}

struct TileConfig {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// The activation tiles of amx_stream: for token group tg (tokens 4 tg ..), chunk c, pair row i: the 16 columns
// (bfloat16 pairs as uint32) of that pair row. a [rows, Kp] bfloat16 bits in the source's layout.
template <typename Rows>
MOE_KERNELS_AMX_BF16 inline __attribute__((always_inline)) void amx_activation_tiles(const Rows& src,
                                                                                     const uint16_t* a, int64_t rows,
                                                                                     int64_t Kp, int Rp,
                                                                                     int64_t seg_steps,
                                                                                     uint32_t* tiles) {
  const int64_t steps = Kp / Rows::kStep, chunks = steps * Rows::kChunks;
  const int groups = static_cast<int>((rows + 3) / 4);
  for (int tg = 0; tg < groups; ++tg) {
    const int64_t t0 = 4 * tg, nt = std::min<int64_t>(rows - t0, Rp);
    for (int64_t q = 0; q < steps; ++q) {
      const int64_t first = src.group(q / seg_steps * seg_steps, 0);
      for (int j = 0; j < Rows::kChunks; ++j) {
        const int64_t c = q * Rows::kChunks + j;
        uint32_t* tile = tiles + (tg * chunks + c) * 256;
        __m512i pairs[4];  // token t's 16 pairs of the chunk (lane i: pair row i)
        for (int64_t t = 0; t < nt; ++t) pairs[t] = _mm512_loadu_si512(a + (t0 + t) * Kp + 32 * c);
        for (int i = 0; i < 16; ++i) {
          const int64_t col = (src.group(q, i) - first) * Rp;
          const __m512i lane_i = _mm512_set1_epi32(i);
          __m512i v = _mm512_setzero_si512();
          for (int64_t t = 0; t < nt; ++t)
            v = _mm512_mask_permutexvar_epi32(v, static_cast<__mmask16>(1u << (col + t)), lane_i, pairs[t]);
          _mm512_store_si512(tile + 16 * i, v);
        }
      }
    }
  }
}

// The sums of the lanes of each token: v[r] the 16 sums of row r (lane gl * Rp + t: group gl, token t, Rp = 2 or
// 4), added over the groups by halves (the first levels of sum_halves_16); out[t][r] for t < Rp.
inline __attribute__((always_inline)) void amx_token_sums(const F32x16 (&v)[16], int Rp, float (&out)[4][16]) {
  F32x16 w8[8], w4[4], w2[2];
  for (int j = 0; j < 8; ++j) w8[j] = halves_8(v[2 * j], v[2 * j + 1]);
  for (int j = 0; j < 4; ++j) w4[j] = halves_4(w8[2 * j], w8[2 * j + 1]);
  if (Rp == 4) {  // w4[j] lane 4 s + t: row 4 j + s, token t
    for (int j = 0; j < 4; ++j)
      for (int s = 0; s < 4; ++s)
        for (int t = 0; t < 4; ++t) out[t][4 * j + s] = w4[j][4 * s + t];
    return;
  }
  for (int j = 0; j < 2; ++j) w2[j] = halves_2(w4[2 * j], w4[2 * j + 1]);
  // Rp = 2: w2[j] lane 2 s + t: row 8 j + s, token t
  for (int j = 0; j < 2; ++j)
    for (int s = 0; s < 8; ++s)
      for (int t = 0; t < 2; ++t) out[t][8 * j + s] = w2[j][2 * s + t];
}

// Weight chunk tile A (loaded from `chunk`) times the activation tiles of chunk c of NG token groups, added into
// accumulator tiles 0 .. NG - 1; the activation tiles alternate between B0 and B1.
template <int NG, int A, int B0, int B1>
MOE_KERNELS_AMX_BF16 inline __attribute__((always_inline)) void amx_chunk(const uint16_t* chunk, const uint32_t* tiles,
                                                                          int64_t chunks, int64_t c) {
  tile_load<A>(chunk);
  tile_load<B0>(tiles + c * 256);
  tile_dot<0, A, B0>();
  if constexpr (NG > 1) {
    tile_load<B1>(tiles + (chunks + c) * 256);
    tile_dot<1, A, B1>();
  }
  if constexpr (NG > 2) {
    tile_load<B0>(tiles + (2 * chunks + c) * 256);
    tile_dot<2, A, B0>();
  }
  if constexpr (NG > 3) {
    tile_load<B1>(tiles + (3 * chunks + c) * 256);
    tile_dot<3, A, B1>();
  }
}

// The products of a segment's steps q0 .. q1 of 16 weight rows (their codes converted into abuf a step at a time)
// with the activation tiles of NG token groups, into accumulator tiles 0 .. NG - 1. Chunks alternate between two
// sets of operand tiles (4, 6, 7 and 5, 7, 6), so that a load need not wait for the previous product to release
// its tile.
template <int NG, typename Rows>
MOE_KERNELS_AMX_BF16 inline __attribute__((always_inline)) void amx_segment(const Rows& src, int64_t mb, int count,
                                                                            int64_t q0, int64_t q1, int64_t chunks,
                                                                            const uint32_t* tiles, uint16_t* abuf) {
  for (int64_t q = q0; q < q1; ++q) {
    if (count == kTileRows) {
      #pragma GCC unroll 16
      for (int rr = 0; rr < kTileRows; ++rr) src.tile_row(mb + rr, q * Rows::kStep, abuf, rr);
    } else {
      for (int rr = 0; rr < count; ++rr) src.tile_row(mb + rr, q * Rows::kStep, abuf, rr);
    }
    #pragma GCC unroll 4
    for (int j = 0; j < Rows::kChunks; j += 2) {
      const int64_t c = q * Rows::kChunks + j;
      amx_chunk<NG, 4, 6, 7>(abuf + j * kTileRows * 32, tiles, chunks, c);
      amx_chunk<NG, 5, 7, 6>(abuf + (j + 1) * kTileRows * 32, tiles, chunks, c + 1);
    }
  }
}

// Accumulator tiles 0 .. NG - 1 zeroed, or stored into sums[0 .. NG).
template <int NG>
MOE_KERNELS_AMX_BF16 inline __attribute__((always_inline)) void amx_zero_sums() {
  tile_zero<0>();
  if constexpr (NG > 1) tile_zero<1>();
  if constexpr (NG > 2) tile_zero<2>();
  if constexpr (NG > 3) tile_zero<3>();
}
template <int NG>
MOE_KERNELS_AMX_BF16 inline __attribute__((always_inline)) void amx_store_sums(float (*sums)[kTileRows][16]) {
  tile_store<0>(sums[0]);
  if constexpr (NG > 1) tile_store<1>(sums[1]);
  if constexpr (NG > 2) tile_store<2>(sums[2]);
  if constexpr (NG > 3) tile_store<3>(sums[3]);
}

// out [rows, M] = a [rows, Kp] @ w^T (+ bias [M]) for 2 to kAmxRows rows of a (bfloat16 bits in the source's
// layout) on AMX tiles, in NG = ceil(rows / 4) token groups.
template <int NG, typename Rows>
MOE_KERNELS_AMX_BF16 void amx_stream(const uint16_t* a, int64_t rows, int64_t Kp, const Rows& src, int64_t M,
                                     const float* bias, float* out) {
  const int Rp = rows == 2 ? 2 : 4;
  const int S = 16 / Rp;  // groups a segment's sums keep apart
  const int64_t steps = Kp / Rows::kStep, chunks = steps * Rows::kChunks, seg_steps = src.segment_steps(S);
  thread_local std::vector<uint32_t> activations;
  activations.resize(NG * chunks * 256 + 16);
  uint32_t* tiles =
      reinterpret_cast<uint32_t*>((reinterpret_cast<uintptr_t>(activations.data()) + 63) & ~uintptr_t(63));
  amx_activation_tiles(src, a, rows, Kp, Rp, seg_steps, tiles);
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.rows[t] = 16;
    cfg.colsb[t] = 64;
  }
  _tile_loadconfig(&cfg);
  alignas(64) uint16_t abuf[Rows::kChunks * kTileRows * 32];
  alignas(64) float sums[NG][kTileRows][16];
  I32x16 spread;  // lane n: group n / Rp of the segment
  for (int n = 0; n < 16; ++n) spread[n] = n / Rp;
  const int64_t ngroups = src.groups();
  for (int64_t mb = 0; mb < M; mb += kTileRows) {
    const int count = static_cast<int>(std::min<int64_t>(kTileRows, M - mb));
    if (count < kTileRows) {  // rows past M: zero weights
      for (int j = 0; j < Rows::kChunks; ++j)
        std::memset(abuf + (j * kTileRows + count) * 32, 0, (kTileRows - count) * 64);
    }
    F32x16 acc[NG][kTileRows] = {};
    for (int64_t s0 = 0; s0 < steps; s0 += seg_steps) {
      amx_zero_sums<NG>();
      amx_segment<NG>(src, mb, count, s0, std::min(steps, s0 + seg_steps), chunks, tiles, abuf);
      amx_store_sums<NG>(sums);
      const int64_t g0 = src.group(s0, 0), n = std::min<int64_t>(S, ngroups - g0);
      for (int rr = 0; rr < count; ++rr) {
        const F32x16 sv = src.group_scales(mb + rr, g0, n);
        const F32x16 scale = __builtin_shuffle(sv, spread);
        #pragma GCC unroll 4
        for (int tg = 0; tg < NG; ++tg) {
          F32x16 v;
          std::memcpy(&v, sums[tg][rr], sizeof(v));
          acc[tg][rr] += v * scale;
        }
      }
    }
    for (int tg = 0; tg < NG; ++tg) {
      float res[4][16];
      amx_token_sums(acc[tg], Rp, res);
      for (int64_t t = 0; t < std::min<int64_t>(rows - 4 * tg, Rp); ++t) {
        float* o = out + (4 * tg + t) * M + mb;
        for (int rr = 0; rr < count; ++rr) o[rr] = res[t][rr] + (bias != nullptr ? bias[mb + rr] : 0.0f);
      }
    }
  }
  _tile_release();
}

// amx_stream with its token groups fixed at compile time.
template <typename Rows>
void amx_stream_rows(const uint16_t* a, int64_t rows, int64_t Kp, const Rows& src, int64_t M, const float* bias,
                     float* out) {
  switch ((rows + 3) / 4) {
    case 1: amx_stream<1>(a, rows, Kp, src, M, bias, out); break;
    case 2: amx_stream<2>(a, rows, Kp, src, M, bias, out); break;
    case 3: amx_stream<3>(a, rows, Kp, src, M, bias, out); break;
    default: amx_stream<4>(a, rows, Kp, src, M, bias, out); break;
  }
}
#endif

template <typename Rows>
inline __attribute__((always_inline)) void bf16_stream(const float* a, int64_t rows, const QMatrix& w,
                                                       const float* bias, float* out) {
  const int64_t Kp = (w.K + Rows::kStep - 1) / Rows::kStep * Rows::kStep;
  Rows src(w, Kp);
  const auto ap = rows_layout<Rows>(a, rows, w.K, Kp);
#if defined(__linux__)
  // one row a expert (most of them at a small decode batch) stays on the dot products: tile products wait for
  // their weight chunk's stores to reach the cache, and one token cannot make up for it (Xeon, MXFP4 K=512:
  // AMX 1.3x slower at one row, 1.6x faster at four)
  if (rows >= 2 && rows <= kAmxRows && amx_available()) {
    amx_stream_rows(ap.data(), rows, Kp, src, w.M, bias, out);
    return;
  }
#endif
  stream_rows_impl<64>(ap.data(), rows, Kp, src, w.M, bias, out);
}

// Rows [m0, m1) of an MXFP4 weight as bfloat16 into out [m1 - m0, K], in column order: a byte's two codes through
// vpermw of the e2m1 values' bfloat16 bits, scaled exactly by adding s - 127 to the exponent of the nonzero ones,
// interleaved back into columns. Rows with a scale outside [2, 252] (results subnormal, infinite or NaN: not a plain
// exponent add) are left to rest(m), the general dequantiser.
template <typename Rest>
MOE_KERNELS_AVX512_BF16 void mxfp4_rows_bf16(const QMatrix& w, int64_t m0, int64_t m1, uint16_t* out,
                                              const Rest& rest) {
  typedef short S16x32 __attribute__((vector_size(64)));
  typedef char C32 __attribute__((vector_size(32)));
  const int64_t K = w.K, nb = K / 32;
  S16x32 table, even_odd_lo, even_odd_hi;
  std::memcpy(&table, bf16_tables().e2m1, sizeof(table));
  for (int i = 0; i < 32; ++i) {  // column 2 i: code i of the even (low-nibble) words, 2 i + 1: of the odd
    even_odd_lo[i] = static_cast<short>(i % 2 == 0 ? i / 2 : 32 + i / 2);
    even_odd_hi[i] = static_cast<short>(i % 2 == 0 ? 16 + i / 2 : 48 + i / 2);
  }
  S16x32 lane;
  for (int i = 0; i < 32; ++i) lane[i] = static_cast<short>(i);
  for (int64_t m = m0; m < m1; ++m) {
    const uint8_t* s = w.mx_scale + m * nb;
    bool plain = true;
    for (int64_t b = 0; b < nb; ++b) plain &= s[b] >= 2 && s[b] <= 252;
    if (!plain) {
      rest(m);
      continue;
    }
    const uint8_t* p = w.data + m * (K / 2);
    uint16_t* o = out + (m - m0) * K;
    for (int64_t k = 0; k < K; k += 64) {  // 32 bytes, two scale blocks (one when K ends within the step)
      const bool whole = k + 64 <= K;
      C32 raw;
      if (whole) {
        std::memcpy(&raw, p + k / 2, sizeof(raw));
      } else {  // 16 bytes left (K is a multiple of 32)
        raw = C32{};
        std::memcpy(&raw, p + k / 2, 16);
      }
      const S16x32 words = __builtin_ia32_pmovzxbw512_mask(raw, S16x32{}, ~0u);
      const S16x32 lo = __builtin_ia32_permvarhi512_mask(table, words, S16x32{}, ~0u);
      const S16x32 hi = __builtin_ia32_permvarhi512_mask(table, words >> 4, S16x32{}, ~0u);
      const short e0 = static_cast<short>((s[k / 32] - 127) * 128);  // the exponent field's step, signed
      const short e1 = whole ? static_cast<short>((s[k / 32 + 1] - 127) * 128) : 0;
      const S16x32 add = lane < 16 ? S16x32{} + e0 : S16x32{} + e1;  // words 0-15: block k / 32
      const uint32_t lo_nonzero = __builtin_ia32_ptestmw512(lo, S16x32{} + 0x7fff, ~0u);
      const uint32_t hi_nonzero = __builtin_ia32_ptestmw512(hi, S16x32{} + 0x7fff, ~0u);
      const S16x32 lo_s = __builtin_ia32_paddw512_mask(lo, add, lo, lo_nonzero);
      const S16x32 hi_s = __builtin_ia32_paddw512_mask(hi, add, hi, hi_nonzero);
      const S16x32 first = __builtin_ia32_vpermt2varhi512_mask(even_odd_lo, lo_s, hi_s, ~0u);
      std::memcpy(o + k, &first, sizeof(first));
      if (whole) {
        const S16x32 second = __builtin_ia32_vpermt2varhi512_mask(even_odd_hi, lo_s, hi_s, ~0u);
        std::memcpy(o + k + 32, &second, sizeof(second));
      }
    }
  }
}

// out [rows, M] = a [rows, K] @ w^T (+ bias [M]) by bfloat16 dot products (a rounded to bfloat16).
MOE_KERNELS_AVX512_BF16 void stream_bf16_dot(const float* a, int64_t rows, const QMatrix& w, const float* bias,
                                             float* out) {
  if (w.format == Format::mxfp4) {
    bf16_stream<Bf16Mxfp4Rows>(a, rows, w, bias, out);
  } else {
    bf16_stream<Bf16Fp8Rows>(a, rows, w, bias, out);
  }
}
#endif

#if !MOE_KERNELS_X86 || !defined(__linux__)
bool amx_available() { return false; }
#endif

// Whether the bfloat16 dot products run here: the avx512 ISA level on a CPU with AVX512-BF16 and AVX512-VBMI.
bool bf16_dot_available() {
  static const bool available = [] {
#if MOE_KERNELS_X86
    __builtin_cpu_init();
    return cpu_isa() == CpuIsa::avx512 && __builtin_cpu_supports("avx512bf16") &&
           __builtin_cpu_supports("avx512vbmi");
#else
    return false;
#endif
  }();
  return available;
}

// (a, b) lanes interleaved: lo = a0 b0 a1 b1 ..., hi = the upper halves'.
template <typename V>
inline __attribute__((always_inline)) void zip_lanes(V a, V b, V& lo, V& hi) {
  constexpr int L = sizeof(V) / sizeof(a[0]);
  if constexpr (L == 16) {
    lo = __builtin_shufflevector(a, b, 0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    hi = __builtin_shufflevector(a, b, 8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
  } else if constexpr (L == 8) {
    lo = __builtin_shufflevector(a, b, 0, 8, 1, 9, 2, 10, 3, 11);
    hi = __builtin_shufflevector(a, b, 4, 12, 5, 13, 6, 14, 7, 15);
  } else {
    static_assert(L == 4);
    lo = __builtin_shufflevector(a, b, 0, 4, 1, 5);
    hi = __builtin_shufflevector(a, b, 2, 6, 3, 7);
  }
}

// The G vectors of a step of an interleaved layout (lane i of vector j: column G i + j) in column order: log2(G)
// rounds of zipping vector j with vector j + G / 2.
template <int G, typename V>
inline __attribute__((always_inline)) void to_column_order(V (&w)[G]) {
  for (int round = 1; round < G; round *= 2) {
    V out[G];
    for (int j = 0; j < G / 2; ++j) zip_lanes(w[j], w[j + G / 2], out[2 * j], out[2 * j + 1]);
    for (int j = 0; j < G; ++j) w[j] = out[j];
  }
}

// The first `count` lanes of v stored to p as out_t: acc_t itself, or float32 narrowed to bfloat16 (round to
// nearest even, NaN kept NaN, as c10::BFloat16 rounds).
template <typename out_t, typename V>
inline __attribute__((always_inline)) void store_as(out_t* p, V v, int64_t count) {
  using acc_t = std::remove_reference_t<decltype(v[0])>;
  constexpr int L = sizeof(V) / sizeof(acc_t);
  if constexpr (std::is_same_v<out_t, acc_t>) {
    if (count >= L) {
      std::memcpy(p, &v, sizeof(v));
    } else {
      std::memcpy(p, &v, count * sizeof(acc_t));
    }
  } else {
    static_assert(std::is_same_v<out_t, c10::BFloat16> && std::is_same_v<acc_t, float>);
    using U32 = typename VecN<uint32_t, L>::type;
    using U16 = typename VecN<uint16_t, L>::type;
    U32 bits;
    std::memcpy(&bits, &v, sizeof(bits));
    const U32 rounded = v != v ? U32{} + 0x7fc0u : bf16_rounded_bits(bits);
    const U16 h = __builtin_convertvector(rounded, U16);
    if (count >= L) {
      std::memcpy(p, &h, sizeof(h));
    } else {
      std::memcpy(p, &h, count * sizeof(out_t));
    }
  }
}

// The kernels as jobs on a row source (no lambdas here: a lambda's body that is not inlined is compiled for the
// baseline ISA, not for the ISA of the function it stands in). Kp: K rounded up to the source's steps.
// StreamJob: out [rows, M] = a [rows, K] @ w^T (+ bias [M]).
template <typename acc_t>
struct StreamJob {
  const acc_t* a;
  int64_t rows;
  const acc_t* bias;
  acc_t* out;
  template <int VB, typename Rows>
  inline __attribute__((always_inline)) void run(Rows& src, const QMatrix& w, int64_t Kp) const {
    const auto ap = rows_layout<Rows>(a, rows, w.K, Kp);
    stream_rows_impl<VB>(ap.data(), rows, Kp, src, w.M, bias, out);
  }
};

// FP8 by bits, streamed: per block of bn rows, the block's scales * 2^120 folded into a copy of a (one product per
// column of a's rows instead of one per weight), the weights read unscaled; where that copy is not finite (a
// product overflows, or a holds inf or NaN), the block reads scaled weights against a itself.
template <int VB>
inline __attribute__((always_inline)) void fp8_stream(const float* a, int64_t rows, const QMatrix& w,
                                                      const float* bias, float* out) {
  using Unscaled = Fp8BitRows<VB, false, false>;
  using Scaled = Fp8BitRows<VB, true, false>;
  const int64_t Kp = (w.K + Unscaled::kStep - 1) / Unscaled::kStep * Unscaled::kStep;
  const auto ap = rows_layout<Unscaled>(a, rows, w.K, Kp);
  std::vector<float> folded(rows * Kp);
  Unscaled unscaled(w, Kp);
  Scaled scaled(w, Kp);
  for (int64_t m0 = 0; m0 < w.M; m0 += w.bn) {
    const int64_t m1 = std::min(w.M, m0 + w.bn);
    scaled.row(m0);  // the block's scales in a's layout
    const float* cs = scaled.col_scale.data();
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t pos = 0; pos < Kp; ++pos) folded[r * Kp + pos] = ap[r * Kp + pos] * cs[pos];
    }
    uint32_t not_finite = 0;  // the exponent of inf and NaN
    const uint32_t* bits = reinterpret_cast<const uint32_t*>(folded.data());
    for (int64_t i = 0; i < rows * Kp; ++i) not_finite |= (bits[i] & 0x7f800000u) == 0x7f800000u;
    if (!not_finite) {
      stream_rows_impl<VB>(folded.data(), rows, Kp, unscaled, w.M, bias, out, m0, m1);
    } else {
      stream_rows_impl<VB>(ap.data(), rows, Kp, scaled, w.M, bias, out, m0, m1);
    }
  }
}

// DequantizeJob: out [m1 - m0, K] = rows [m0, m1) of w, dequantised, in out_t.
template <typename acc_t, typename out_t>
struct DequantizeJob {
  int64_t m0, m1;
  out_t* out;
  template <int VB, typename Rows>
  inline __attribute__((always_inline)) void run(Rows& src, const QMatrix& w, int64_t) const {
    constexpr int64_t n = Rows::n, S = Rows::kVectors, step = Rows::kStep;
    const int64_t K = w.K;
    for (int64_t m = m0; m < m1; ++m) {
      auto row = src.row(m);
      out_t* o = out + (m - m0) * K;
      for (int64_t k = 0; k < K; k += step) {
        Vec<acc_t, VB> v[S];
        row.template load<VB, acc_t>(k, v);
        if constexpr (Rows::kInterleave > 1) to_column_order<S>(v);
        for (int64_t j = 0; j < S && k + j * n < K; ++j) store_as(o + k + j * n, v[j], K - k - j * n);
      }
    }
  }
};

template <int VB, typename Rows, typename Job>
inline __attribute__((always_inline)) void run_on(const QMatrix& w, const Job& job) {
  const int64_t Kp = (w.K + Rows::kStep - 1) / Rows::kStep * Rows::kStep;
  Rows src(w, Kp);
  job.template run<VB>(src, w, Kp);
}

// job on the row source of w for acc_t at vector width VB: by bits in float32 (FP8 where exact), else by tables.
template <int VB, typename acc_t, typename Job>
inline __attribute__((always_inline)) void with_rows(const QMatrix& w, const Job& job) {
  if constexpr (std::is_same_v<acc_t, float>) {
    if (w.format == Format::mxfp4) return run_on<VB, Mxfp4BitRows<VB, false>>(w, job);
    if (fp8_bits_here(w)) return run_on<VB, Fp8BitRows<VB, true, true>>(w, job);
  } else {
    if (w.format == Format::mxfp4) return run_on<VB, Mxfp4TableRows<acc_t, VB>>(w, job);
  }
  run_on<VB, Fp8TableRows<acc_t, VB>>(w, job);
}

template <int VB, typename acc_t>
inline __attribute__((always_inline)) void stream_quantized_impl(const acc_t* a, int64_t rows, const QMatrix& w,
                                                                 const acc_t* bias, acc_t* out) {
  if constexpr (std::is_same_v<acc_t, float>) {
    if (w.format == Format::mxfp4) return run_on<VB, Mxfp4BitRows<VB, true>>(w, StreamJob<acc_t>{a, rows, bias, out});
    if (fp8_bits_here(w)) return fp8_stream<VB>(a, rows, w, bias, out);
  }
  with_rows<VB, acc_t>(w, StreamJob<acc_t>{a, rows, bias, out});
}

template <int VB, typename acc_t, typename out_t>
inline __attribute__((always_inline)) void dequantize_impl(const QMatrix& w, int64_t m0, int64_t m1, out_t* out) {
  with_rows<VB, acc_t>(w, DequantizeJob<acc_t, out_t>{m0, m1, out});
}

// stream_bf16_dot where w says so (float32 compute only): whether it ran.
template <typename acc_t>
bool stream_bf16_dot_if(const QMatrix& w, const acc_t* a, int64_t rows, const acc_t* bias, acc_t* out) {
#if MOE_KERNELS_X86
  if constexpr (std::is_same_v<acc_t, float>) {
    if (w.bf16_dot) {
      stream_bf16_dot(a, rows, w, bias, out);
      return true;
    }
  }
#endif
  return false;
}

// Per ISA level: 64-byte vectors in the AVX-512 build, 32 elsewhere.
// stream_quantized(a, rows, w, bias, out): out [rows, M] = a [rows, K] @ w^T (+ bias [M]).
#define MOE_KERNELS_STREAM_QUANTIZED(acc_t, name)                                                                   \
  static void name##_baseline(const acc_t* a, int64_t rows, const QMatrix& w, const acc_t* bias, acc_t* out) {    \
    stream_quantized_impl<32>(a, rows, w, bias, out);                                                             \
  }                                                                                                               \
  MOE_KERNELS_AVX2 static void name##_avx2(const acc_t* a, int64_t rows, const QMatrix& w, const acc_t* bias,     \
                                           acc_t* out) {                                                          \
    stream_quantized_impl<32>(a, rows, w, bias, out);                                                             \
  }                                                                                                               \
  MOE_KERNELS_AVX512 static void name##_avx512(const acc_t* a, int64_t rows, const QMatrix& w, const acc_t* bias, \
                                               acc_t* out) {                                                      \
    stream_quantized_impl<64>(a, rows, w, bias, out);                                                             \
  }                                                                                                               \
  void stream_quantized(const acc_t* a, int64_t rows, const QMatrix& w, const acc_t* bias, acc_t* out) {          \
    static const auto fn = pick_isa(&name##_baseline, &name##_avx2, &name##_avx512);                              \
    if (!stream_bf16_dot_if(w, a, rows, bias, out)) fn(a, rows, w, bias, out);                                    \
  }
MOE_KERNELS_STREAM_QUANTIZED(float, stream_quantized_f32)
MOE_KERNELS_STREAM_QUANTIZED(double, stream_quantized_f64)
#undef MOE_KERNELS_STREAM_QUANTIZED

// dequantize_into(w, m0, m1, out): out [m1 - m0, K] = rows [m0, m1) of w in out_t, decoded in acc_t.
// MXFP4 into bfloat16 by mxfp4_rows_bf16 where the bfloat16 dot products run (rows it leaves by the general
// dequantiser, fn): whether it ran.
template <typename out_t, typename Fn>
bool dequantize_bf16_if(const QMatrix& w, int64_t m0, int64_t m1, out_t* out, Fn fn) {
#if MOE_KERNELS_X86
  if constexpr (std::is_same_v<out_t, c10::BFloat16>) {
    if (w.format == Format::mxfp4 && bf16_dot_available()) {
      mxfp4_rows_bf16(w, m0, m1, reinterpret_cast<uint16_t*>(out),
                      [&](int64_t m) { fn(w, m, m + 1, out + (m - m0) * w.K); });
      return true;
    }
  }
#endif
  return false;
}

#define MOE_KERNELS_DEQUANTIZE(acc_t, out_t, name)                                                                  \
  static void name##_baseline(const QMatrix& w, int64_t m0, int64_t m1, out_t* out) {                             \
    dequantize_impl<32, acc_t>(w, m0, m1, out);                                                                   \
  }                                                                                                               \
  MOE_KERNELS_AVX2 static void name##_avx2(const QMatrix& w, int64_t m0, int64_t m1, out_t* out) {                \
    dequantize_impl<32, acc_t>(w, m0, m1, out);                                                                   \
  }                                                                                                               \
  MOE_KERNELS_AVX512 static void name##_avx512(const QMatrix& w, int64_t m0, int64_t m1, out_t* out) {            \
    dequantize_impl<64, acc_t>(w, m0, m1, out);                                                                   \
  }                                                                                                               \
  void dequantize_into(const QMatrix& w, int64_t m0, int64_t m1, out_t* out) {                                    \
    static const auto fn = pick_isa(&name##_baseline, &name##_avx2, &name##_avx512);                              \
    if (!dequantize_bf16_if(w, m0, m1, out, fn)) fn(w, m0, m1, out);                                             \
  }
MOE_KERNELS_DEQUANTIZE(float, float, dequantize_f32)
MOE_KERNELS_DEQUANTIZE(double, double, dequantize_f64)
MOE_KERNELS_DEQUANTIZE(float, c10::BFloat16, dequantize_bf16)
#undef MOE_KERNELS_DEQUANTIZE

// Rows [m0, m1) of w dequantised into out [m1 - m0, K] (the GEMM dtype), over the threads when not already in a
// parallel region.
void dequantize_rows(const QMatrix& w, int64_t m0, int64_t m1, const at::Tensor& out) {
  const int64_t grain = std::max<int64_t>(1, (int64_t(32) << 10) / std::max<int64_t>(1, w.K));
  const auto dtype = out.scalar_type();
  TORCH_INTERNAL_ASSERT(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16);
  at::parallel_for(m0, m1, grain, [&](int64_t r0, int64_t r1) {
    const int64_t at = (r0 - m0) * w.K;
    if (dtype == at::kFloat) dequantize_into(w, r0, r1, out.mutable_data_ptr<float>() + at);
    if (dtype == at::kDouble) dequantize_into(w, r0, r1, out.mutable_data_ptr<double>() + at);
    if (dtype == at::kBFloat16) dequantize_into(w, r0, r1, out.mutable_data_ptr<c10::BFloat16>() + at);
  });
}

struct QArgs {
  at::Tensor x, up_data, up_scale, down_data, down_scale, up_bias, down_bias;  // contiguous
  Format format;
  int64_t T, D, E, H2, H, O, bn, bk;
  Activation act;
  bool gated;
  bool fp8_bits;  // see QMatrix
  bool bf16_dot;
};

// Checks the quantized weights: data and scale of gate_up [E, H2, D] and down [E, O, H] in the format's layout.
void check_quantized(const char* name, Format format, const at::Tensor& data, const at::Tensor& scale, int64_t E,
                     int64_t N, int64_t K, int64_t bn, int64_t bk) {
  const char* op = "moe_mlp_quantized";
  if (format == Format::fp8) {
    TORCH_CHECK(data.scalar_type() == at::kFloat8_e4m3fn && data.sizes() == at::IntArrayRef({E, N, K}), op, ": ",
                name, " data must be float8_e4m3fn [", E, ", ", N, ", ", K, "], got ", data.sizes(), " ",
                data.scalar_type());
    const int64_t sn = (N + bn - 1) / bn, sk = (K + bk - 1) / bk;
    TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.sizes() == at::IntArrayRef({E, sn, sk}), op, ": ", name,
                " scale must be float32 [E, ceil(N / ", bn, "), ceil(K / ", bk, ")] = [", E, ", ", sn, ", ", sk,
                "], got ", scale.sizes(), " ", scale.scalar_type());
  } else {
    TORCH_CHECK(K % 32 == 0, op, ": ", name, ": mxfp4 needs K a multiple of 32, got K = ", K);
    TORCH_CHECK(data.scalar_type() == at::kByte && data.sizes() == at::IntArrayRef({E, N, K / 2}), op, ": ", name,
                " data must be uint8 [", E, ", ", N, ", ", K / 2, "], got ", data.sizes(), " ", data.scalar_type());
    TORCH_CHECK(scale.scalar_type() == at::kByte && scale.sizes() == at::IntArrayRef({E, N, K / 32}), op, ": ",
                name, " scale must be uint8 (e8m0) [", E, ", ", N, ", ", K / 32, "], got ", scale.sizes(), " ",
                scale.scalar_type());
  }
}

QArgs quantized_args(const at::Tensor& x, c10::string_view format, const at::Tensor& up_data,
                     const at::Tensor& up_scale_in, const at::Tensor& down_data, const at::Tensor& down_scale_in,
                     int64_t block_n, int64_t block_k, const std::optional<at::Tensor>& gate_up_bias,
                     const std::optional<at::Tensor>& down_bias, c10::string_view activation, bool gated) {
  const char* op = "moe_mlp_quantized";
  const std::string fmt(format);
  TORCH_CHECK(fmt == "fp8" || fmt == "mxfp4", op, ": format must be 'fp8' or 'mxfp4', got '", fmt, "'");
  const Format f = fmt == "fp8" ? Format::fp8 : Format::mxfp4;
  TORCH_CHECK(x.dim() == 2 && at::isFloatingType(x.scalar_type()), op, ": x must be a floating [T, D] tensor, got ",
              x.sizes(), " ", x.scalar_type());
  TORCH_CHECK(up_data.dim() == 3 && down_data.dim() == 3, op, ": the data of gate_up_proj and down_proj must be 3-d, "
              "got ", up_data.sizes(), " and ", down_data.sizes());
  TORCH_CHECK(f == Format::mxfp4 || (block_n >= 1 && block_k >= 1), op, ": block_n and block_k must be >= 1, got ",
              block_n, " and ", block_k);
  // e8m0 scales may come as float8_e8m0fnu: the same bytes
  const auto as_bytes = [](const at::Tensor& s) {
    return s.scalar_type() == at::kFloat8_e8m0fnu ? s.view(at::kByte) : s;
  };
  const auto up_scale = f == Format::mxfp4 ? as_bytes(up_scale_in) : up_scale_in;
  const auto down_scale = f == Format::mxfp4 ? as_bytes(down_scale_in) : down_scale_in;
  const int64_t per_byte = f == Format::mxfp4 ? 2 : 1;
  const int64_t E = up_data.size(0), H2 = up_data.size(1), D = up_data.size(2) * per_byte;
  const int64_t H = gated ? H2 / 2 : H2, O = down_data.size(1);
  TORCH_CHECK(!gated || H2 % 2 == 0, op, ": gated experts need an even gate_up width 2H, got ", H2);
  TORCH_CHECK(x.size(1) == D, op, ": x must be [T, D = ", D, "], got ", x.sizes());
  check_quantized("gate_up_proj", f, up_data, up_scale, E, H2, D, block_n, block_k);
  check_quantized("down_proj", f, down_data, down_scale, E, O, H, block_n, block_k);
  QArgs q{x.contiguous(), up_data.contiguous(), up_scale.contiguous(), down_data.contiguous(),
          down_scale.contiguous(), bias_arg(op, "gate_up_bias", gate_up_bias, E, H2, x.scalar_type()),
          bias_arg(op, "down_bias", down_bias, E, O, x.scalar_type()), f, x.size(0), D, E, H2, H, O, block_n,
          block_k, parse_activation(activation, gated, op), gated, false, false};
  if (f == Format::fp8) {
    // fp8_lanes times scale * 2^120: exact when denormals are read and every finite scale is below 2^8
    const auto below = [](const at::Tensor& s) {
      const float* p = s.const_data_ptr<float>();
      for (int64_t i = 0; i < s.numel(); ++i) {
        if (std::isfinite(p[i]) && std::abs(p[i]) >= 256.0f) return false;
      }
      return true;
    };
    q.fp8_bits = below(q.up_scale) && below(q.down_scale);
  }
  // bfloat16 x: its rows are exact in bfloat16, and the activations between the projections are rounded as
  // bfloat16 compute rounds them; FP8 K blocks of whole steps (one scale a step)
  q.bf16_dot = x.scalar_type() == at::kBFloat16 && bf16_dot_available() && (f == Format::mxfp4 || block_k % 64 == 0);
  return q;
}

QMatrix expert_matrix(const QArgs& q, const at::Tensor& data, const at::Tensor& scale, int64_t e, int64_t M,
                      int64_t K) {
  QMatrix w{q.format, nullptr, nullptr, nullptr, M, K, q.bn, q.bk, q.fp8_bits, q.bf16_dot};
  if (q.format == Format::fp8) {
    w.data = reinterpret_cast<const uint8_t*>(data.const_data_ptr()) + e * M * K;
    w.fp8_scale = scale.const_data_ptr<float>() + e * scale.size(1) * scale.size(2);
  } else {
    w.data = data.const_data_ptr<uint8_t>() + e * M * (K / 2);
    w.mx_scale = scale.const_data_ptr<uint8_t>() + e * M * (K / 32);
  }
  return w;
}

// out = a @ w^T + bias with w dequantised in chunks of rows into the kept slot `slot` (a, out, bias: the GEMM dtype).
void dequantized_gemm(const at::Tensor& out, const at::Tensor& a, const QMatrix& w, const at::Tensor& bias,
                      Kept slot) {
  const auto gt = a.scalar_type();
  const int64_t row_bytes = w.K * static_cast<int64_t>(c10::elementSize(gt));
  const int64_t chunk = std::max<int64_t>(1, kKeptSlotBytes / std::max<int64_t>(1, row_bytes));
  for (int64_t m0 = 0; m0 < w.M; m0 += chunk) {
    const int64_t m1 = std::min(w.M, m0 + chunk);
    const auto wc = kept_empty(slot, {m1 - m0, w.K}, gt);
    dequantize_rows(w, m0, m1, wc);
    const bool whole = m0 == 0 && m1 == w.M;
    gemm_bias_out(whole ? out : out.narrow(1, m0, m1 - m0), a, wc,
                  bias.defined() ? (whole ? bias : bias.narrow(0, m0, m1 - m0)) : bias);
  }
}

at::Tensor moe_mlp_quantized(const at::Tensor& x_in, const at::Tensor& experts, const at::Tensor& weights,
                             c10::string_view format, const at::Tensor& up_data, const at::Tensor& up_scale,
                             const at::Tensor& down_data, const at::Tensor& down_scale, int64_t block_n,
                             int64_t block_k, const std::optional<at::Tensor>& gate_up_bias,
                             const std::optional<at::Tensor>& down_bias, c10::string_view activation, bool gated,
                             int64_t capacity) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  check_experts("moe_mlp_quantized", experts);
  const QArgs q = quantized_args(x_in, format, up_data, up_scale, down_data, down_scale, block_n, block_k,
                                 gate_up_bias, down_bias, activation, gated);
  // groups up to this many rows stream the weights (on AMX tiles more rows a pass than the dot products take)
  const int64_t stream_rows = q.bf16_dot && amx_available() ? kAmxRows : kStreamRows;
  auto r = routed_forward("moe_mlp_quantized", q.x, experts, weights, q.E, q.O, capacity,
                          [&](int64_t e, int64_t lo, int64_t hi, const at::Tensor& token, const at::Tensor& y) {
    const QMatrix w_up = expert_matrix(q, q.up_data, q.up_scale, e, q.H2, q.D);
    const QMatrix w_down = expert_matrix(q, q.down_data, q.down_scale, e, q.O, q.H);
    if (hi - lo <= stream_rows) {
      few_rows_expert(q.x, y, token, e, lo, hi, q.H2, q.O, q.up_bias, q.down_bias, q.act, q.gated,
                      [&](auto, int which, const auto* a, int64_t rows, const auto* bias, auto* out) {
                        stream_quantized(a, rows, which == 0 ? w_up : w_down, bias, out);
                      });
      return;
    }
    expert_rows_forward(
        gather_rows(q.x, token.slice(0, lo, hi)), q.H2,
        [&](const at::Tensor& a, const at::Tensor& out) {
          dequantized_gemm(out, a, w_up, bias_row(q.up_bias, e), Kept::weight_a);
        },
        [&](const at::Tensor& a, const at::Tensor& out) {
          dequantized_gemm(out, a, w_down, bias_row(q.down_bias, e), Kept::weight_b);
        },
        q.act, q.gated, y.slice(0, lo, hi));
  }, stream_rows);
  return r.out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(moe_kernels_C, m) {
  m.def("cpu_amx() -> bool", []() { return bf16_dot_available() && amx_available(); });
  m.def("moe_mlp_quantized(Tensor x, Tensor experts, Tensor weights, str format, Tensor up_data, Tensor up_scale, "
        "Tensor down_data, Tensor down_scale, int block_n, int block_k, Tensor? gate_up_bias, Tensor? down_bias, "
        "str activation, bool gated, int capacity) -> Tensor");
}

TORCH_LIBRARY_IMPL(moe_kernels_C, CPU, m) { m.impl("moe_mlp_quantized", &moe_mlp_quantized); }

}  // namespace moe_kernels
