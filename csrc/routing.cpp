// Fused top-k routing on CPU (the native backend of moe_kernels::topk_route and its backward).
//
// One pass per token: scores (softmax or sigmoid), correction bias, group-limited choice, top-k, renormalise,
// scale, and the statistics of the auxiliary losses (counts, prob_sum, lse). Tokens run in parallel in
// fixed-size chunks; prob_sum is reduced from per-chunk partial sums in chunk order, so the result does not
// depend on the thread count.
//
// The arithmetic runs in float64 for every logits dtype; the choice compares the scores rounded to the compute
// dtype (float32 below float64, as the reference takes them), with the bias added in that dtype. Ranking is
// torch.sort's, descending and stable: NaN ranks above every number, ties go to the lower index. A NaN logit
// makes its token's softmax NaN (all of its weights), and only that token's.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "grouped_gemm.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace moe_kernels {
namespace {

constexpr double kEps = 1e-20;       // the reference's guard in the renormalisation
constexpr int64_t kChunk = 128;      // tokens per chunk of the parallel loop (fixed: the sums do not depend on it)

// A value met later in the scan ranks before b, met earlier: torch.sort's order, descending and stable (NaN above
// every number, ties to the lower index).
template <typename T>
inline bool later_ranks_before(T a, T b) {
  return std::isnan(a) ? !std::isnan(b) : a > b;  // a > b is false when b is NaN
}

// top[0..k) = offset + the indices of the k values of v[0..n) that rank first, in rank order (k <= n). One scan
// keeping the k best sorted: a value that does not beat the k-th costs one comparison.
template <typename T>
void top_k(const T* v, int64_t n, int64_t k, int64_t offset, int64_t* top) {
  int64_t filled = 0;
  for (int64_t i = 0; i < n; ++i) {
    const T x = v[i];
    if (filled == k && !later_ranks_before(x, v[top[k - 1] - offset])) continue;
    int64_t j = filled < k ? filled++ : k - 1;
    for (; j > 0 && later_ranks_before(x, v[top[j - 1] - offset]); --j) top[j] = top[j - 1];
    top[j] = offset + i;
  }
}

// s[e] = sigmoid(z[e]) over a row, from exp(-|z|): 1 / (1 + exp(-z)) for z >= 0, exp(z) * (1 / (1 + exp(z)))
// below (neither overflows).
template <typename in_t>
void sigmoid_row(const in_t* z, int64_t E, double* s) {
  for (int64_t e = 0; e < E; ++e) s[e] = -std::abs(static_cast<double>(z[e]));
  exp_into(s, E, s);
  for (int64_t e = 0; e < E; ++e) {
    const double r = 1.0 / (1.0 + s[e]);
    s[e] = static_cast<double>(z[e]) >= 0 ? r : s[e] * r;
  }
}

// Softmax statistics of one row of logits: max m (NaN when the row has a NaN), exp(z - m) into `ex`, their sum.
struct Softmax {
  double m, sum;
};

template <typename in_t>
Softmax softmax_row(const in_t* z, int64_t E, double* ex) {
  double m = -std::numeric_limits<double>::infinity();
  bool nan = false;
  for (int64_t e = 0; e < E; ++e) {
    const double v = static_cast<double>(z[e]);
    nan = nan || std::isnan(v);
    m = v > m ? v : m;
  }
  if (nan) m = std::numeric_limits<double>::quiet_NaN();
  for (int64_t e = 0; e < E; ++e) ex[e] = static_cast<double>(z[e]) - m;
  exp_into(ex, E, ex);
  double sum = 0;
  for (int64_t e = 0; e < E; ++e) sum += ex[e];
  return {m, sum};
}

// torch.logsumexp: an infinite max is replaced by 0 before the exponentials.
template <typename in_t>
double logsumexp_row(const in_t* z, int64_t E, const Softmax& st) {
  if (std::isfinite(st.m)) return std::log(st.sum) + st.m;
  double sum = 0;
  for (int64_t e = 0; e < E; ++e) sum += std::exp(static_cast<double>(z[e]));
  return std::log(sum);
}

struct RouteArgs {
  int64_t E, k, groups, topk_groups;
  bool sigmoid, renormalize;
  double scale;
};

// Routes one token. out_t: the dtype of the scores the choice compares (float or double).
template <typename in_t, typename out_t>
struct TokenRouter {
  const RouteArgs& a;
  const out_t* bias;  // [E] in out_t, or nullptr
  std::vector<double> ex, s;
  std::vector<out_t> choice, group_score;
  std::vector<int64_t> idx, gidx;  // the chosen experts [k], the best groups [topk_groups]
  std::vector<char> keep;            // [groups]: one of the best groups

  TokenRouter(const RouteArgs& args, const out_t* b)
      : a(args), bias(b), ex(args.E), s(args.E), choice(args.E), group_score(std::max<int64_t>(args.groups, 1)),
        idx(args.k), gidx(std::max<int64_t>(args.topk_groups, 1)), keep(std::max<int64_t>(args.groups, 1)) {}

  // z [E] -> weights [k], experts [k], lse; adds the token's load-balancing distribution to prob_acc [E].
  void route(const in_t* z, out_t* weights, int64_t* experts, out_t* lse, double* prob_acc) {
    const int64_t E = a.E, k = a.k;
    const Softmax st = softmax_row(z, E, ex.data());
    *lse = static_cast<out_t>(logsumexp_row(z, E, st));
    if (a.sigmoid) {
      double total = 0;
      sigmoid_row(z, E, s.data());
      for (int64_t e = 0; e < E; ++e) total += s[e];
      const double inv = 1.0 / (total + kEps);
      for (int64_t e = 0; e < E; ++e) prob_acc[e] += s[e] * inv;
    } else {
      const double inv = 1.0 / st.sum;
      for (int64_t e = 0; e < E; ++e) prob_acc[e] += (s[e] = ex[e] * inv);
    }
    for (int64_t e = 0; e < E; ++e) {
      choice[e] = static_cast<out_t>(s[e]);
      if (bias != nullptr) choice[e] = choice[e] + bias[e];
    }
    if (a.groups > 1) restrict_to_top_groups();
    top_k(choice.data(), E, k, 0, idx.data());
    double total = 0;
    for (int64_t j = 0; j < k; ++j) total += s[idx[j]];
    const double denom = a.renormalize ? total + kEps : 1.0;
    for (int64_t j = 0; j < k; ++j) {
      experts[j] = idx[j];
      weights[j] = static_cast<out_t>(s[idx[j]] / denom * a.scale);
    }
  }

  // Group score: the sum of the group's top-2 choice values; experts outside the topk_groups best groups get
  // -inf (as the reference's masked_fill does).
  void restrict_to_top_groups() {
    const int64_t size = a.E / a.groups;
    for (int64_t g = 0; g < a.groups; ++g) {
      int64_t first[2];
      const int64_t top = std::min<int64_t>(2, size);
      top_k(choice.data() + g * size, size, top, g * size, first);
      group_score[g] = top == 2 ? static_cast<out_t>(choice[first[0]] + choice[first[1]]) : choice[first[0]];
    }
    top_k(group_score.data(), a.groups, a.topk_groups, 0, gidx.data());
    std::fill(keep.begin(), keep.end(), 0);
    for (int64_t i = 0; i < a.topk_groups; ++i) keep[gidx[i]] = 1;
    for (int64_t g = 0; g < a.groups; ++g) {
      if (!keep[g]) std::fill_n(choice.begin() + g * size, size, -std::numeric_limits<out_t>::infinity());
    }
  }
};

template <typename in_t, typename out_t>
void route_all(const in_t* logits, int64_t T, const RouteArgs& a, const out_t* bias, out_t* weights,
               int64_t* experts, out_t* lse, int32_t* counts, out_t* prob_sum) {
  const int64_t E = a.E, k = a.k;
  const int64_t chunks = (T + kChunk - 1) / kChunk;
  std::vector<double> partial(chunks * E, 0.0);
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    TokenRouter<in_t, out_t> router(a, bias);
    for (int64_t c = c0; c < c1; ++c) {
      for (int64_t t = c * kChunk; t < std::min(T, (c + 1) * kChunk); ++t) {
        router.route(logits + t * E, weights + t * k, experts + t * k, lse + t, partial.data() + c * E);
      }
    }
  });
  for (int64_t e = 0; e < E; ++e) {
    double sum = 0;
    for (int64_t c = 0; c < chunks; ++c) sum += partial[c * E + e];
    prob_sum[e] = static_cast<out_t>(sum);
    counts[e] = 0;
  }
  for (int64_t i = 0; i < T * k; ++i) ++counts[experts[i]];
}

RouteArgs route_args(const char* op, const at::Tensor& logits, int64_t k, c10::string_view score,
                     bool renormalize, int64_t num_groups, int64_t topk_groups, double scale) {
  TORCH_CHECK(logits.dim() == 2 && at::isFloatingType(logits.scalar_type()), op,
              ": logits must be a floating [T, E] tensor, got ", logits.sizes(), " ", logits.scalar_type());
  TORCH_CHECK(score == "softmax" || score == "sigmoid", op, ": score must be 'softmax' or 'sigmoid', got '",
              std::string(score), "'");
  const int64_t E = logits.size(1);
  TORCH_CHECK(k >= 1 && k <= E, op, ": k must be in [1, E = ", E, "], got ", k);
  TORCH_CHECK(logits.size(0) * k < (int64_t(1) << 31), op, ": logits ", logits.sizes(), " with k = ", k,
              " give T*k = ", logits.size(0) * k, " (token, slot) pairs, which overflow the int32 indices");
  RouteArgs a{E, k, num_groups > 1 ? num_groups : 0, num_groups > 1 ? topk_groups : 0, score == "sigmoid",
              renormalize, scale};
  if (a.groups > 1) {
    TORCH_CHECK(E % a.groups == 0, op, ": num_groups = ", a.groups, " must divide E = ", E);
    TORCH_CHECK(a.topk_groups >= 1 && a.topk_groups <= a.groups, op, ": topk_groups must be in [1, num_groups = ",
                a.groups, "], got ", a.topk_groups);
    TORCH_CHECK(k <= a.topk_groups * (E / a.groups), op, ": k = ", k, " exceeds the ", a.topk_groups * (E / a.groups),
                " experts of topk_groups = ", a.topk_groups, " groups");
  }
  return a;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> topk_route(
    const at::Tensor& logits_in, int64_t k, c10::string_view score, bool renormalize,
    const std::optional<at::Tensor>& bias_in, int64_t num_groups, int64_t topk_groups, double scale) {
  const RouteArgs a = route_args("topk_route", logits_in, k, score, renormalize, num_groups, topk_groups, scale);
  const auto logits = logits_in.contiguous();
  const int64_t T = logits.size(0), E = a.E;
  const auto f = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor bias;
  if (bias_in.has_value()) {
    TORCH_CHECK(bias_in->dim() == 1 && bias_in->size(0) == E, "topk_route: bias must be [E = ", E, "], got ",
                bias_in->sizes());
    bias = bias_in->to(f).contiguous();
  }
  auto opts = logits.options();
  auto weights = new_empty({T, k}, opts.dtype(f));
  auto experts = new_empty({T, k}, opts.dtype(at::kLong));
  auto counts = new_empty({E}, opts.dtype(at::kInt));
  auto prob_sum = new_empty({E}, opts.dtype(f));
  auto lse = new_empty({T}, opts.dtype(f));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "topk_route", [&] {
    if (f == at::kDouble) {
      route_all<scalar_t, double>(logits.const_data_ptr<scalar_t>(), T, a,
                                  bias.defined() ? bias.const_data_ptr<double>() : nullptr,
                                  weights.mutable_data_ptr<double>(), experts.mutable_data_ptr<int64_t>(),
                                  lse.mutable_data_ptr<double>(), counts.mutable_data_ptr<int32_t>(),
                                  prob_sum.mutable_data_ptr<double>());
    } else {
      route_all<scalar_t, float>(logits.const_data_ptr<scalar_t>(), T, a,
                                 bias.defined() ? bias.const_data_ptr<float>() : nullptr,
                                 weights.mutable_data_ptr<float>(), experts.mutable_data_ptr<int64_t>(),
                                 lse.mutable_data_ptr<float>(), counts.mutable_data_ptr<int32_t>(),
                                 prob_sum.mutable_data_ptr<float>());
    }
  });
  return {weights, experts, counts, prob_sum, lse};
}

// Gradient w.r.t. the logits of one token, in float64 (the reference's formulas):
//   weights: w_j = scale * p_j / (sum_j p_j + eps) with p_j = s[e_j] (renormalised) or scale * p_j;
//   prob_sum: s (softmax) or s / (sum s + eps) (sigmoid);   lse: softmax(z).
template <typename in_t>
void route_backward_all(const double* gw, const double* gp, const double* gl, const in_t* logits,
                        const int64_t* experts, int64_t T, int64_t E, int64_t k, bool sig, bool renormalize,
                        double scale, in_t* grad) {
  // sigmoid scores with a gradient from the weights alone: only the k chosen experts get one (each sigmoid is its
  // own), so a token needs k sigmoids, not E. (A NaN logit is always chosen, top-k ranking NaN first: the full
  // path's 0 * NaN never arises outside the chosen.)
  const bool chosen_only = sig && gw != nullptr && gp == nullptr && gl == nullptr;
  at::parallel_for(0, T, std::max<int64_t>(1, 4096 / std::max<int64_t>(E, 1)), [&](int64_t t0, int64_t t1) {
    std::vector<double> ex(E), s(E), gs(E), g(k), sk(k);  // sk: the chosen experts' scores
    std::vector<in_t> zk(k);
    const bool softmax = !sig || gl != nullptr;  // sigmoid scores need the softmax only for lse's gradient
    for (int64_t t = t0; t < t1; ++t) {
      const in_t* z = logits + t * E;
      const int64_t* ids = experts + t * k;
      if (gw != nullptr) {
        for (int64_t j = 0; j < k; ++j) {
          TORCH_CHECK(ids[j] >= 0 && ids[j] < E, "topk_route_backward: experts[", t, ", ", j, "] = ", ids[j],
                      " is outside [0, E = ", E, ")");
        }
      }
      Softmax st{0, 0};
      if (chosen_only) {
        for (int64_t j = 0; j < k; ++j) zk[j] = z[ids[j]];
        sigmoid_row(zk.data(), k, sk.data());
      } else {
        if (softmax) st = softmax_row(z, E, ex.data());
        if (sig) {
          sigmoid_row(z, E, s.data());
        } else {
          const double inv = 1.0 / st.sum;
          for (int64_t e = 0; e < E; ++e) s[e] = ex[e] * inv;
        }
        if (gw != nullptr) {
          for (int64_t j = 0; j < k; ++j) sk[j] = s[ids[j]];
        }
      }
      std::fill(gs.begin(), gs.end(), 0.0);
      if (gw != nullptr) {
        double total = 0, dot = 0;
        for (int64_t j = 0; j < k; ++j) {
          g[j] = gw[t * k + j] * scale;
          total += sk[j];
          dot += g[j] * sk[j];
        }
        const double Z = total + kEps;
        for (int64_t j = 0; j < k; ++j) gs[ids[j]] += renormalize ? g[j] / Z - dot / (Z * Z) : g[j];
      }
      in_t* out = grad + t * E;
      if (chosen_only) {
        std::fill(out, out + E, in_t(0));
        for (int64_t j = 0; j < k; ++j) out[ids[j]] = static_cast<in_t>(gs[ids[j]] * sk[j] * (1 - sk[j]));
        continue;
      }
      if (gp != nullptr) {
        if (sig) {
          double total = 0, dot = 0;
          for (int64_t e = 0; e < E; ++e) {
            total += s[e];
            dot += gp[e] * s[e];
          }
          const double Z = total + kEps;
          const double inv = 1.0 / Z, shift = dot / (Z * Z);
          for (int64_t e = 0; e < E; ++e) gs[e] += gp[e] * inv - shift;
        } else {
          for (int64_t e = 0; e < E; ++e) gs[e] += gp[e];
        }
      }
      double dot = 0;
      if (!sig) {
        for (int64_t e = 0; e < E; ++e) dot += gs[e] * s[e];
      }
      for (int64_t e = 0; e < E; ++e) {
        double gz = sig ? gs[e] * s[e] * (1 - s[e]) : s[e] * (gs[e] - dot);
        if (gl != nullptr) gz += gl[t] * (ex[e] / st.sum);
        out[e] = static_cast<in_t>(gz);
      }
    }
  });
}

at::Tensor topk_route_backward(const std::optional<at::Tensor>& grad_weights,
                               const std::optional<at::Tensor>& grad_prob_sum,
                               const std::optional<at::Tensor>& grad_lse, const at::Tensor& logits_in,
                               const at::Tensor& experts_in, c10::string_view score, bool renormalize, double scale) {
  TORCH_CHECK(logits_in.dim() == 2 && at::isFloatingType(logits_in.scalar_type()),
              "topk_route_backward: logits must be a floating [T, E] tensor, got ", logits_in.sizes(), " ",
              logits_in.scalar_type());
  TORCH_CHECK(score == "softmax" || score == "sigmoid",
              "topk_route_backward: score must be 'softmax' or 'sigmoid', got '", std::string(score), "'");
  const auto logits = logits_in.contiguous();
  const int64_t T = logits.size(0), E = logits.size(1);
  TORCH_CHECK(experts_in.dim() == 2 && experts_in.size(0) == T, "topk_route_backward: experts must be [T = ", T,
              ", k], got ", experts_in.sizes());
  const int64_t k = experts_in.size(1);
  const auto experts = experts_in.to(at::kLong).contiguous();
  auto as_double = [](const std::optional<at::Tensor>& t, at::IntArrayRef shape, const char* name) {
    if (!t.has_value()) return at::Tensor();
    TORCH_CHECK(t->sizes() == shape, "topk_route_backward: ", name, " must be ", shape, ", got ", t->sizes());
    return t->to(at::kDouble).contiguous();
  };
  const auto gw = as_double(grad_weights, {T, k}, "grad_weights");
  const auto gp = as_double(grad_prob_sum, {E}, "grad_prob_sum");
  const auto gl = as_double(grad_lse, {T}, "grad_lse");
  auto grad = new_empty_like(logits);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "topk_route_backward", [&] {
    route_backward_all<scalar_t>(gw.defined() ? gw.const_data_ptr<double>() : nullptr,
                                 gp.defined() ? gp.const_data_ptr<double>() : nullptr,
                                 gl.defined() ? gl.const_data_ptr<double>() : nullptr,
                                 logits.const_data_ptr<scalar_t>(), experts.const_data_ptr<int64_t>(), T, E, k,
                                 score == "sigmoid", renormalize, scale, grad.mutable_data_ptr<scalar_t>());
  });
  return grad;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(moe_kernels_C, m) {
  m.def("topk_route(Tensor logits, int k, str score, bool renormalize, Tensor? bias, int num_groups, "
        "int topk_groups, float scale) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("topk_route_backward(Tensor? grad_weights, Tensor? grad_prob_sum, Tensor? grad_lse, Tensor logits, "
        "Tensor experts, str score, bool renormalize, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(moe_kernels_C, CPU, m) {
  m.impl("topk_route", &topk_route);
  m.impl("topk_route_backward", &topk_route_backward);
}

}  // namespace moe_kernels
