// Soft-MoE slot dispatch and combine on CPU, without the [B, N, S] logits: the logits are made chunk by chunk.
//
// logits[b, n, s] = x[b, n] . phi[b, s]  (phi [S, D] is shared by the batch, or [B, S, D]); a masked token
// (mask False) or slot (slot_mask False) gets the logit -finfo(dtype).max, as in moe_kernels.reference.soft_moe.
//   dispatch: slots[b, s] = sum_n softmax_n(logits[b, :, s])[n] x[b, n]           -> [B, S, D]
//   combine:  out[b, n]   = sum_s softmax_s(logits[b, n, :])[s] y[b, s]           -> [B, N, Dy]
//
// A chunk is Bb batch rows by C tokens, at most `chunk` logits (Bb * C * S; at least one token of one row): whole
// rows of several batch elements when they fit, else C tokens of one row. Combine's softmax runs over slots, so a
// chunk is complete in itself. Dispatch's softmax runs over tokens: over a row's chunks it keeps a running per-slot
// maximum and sum and rescales its accumulator when the maximum grows (flash attention's online softmax). Its
// backward first makes the per-slot maximum, sum and delta[s] = sum_n p[n, s] dp[n, s] that way, then the
// gradients in a second pass that recomputes the chunk's logits (rows that are one chunk: one pass).
//
// Parallelism: the chunks run in up to kLanes lanes (whole rows per lane, or a row's chunks split among lanes,
// whose partial softmax states and gradient sums are merged in lane order), in parallel on ATen's threads when
// there are enough of them (see for_lanes). The split depends on the sizes alone, not the thread count: runs are
// deterministic. A problem of one chunk runs on the calling thread with ATen's own threading. The GEMMs are
// ATen's (MKL / oneDNN). 16-bit inputs are computed in float32, float64 stays float64.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <torch/library.h>

#include "buffers.h"

#include <algorithm>
#include <limits>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

namespace moe_kernels {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

at::ScalarType compute_type(at::ScalarType t) {
  return (t == at::kHalf || t == at::kBFloat16) ? at::kFloat : t;
}

// -finfo(dtype).max of the input dtype (the reference fills in that dtype); representable in the compute type.
double masked_logit(at::ScalarType t) {
  switch (t) {
    case at::kHalf: return -static_cast<double>(std::numeric_limits<c10::Half>::max());
    case at::kBFloat16: return -static_cast<double>(std::numeric_limits<c10::BFloat16>::max());
    case at::kFloat: return -static_cast<double>(std::numeric_limits<float>::max());
    case at::kDouble: return -std::numeric_limits<double>::max();
    default: TORCH_CHECK(false, "soft_moe: x must be float16, bfloat16, float32 or float64, got ", t);
  }
}

// The inputs of one problem, in the compute type, with the masks inverted (true = masked) once.
struct Problem {
  Tensor x, phi;             // [B, N, D], [S, D] or [B, S, D]
  OptTensor masked, slot_masked;  // [B, N], [B, S] bool
  double fill;
  int64_t B, N, D, S;

  Problem(const Tensor& x_, const Tensor& phi_, const OptTensor& mask, const OptTensor& slot_mask, const char* op) {
    TORCH_CHECK(x_.dim() == 3, op, ": x must be [B, N, D], got ", x_.sizes());
    TORCH_CHECK(phi_.dim() == 2 || phi_.dim() == 3, op, ": phi must be [S, D] or [B, S, D], got ", phi_.sizes());
    TORCH_CHECK(phi_.scalar_type() == x_.scalar_type(), op, ": x and phi must share a dtype, got x ",
                x_.scalar_type(), " and phi ", phi_.scalar_type());
    B = x_.size(0), N = x_.size(1), D = x_.size(2), S = phi_.size(-2);
    TORCH_CHECK(phi_.size(-1) == D && (phi_.dim() == 2 || phi_.size(0) == B), op,
                ": phi must be [S, D] or [B, S, D] for x [B, N, D] = ", x_.sizes(), ", got ", phi_.sizes());
    const auto ct = compute_type(x_.scalar_type());
    fill = masked_logit(x_.scalar_type());
    x = x_.detach().to(ct).contiguous();  // a kernel: no autograd of its own
    phi = phi_.detach().to(ct).contiguous();
    if (mask) {
      TORCH_CHECK(mask->scalar_type() == at::kBool && mask->sizes() == at::IntArrayRef({B, N}), op,
                  ": mask must be bool [B, N] = [", B, ", ", N, "], got ", mask->scalar_type(), " ", mask->sizes());
      masked = mask->logical_not();
    }
    if (slot_mask) {
      TORCH_CHECK(slot_mask->scalar_type() == at::kBool && slot_mask->sizes() == at::IntArrayRef({B, S}), op,
                  ": slot_mask must be bool [B, S] = [", B, ", ", S, "], got ", slot_mask->scalar_type(), " ",
                  slot_mask->sizes());
      slot_masked = slot_mask->logical_not();
    }
  }

  at::TensorOptions options() const { return x.options(); }
  // No tokens or no slots: every softmax is over nothing, and every output and gradient is an empty sum (zero).
  bool empty() const { return B == 0 || N == 0 || S == 0; }
  bool shared_phi() const { return phi.dim() == 2; }
};

// [Bb, M, K] -> [Bb * M, K], sized explicitly: a -1 is ambiguous when K = 0 (D = 0 is a valid problem: the
// logits are then all zero and combine's softmax is uniform).
Tensor rows_of(const Tensor& t) { return t.reshape({t.size(0) * t.size(1), t.size(2)}); }

// out [Bb, M, N] (=, or += when accumulate) a [Bb, M, K] @ w, w [K, N] shared by the batch or [Bb, K, N].
// out is contiguous: the shared case is one GEMM over Bb * M rows.
void gemm(Tensor out, const Tensor& a, const Tensor& w, bool accumulate) {
  if (w.dim() == 2) {
    auto o = out.view({out.size(0) * out.size(1), out.size(2)});
    auto a2 = rows_of(a);
    if (accumulate) {
      o.addmm_(a2, w);
    } else {
      at::mm_out(o, a2, w);
    }
  } else if (accumulate) {
    out.baddbmm_(a, w);
  } else {
    at::bmm_out(out, a, w);
  }
}

// grad_w += a^T b, summed over the batch when grad_w [S, D] is shared, per batch row when it is [Bb, S, D].
// a [Bb, M, S], b [Bb, M, D], both contiguous.
void gemm_tn(Tensor grad_w, const Tensor& a, const Tensor& b) {
  if (grad_w.dim() == 2) {
    grad_w.addmm_(rows_of(a).t(), rows_of(b));
  } else {
    grad_w.baddbmm_(a.transpose(1, 2), b);
  }
}

// One chunk: tokens [n0, n0 + C) of batch rows [b0, b0 + Bb); its tokens x [Bb, C, D] (a contiguous view: Bb == 1
// or C == N) and its masked logits [Bb, C, S] on demand. `origin`: the first batch row of the chunk's group.
struct Chunk {
  const Problem& p;
  int64_t b0, Bb, n0, C, origin;
  Tensor x, phi;  // phi: the shared [S, D], or these rows' [Bb, S, D]

  Chunk(const Problem& p_, int64_t b0_, int64_t Bb_, int64_t n0_, int64_t C_, int64_t origin_)
      : p(p_), b0(b0_), Bb(Bb_), n0(n0_), C(C_), origin(origin_) {
    x = p.x.narrow(0, b0, Bb).narrow(1, n0, C);
    phi = p.shared_phi() ? p.phi : p.phi.narrow(0, b0, Bb);
  }

  Tensor logits() const {
    auto out = new_empty({Bb, C, p.S}, p.options());
    gemm(out, x, phi.transpose(-1, -2), false);
    if (p.masked) out.masked_fill_(p.masked->narrow(0, b0, Bb).narrow(1, n0, C).unsqueeze(-1), p.fill);
    if (p.slot_masked) out.masked_fill_(p.slot_masked->narrow(0, b0, Bb).unsqueeze(1), p.fill);
    return out;
  }

  // Zero the entries whose logit was filled: their gradient is zero.
  void zero_masked_(Tensor& t) const {
    if (p.masked) t.masked_fill_(p.masked->narrow(0, b0, Bb).narrow(1, n0, C).unsqueeze(-1), 0);
    if (p.slot_masked) t.masked_fill_(p.slot_masked->narrow(0, b0, Bb).unsqueeze(1), 0);
  }

  // The chunk's rows [b0, b0 + Bb) x [n0, n0 + C) of a [B, N, *] tensor (contiguous).
  Tensor tokens(const Tensor& t) const { return t.narrow(0, b0, Bb).narrow(1, n0, C); }
  // The chunk's batch rows of a [B, S, *] tensor, or of one of its group's rows [origin, ...).
  Tensor rows(const Tensor& t) const { return t.narrow(0, b0, Bb); }
  Tensor group_rows(const Tensor& t) const { return t.narrow(0, b0 - origin, Bb); }
  // The chunk's part of an accumulator shaped like phi, of the group's rows when phi is per row.
  Tensor phi_rows(const Tensor& t) const { return p.shared_phi() ? t : group_rows(t); }
};

// The chunks, in groups that the ops run in parallel lanes. A chunk is Bb batch rows by C tokens, at most `chunk`
// logits (at least one token of one row). When whole rows fit (C == N), one group of all rows, a chunk per Bb rows:
// every lane has rows of its own. Else one group per batch row, a chunk per C tokens: the lanes share the row.
struct Plan {
  const Problem& p;
  int64_t Bb, C;
  bool whole_rows;

  Plan(const Problem& p_, int64_t chunk) : p(p_) {
    TORCH_CHECK(chunk >= 1, "soft_moe: chunk must be >= 1, got ", chunk);
    const int64_t S = std::max<int64_t>(p.S, 1), N = std::max<int64_t>(p.N, 1);
    C = std::clamp<int64_t>(chunk / S, 1, N);
    whole_rows = C == N;
    Bb = whole_rows ? std::clamp<int64_t>(chunk / (S * N), 1, std::max<int64_t>(p.B, 1)) : 1;
  }
  int64_t groups() const { return whole_rows ? 1 : p.B; }
  int64_t items() const { return whole_rows ? (p.B + Bb - 1) / Bb : (p.N + C - 1) / C; }
  int64_t origin(int64_t g) const { return whole_rows ? 0 : g; }
  // The rows of group g of a [B, ...] tensor.
  Tensor group_rows(const Tensor& t, int64_t g) const { return t.narrow(0, origin(g), whole_rows ? p.B : 1); }
  Chunk chunk(int64_t g, int64_t i) const {
    if (whole_rows) return Chunk(p, i * Bb, std::min(Bb, p.B - i * Bb), 0, p.N, 0);
    return Chunk(p, g, 1, i * C, std::min(C, p.N - i * C), g);
  }
};

// A group's chunks are split into at most kLanes lanes of consecutive chunks. With at least as many lanes as
// threads, the lanes run in parallel, each on one thread with single-threaded ATen ops (one synchronisation per
// group rather than one per op: what keeps 2 busy cores busy); with fewer, one after another on the calling thread
// with ATen's own threading. The split depends on the sizes alone, so the merges run in a fixed order.
// Lanes that sum into partials of their own ([S, D] for a shared phi or a row split among lanes) hold one each; the
// partials of all lanes together stay within kLaneScratch bytes, or a long row would cost kLanes times its output.
constexpr int64_t kLanes = 8;
constexpr int64_t kLaneScratch = int64_t(32) << 20;

int64_t lanes_for(int64_t items, int64_t partial_bytes = 0) {
  const int64_t cap = partial_bytes > 0 ? std::max<int64_t>(1, kLaneScratch / partial_bytes) : kLanes;
  return std::min({items, kLanes, cap});
}

// fn(lane, first chunk, end chunk) for each lane.
template <typename Fn>
void for_lanes(int64_t lanes, int64_t items, const Fn& fn) {
  if (lanes == 1 || lanes < at::get_num_threads()) {
    for (int64_t l = 0; l < lanes; ++l) fn(l, l * items / lanes, (l + 1) * items / lanes);
    return;
  }
  at::parallel_for(0, lanes, 1, [&](int64_t l0, int64_t l1) {
    at::AutoDispatchBelowADInplaceOrView guard;  // worker threads start with autograd on; these ops need none
    for (int64_t l = l0; l < l1; ++l) fn(l, l * items / lanes, (l + 1) * items / lanes);
  });
}

// A sum that lanes add to: straight into `target` when each lane has rows of its own (or there is one lane), else
// into a zero partial per lane that merge() adds to target in lane order (deterministic).
class LaneSum {
 public:
  LaneSum(Tensor target, int64_t lanes, bool shared)
      : target_(std::move(target)), parts_(shared && lanes > 1 ? lanes : 0) {}
  Tensor lane(int64_t l) { return parts_.empty() ? target_ : (parts_[l] = at::zeros_like(target_)); }
  void merge() {
    for (const auto& t : parts_) {
      if (t.defined()) target_.add_(t);
    }
  }

 private:
  Tensor target_;
  std::vector<Tensor> parts_;
};

// t [Bb, S] broadcast against acc [Bb, S] or [Bb, S, D].
Tensor like_acc(const Tensor& t, const Tensor& acc) { return acc.dim() == 3 ? t.unsqueeze(-1) : t; }

// The online softmax over tokens, per slot: running maximum m, sum l of exp(logits - m), and acc, a sum of
// exp(logits - m) times something that the caller adds ([Bb, S, D] or [Bb, S]).
struct OnlineSoftmax {
  Tensor m, l, acc;

  OnlineSoftmax() = default;
  explicit OnlineSoftmax(Tensor acc_)
      : m(at::full({acc_.size(0), acc_.size(1)}, -std::numeric_limits<double>::infinity(), acc_.options())),
        l(at::zeros({acc_.size(0), acc_.size(1)}, acc_.options())),
        acc(std::move(acc_)) {}

  // logits [Bb, C, S] -> exp(logits - new maximum), in place; l and acc rescaled to the new maximum (by 0 on the
  // first chunk), l summed.
  void update_(Tensor& logits) {
    auto m_new = at::maximum(m, logits.amax(1));
    auto alpha = (m - m_new).exp_();
    logits.sub_(m_new.unsqueeze(1)).exp_();
    l.mul_(alpha).add_(logits.sum(1));
    acc.mul_(like_acc(alpha, acc));
    m = m_new;
  }

  // The lanes' states over one row's tokens, combined in lane order (each rescaled to the overall maximum).
  static OnlineSoftmax merge(const std::vector<OnlineSoftmax>& parts) {
    if (parts.size() == 1) return parts[0];
    auto m = parts[0].m.clone();
    for (const auto& s : parts) m = at::maximum(m, s.m);
    OnlineSoftmax out(at::zeros_like(parts[0].acc));
    out.m = m;
    for (const auto& s : parts) {
      auto w = (s.m - m).exp_();
      out.l.add_(s.l * w);
      out.acc.add_(s.acc * like_acc(w, s.acc));
    }
    return out;
  }
};

// The online softmax of every row of group g: add(state, chunk, lane) feeds a chunk to a state (calling update_ is
// its job); a state per chunk when rows are whole, else per lane, merged. done(state, first row, rows) gets each
// final state. acc0(rows) makes a zero accumulator for that many rows.
template <typename Acc0, typename Add, typename Done>
void online_softmax_rows(const Plan& plan, int64_t g, int64_t lanes, const Acc0& acc0, const Add& add,
                         const Done& done) {
  const int64_t items = plan.items();
  std::vector<OnlineSoftmax> parts(plan.whole_rows ? 0 : lanes);
  for_lanes(lanes, items, [&](int64_t lane, int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const Chunk c = plan.chunk(g, i);
      if (plan.whole_rows) {
        OnlineSoftmax sm(acc0(c.Bb));
        add(sm, c, lane);
        done(sm, c.b0, c.Bb);
      } else {
        if (!parts[lane].m.defined()) parts[lane] = OnlineSoftmax(acc0(1));
        add(parts[lane], c, lane);
      }
    }
  });
  if (!plan.whole_rows) done(OnlineSoftmax::merge(parts), g, 1);
}

// --- dispatch -----------------------------------------------------------------------------------------
// -> (slots [B, S, D], lse [B, S]: each slot's logsumexp over the tokens, in the compute dtype)
std::tuple<Tensor, Tensor> soft_dispatch(const Tensor& x_, const Tensor& phi_, const OptTensor& mask,
                                         const OptTensor& slot_mask, int64_t chunk) {
  const Problem p(x_, phi_, mask, slot_mask, "soft_dispatch");
  const Plan plan(p, chunk);
  auto out = at::zeros({p.B, p.S, p.D}, p.options());
  auto lse = at::full({p.B, p.S}, -std::numeric_limits<double>::infinity(), p.options());
  if (p.empty()) return {out.to(x_.scalar_type()), lse};
  const int64_t lanes = lanes_for(plan.items(), plan.whole_rows ? 0 : p.S * p.D * p.x.element_size());
  for (int64_t g = 0; g < plan.groups(); ++g) {
    online_softmax_rows(
        plan, g, lanes, [&](int64_t rows) { return at::zeros({rows, p.S, p.D}, p.options()); },
        [&](OnlineSoftmax& sm, const Chunk& c, int64_t) {
          auto e = c.logits();
          sm.update_(e);
          sm.acc.baddbmm_(e.transpose(1, 2), c.x);
        },
        [&](const OnlineSoftmax& sm, int64_t b0, int64_t rows) {
          auto o = out.narrow(0, b0, rows);
          at::div_out(o, sm.acc, sm.l.unsqueeze(-1));
          lse.narrow(0, b0, rows).copy_(sm.m + sm.l.log());
        });
  }
  return {out.to(x_.scalar_type()), lse};
}

std::tuple<Tensor, Tensor> soft_dispatch_backward(const Tensor& grad_, const Tensor& x_, const Tensor& phi_,
                                                  const OptTensor& mask, const OptTensor& slot_mask,
                                                  int64_t chunk) {
  const Problem p(x_, phi_, mask, slot_mask, "soft_dispatch_backward");
  TORCH_CHECK(grad_.sizes() == at::IntArrayRef({p.B, p.S, p.D}), "soft_dispatch_backward: grad must be [B, S, D] = [",
              p.B, ", ", p.S, ", ", p.D, "], got ", grad_.sizes());
  const Plan plan(p, chunk);
  const auto grad = grad_.detach().to(p.x.scalar_type()).contiguous();
  auto grad_x = at::zeros({p.B, p.N, p.D}, p.options());
  auto grad_phi = at::zeros(p.phi.sizes(), p.options());
  if (p.empty()) return {grad_x.to(x_.scalar_type()), grad_phi.to(phi_.scalar_type())};
  const bool phi_partials = p.shared_phi() || !plan.whole_rows;
  const int64_t items = plan.items(), lanes = lanes_for(items, phi_partials ? p.S * p.D * p.x.element_size() : 0);
  for (int64_t g = 0; g < plan.groups(); ++g) {
    LaneSum gphi(p.shared_phi() ? grad_phi : plan.group_rows(grad_phi, g), lanes, phi_partials);
    std::vector<Tensor> gphi_lane(lanes);
    // The gradients of one chunk, given p = exp(logits - m) / l and dp = x . grad of its tokens and delta[s] =
    // sum_n p[n, s] dp[n, s] over the row: dlogits = p (dp - delta).
    auto gradients = [&](const Chunk& c, int64_t lane, const Tensor& prob, Tensor& dp, const Tensor& delta) {
      auto dl = dp.sub_(delta.unsqueeze(1)).mul_(prob);
      c.zero_masked_(dl);
      auto gx = c.tokens(grad_x);
      at::bmm_out(gx, prob, c.rows(grad));
      gemm(gx, dl, c.phi, true);
      if (!gphi_lane[lane].defined()) gphi_lane[lane] = gphi.lane(lane);
      gemm_tn(c.phi_rows(gphi_lane[lane]), dl, c.x);
    };
    // Pass 1: per slot, the softmax's maximum m, sum l, and sum_n exp(logits - m) dp. Rows that are one chunk
    // go on to their gradients at once, with the same logits.
    online_softmax_rows(
        plan, g, lanes, [&](int64_t rows) { return at::zeros({rows, p.S}, p.options()); },
        [&](OnlineSoftmax& sm, const Chunk& c, int64_t lane) {
          auto e = c.logits();
          sm.update_(e);
          auto dp = at::bmm(c.x, c.rows(grad).transpose(1, 2));
          sm.acc.add_((e * dp).sum(1));
          if (plan.whole_rows) {
            const auto inv_l = sm.l.reciprocal();
            gradients(c, lane, e.mul_(inv_l.unsqueeze(1)), dp, sm.acc * inv_l);
          }
        },
        [&](const OnlineSoftmax& sm, int64_t, int64_t) {
          if (plan.whole_rows) return;
          // Pass 2 over the row's chunks: p = exp(logits - m) / l (not exp(logits - logsumexp): in a fully masked
          // column m = -finfo.max absorbs log(l), and the uniform 1 / N would become 1).
          const auto m = sm.m.unsqueeze(1), inv_l = sm.l.reciprocal();
          const auto delta = sm.acc * inv_l;
          for_lanes(lanes, items, [&](int64_t lane, int64_t i0, int64_t i1) {
            for (int64_t i = i0; i < i1; ++i) {
              const Chunk ci = plan.chunk(g, i);
              auto prob = ci.logits().sub_(m).exp_().mul_(inv_l.unsqueeze(1));
              auto dp = at::bmm(ci.x, ci.rows(grad).transpose(1, 2));
              gradients(ci, lane, prob, dp, delta);
            }
          });
        });
    gphi.merge();
  }
  return {grad_x.to(x_.scalar_type()), grad_phi.to(phi_.scalar_type())};
}

// --- combine ------------------------------------------------------------------------------------------
Tensor check_y(const Problem& p, const Tensor& y, const char* op) {
  TORCH_CHECK(y.dim() == 3 && y.size(0) == p.B && y.size(1) == p.S, op, ": y must be [B, S, *] = [", p.B, ", ",
              p.S, ", *], got ", y.sizes());
  return y.detach().to(p.x.scalar_type()).contiguous();
}

// -> (out [B, N, Dv], lse [B, N]: each token's logsumexp over the slots, in the compute dtype)
std::tuple<Tensor, Tensor> soft_combine(const Tensor& x_, const Tensor& phi_, const Tensor& y_, const OptTensor& mask,
                                        const OptTensor& slot_mask, int64_t chunk) {
  const Problem p(x_, phi_, mask, slot_mask, "soft_combine");
  const auto y = check_y(p, y_, "soft_combine");
  const Plan plan(p, chunk);
  auto out = new_empty({p.B, p.N, y.size(2)}, p.options());
  auto lse = at::full({p.B, p.N}, -std::numeric_limits<double>::infinity(), p.options());
  if (p.empty()) return {out.zero_().to(y_.scalar_type()), lse};
  for (int64_t g = 0; g < plan.groups(); ++g) {
    const int64_t items = plan.items();
    for_lanes(lanes_for(items), items, [&](int64_t, int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const Chunk c = plan.chunk(g, i);
        auto o = c.tokens(out);
        auto logits = c.logits();
        // softmax, not exp(logits - lse): in a fully masked row lse = -max + log S rounds back to -max
        c.tokens(lse).copy_(at::logsumexp(logits, {-1}));
        at::bmm_out(o, at::softmax(logits, -1), c.rows(y));
      }
    });
  }
  return {out.to(y_.scalar_type()), lse};
}

std::tuple<Tensor, Tensor, Tensor> soft_combine_backward(const Tensor& grad_, const Tensor& x_, const Tensor& phi_,
                                                         const Tensor& y_, const OptTensor& mask,
                                                         const OptTensor& slot_mask, int64_t chunk) {
  const Problem p(x_, phi_, mask, slot_mask, "soft_combine_backward");
  const auto y = check_y(p, y_, "soft_combine_backward");
  TORCH_CHECK(grad_.sizes() == at::IntArrayRef({p.B, p.N, y.size(2)}),
              "soft_combine_backward: grad must be [B, N, Dy] = [", p.B, ", ", p.N, ", ", y.size(2), "], got ",
              grad_.sizes());
  const auto grad = grad_.detach().to(p.x.scalar_type()).contiguous();
  const Plan plan(p, chunk);
  auto grad_x = at::zeros({p.B, p.N, p.D}, p.options());
  auto grad_phi = at::zeros(p.phi.sizes(), p.options());
  auto grad_y = at::zeros(y.sizes(), p.options());
  if (p.empty()) return {grad_x.to(x_.scalar_type()), grad_phi.to(phi_.scalar_type()), grad_y.to(y_.scalar_type())};
  const bool phi_partials = p.shared_phi() || !plan.whole_rows;
  const int64_t items = plan.items(),
                lanes = lanes_for(items, ((plan.whole_rows ? 0 : p.S * y.size(2)) + (phi_partials ? p.S * p.D : 0)) *
                                             p.x.element_size());
  for (int64_t g = 0; g < plan.groups(); ++g) {
    LaneSum gy(plan.group_rows(grad_y, g), lanes, !plan.whole_rows);
    LaneSum gphi(p.shared_phi() ? grad_phi : plan.group_rows(grad_phi, g), lanes, phi_partials);
    for_lanes(lanes, items, [&](int64_t lane, int64_t i0, int64_t i1) {
      const auto gy_lane = gy.lane(lane), gphi_lane = gphi.lane(lane);
      for (int64_t i = i0; i < i1; ++i) {
        const Chunk c = plan.chunk(g, i);
        const auto g_out = c.tokens(grad);  // [Bb, C, Dy]
        auto prob = at::softmax(c.logits(), -1);
        c.group_rows(gy_lane).baddbmm_(prob.transpose(1, 2), g_out);
        auto dp = at::bmm(g_out, c.rows(y).transpose(1, 2));
        auto dl = dp.sub_((dp * prob).sum(-1, true)).mul_(prob);
        c.zero_masked_(dl);
        auto gx = c.tokens(grad_x);
        gemm(gx, dl, c.phi, false);
        gemm_tn(c.phi_rows(gphi_lane), dl, c.x);
      }
    });
    gy.merge();
    gphi.merge();
  }
  return {grad_x.to(x_.scalar_type()), grad_phi.to(phi_.scalar_type()), grad_y.to(y_.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(moe_kernels_C, m) {
  m.def("soft_dispatch(Tensor x, Tensor phi, Tensor? mask, Tensor? slot_mask, int chunk) -> (Tensor, Tensor)");
  m.def(
      "soft_dispatch_backward(Tensor grad, Tensor x, Tensor phi, Tensor? mask, Tensor? slot_mask, int chunk)"
      " -> (Tensor, Tensor)");
  m.def("soft_combine(Tensor x, Tensor phi, Tensor y, Tensor? mask, Tensor? slot_mask, int chunk)"
        " -> (Tensor, Tensor)");
  m.def(
      "soft_combine_backward(Tensor grad, Tensor x, Tensor phi, Tensor y, Tensor? mask, Tensor? slot_mask,"
      " int chunk) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(moe_kernels_C, CPU, m) {
  m.impl("soft_dispatch", &soft_dispatch);
  m.impl("soft_dispatch_backward", &soft_dispatch_backward);
  m.impl("soft_combine", &soft_combine);
  m.impl("soft_combine_backward", &soft_combine_backward);
}

}  // namespace moe_kernels
