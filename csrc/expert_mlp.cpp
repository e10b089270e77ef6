// The fused expert MLP on CPU (the native backend of moe_kernels::moe_mlp_fused and its backward), composed of
// the counting sort, the grouped-GEMM pieces and the per-token combine, with no Python between experts.
//
// Forward: sort the (token, slot) pairs by expert (index only). Per expert, in cache: gather its token rows of x
// (the gather fused into the GEMM's input, no [T*k, D] permuted copy of x), GEMM1 with bias into the saved
// pre-activation, the activation, GEMM2 with bias into that expert's rows of an expert-ordered [T*k, D] buffer
// in the GEMM dtype. Then every token sums its own k rows, times their routing weights, in slot order
// (the weighted combine of unpermute: deterministic, no atomics).
// Backward, per expert: dH = dOut[token] @ W_down (gather fused), the routing-weight gradient dH . act(h) +
// dOut . b_down (no [T*k, D] expert output is kept), dW_down = (w * dOut)^T act(h), dH_pre through the
// activation, dW_up = dH_pre^T x[token], dX rows = dH_pre @ W_up into an expert-ordered buffer that each token
// then sums. Only the pre-activation [T*k, 2H] is saved; the activation is recomputed from it.
// Experts run through for_each_group (grouped_gemm.h): spread over the threads when they are many and small; an
// expert of a few rows (decode) runs its forward on raw pointers, streaming its weights, single-threaded, so those
// are always spread over the threads.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "grouped_gemm.h"
#include "permutation.h"

#include <type_traits>
#include <vector>

namespace moe_kernels {
namespace {

struct MlpArgs {
  at::Tensor x, gate_up, down, gate_up_bias, down_bias;  // contiguous; biases undefined when absent
  int64_t T, D, E, H2, H, O;  // O: the output width (down_proj [E, O, H]), D unless the layer projects
  Activation act;
  bool gated;
};

MlpArgs mlp_args(const char* op, const at::Tensor& x, const at::Tensor& gate_up, const at::Tensor& down,
                 const std::optional<at::Tensor>& gate_up_bias, const std::optional<at::Tensor>& down_bias,
                 c10::string_view activation, bool gated) {
  TORCH_CHECK(x.dim() == 2 && at::isFloatingType(x.scalar_type()), op, ": x must be a floating [T, D] tensor, got ",
              x.sizes(), " ", x.scalar_type());
  TORCH_CHECK(gate_up.dim() == 3 && down.dim() == 3, op, ": gate_up_proj must be [E, 2H, D] and down_proj [E, O, H], "
              "got ", gate_up.sizes(), " and ", down.sizes());
  const int64_t E = gate_up.size(0), H2 = gate_up.size(1), D = gate_up.size(2);
  const int64_t H = gated ? H2 / 2 : H2, O = down.size(1);
  TORCH_CHECK((!gated || H2 % 2 == 0) && down.size(0) == E && down.size(2) == H, op,
              ": gate_up_proj and down_proj must be [E, ", gated ? "2H" : "H", ", D] and [E, O, H] (gated = ", gated,
              "), got ", gate_up.sizes(), " and ", down.sizes());
  TORCH_CHECK(x.size(1) == D, op, ": x must be [T, D = ", D, "], got ", x.sizes());
  TORCH_CHECK(gate_up.scalar_type() == x.scalar_type() && down.scalar_type() == x.scalar_type(), op,
              ": x, gate_up_proj and down_proj must share a dtype, got ", x.scalar_type(), ", ", gate_up.scalar_type(),
              ", ", down.scalar_type());
  MlpArgs m{x.contiguous(), gate_up.contiguous(), down.contiguous(), at::Tensor(), at::Tensor(),
            x.size(0), D, E, H2, H, O, parse_activation(activation, gated, op), gated};
  m.gate_up_bias = bias_arg(op, "gate_up_bias", gate_up_bias, E, H2, x.scalar_type());
  m.down_bias = bias_arg(op, "down_bias", down_bias, E, O, x.scalar_type());
  return m;
}

// -> (out [T, O], pre-activation [T*k, H2] in x's dtype (rows of pairs not kept zero; [0] unless saved),
//     order, inverse, offsets)
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_mlp_forward(
    const at::Tensor& x_in, const at::Tensor& experts, const at::Tensor& weights, const at::Tensor& gate_up_in,
    const at::Tensor& down_in, const std::optional<at::Tensor>& gate_up_bias,
    const std::optional<at::Tensor>& down_bias, c10::string_view activation, bool gated, int64_t capacity,
    bool save_for_backward) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  check_experts("moe_mlp_forward", experts);  // before mlp_args makes contiguous copies
  const MlpArgs m = mlp_args("moe_mlp_forward", x_in, gate_up_in, down_in, gate_up_bias, down_bias, activation, gated);
  const int64_t N = m.T * experts.size(1);
  const auto gt = gemm_dtype(m.x.scalar_type());
  auto h_pre = save_for_backward ? new_empty({N, m.H2}, m.x.options()) : new_empty({0}, m.x.options());
  const bool pre_in_place = save_for_backward && m.x.scalar_type() == gt;
  auto r = routed_forward("moe_mlp_forward", m.x, experts, weights, m.E, m.O, capacity,
                          [&](int64_t e, int64_t lo, int64_t hi, const at::Tensor& token, const at::Tensor& y) {
    if (hi - lo <= kStreamRows) {
      few_rows_expert(
          m.x, y, token, e, lo, hi, m.H2, m.O, m.gate_up_bias, m.down_bias, m.act, m.gated,
          [&](auto x_tag, int which, const auto* a, int64_t rows, const auto* bias, auto* out) {
            using x_t = std::remove_cv_t<std::remove_pointer_t<decltype(x_tag)>>;
            if (which == 0) {
              stream_rows(a, rows, m.D, m.gate_up.const_data_ptr<x_t>() + e * m.H2 * m.D, m.H2, bias, out);
            } else {
              stream_rows(a, rows, m.H, m.down.const_data_ptr<x_t>() + e * m.O * m.H, m.O, bias, out);
            }
          },
          save_for_backward ? h_pre : at::Tensor());
      return;
    }
    expert_rows_forward(
        gather_rows(m.x, token.slice(0, lo, hi)), m.H2,
        [&](const at::Tensor& a, const at::Tensor& out) {
          gemm_bias_out(out, a, m.gate_up[e], bias_row(m.gate_up_bias, e));
        },
        [&](const at::Tensor& a, const at::Tensor& out) {
          gemm_bias_out(out, a, m.down[e], bias_row(m.down_bias, e));
        },
        m.act, m.gated, y.slice(0, lo, hi), pre_in_place ? h_pre.slice(0, lo, hi) : at::Tensor(),
        save_for_backward && !pre_in_place ? h_pre.slice(0, lo, hi) : at::Tensor());
  }, kStreamRows);
  if (save_for_backward) h_pre.narrow(0, r.kept, N - r.kept).zero_();
  return {r.out, h_pre, r.order, r.inverse, r.offsets};
}

// -> (grad_x, grad_weights, grad_gate_up_proj, grad_down_proj, grad_gate_up_bias, grad_down_bias); a bias
// gradient is [0] when that bias is absent.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_mlp_backward(
    const at::Tensor& grad_in, const at::Tensor& x_in, const at::Tensor& weights, const at::Tensor& gate_up_in,
    const at::Tensor& down_in, const std::optional<at::Tensor>& gate_up_bias,
    const std::optional<at::Tensor>& down_bias, const at::Tensor& h_pre, const at::Tensor& order,
    const at::Tensor& inverse, const at::Tensor& offsets, c10::string_view activation, bool gated) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const MlpArgs m = mlp_args("moe_mlp_backward", x_in, gate_up_in, down_in, gate_up_bias, down_bias, activation,
                             gated);
  TORCH_CHECK(inverse.dim() == 2 && inverse.size(0) == m.T && inverse.scalar_type() == at::kInt,
              "moe_mlp_backward: inverse must be [T = ", m.T, ", k] int32, got ", inverse.sizes(), " ",
              inverse.scalar_type());
  const int64_t k = inverse.size(1), N = m.T * k;
  TORCH_CHECK(order.dim() == 1 && order.size(0) == N && order.scalar_type() == at::kInt,
              "moe_mlp_backward: order must be [T*k = ", N, "] int32, got ", order.sizes(), " ", order.scalar_type());
  TORCH_CHECK(grad_in.sizes() == at::IntArrayRef({m.T, m.O}), "moe_mlp_backward: grad must be [T, O] = [", m.T, ", ",
              m.O, "], got ", grad_in.sizes());
  check_weights("moe_mlp_backward", weights, m.T, k);
  const auto bounds = read_offsets(offsets, N, "moe_mlp_backward");
  TORCH_CHECK(static_cast<int64_t>(bounds.size()) == m.E + 1, "moe_mlp_backward: offsets must be [E+1] = [",
              m.E + 1, "], got ", offsets.sizes());
  const int64_t kept = bounds.back();
  TORCH_CHECK(kept == 0 || (h_pre.dim() == 2 && h_pre.size(0) == N && h_pre.size(1) == m.H2),
              "moe_mlp_backward: h_pre must be the [T*k, ", m.H2, "] = [", N, ", ", m.H2,
              "] pre-activation saved by the forward (save_for_backward=True), got ", h_pre.sizes());
  const auto ct = compute_dtype(m.x.scalar_type());
  const auto gt = gemm_dtype(m.x.scalar_type());
  const auto grad = grad_in.contiguous();
  const auto kept_order = order.narrow(0, 0, kept).to(at::kLong);
  const auto token = at::div(kept_order, k, "floor");
  const auto scale = weights.reshape({-1}).index_select(0, kept_order).to(ct).unsqueeze(1);  // [kept, 1]

  auto grad_up = new_empty_like(m.gate_up);
  auto grad_down = new_empty_like(m.down);
  auto grad_up_b = m.gate_up_bias.defined() ? new_empty_like(m.gate_up_bias) : new_empty({0}, m.x.options());
  auto grad_down_b = m.down_bias.defined() ? new_empty_like(m.down_bias) : new_empty({0}, m.x.options());
  for (int64_t e = 0; e < m.E; ++e) {
    if (bounds[e + 1] > bounds[e]) continue;
    grad_up[e].zero_();
    grad_down[e].zero_();
    if (m.gate_up_bias.defined()) grad_up_b[e].zero_();
    if (m.down_bias.defined()) grad_down_b[e].zero_();
  }
  const Scratch dx_scratch({N, m.D}, m.x.options().dtype(gt));
  const at::Tensor& dx = dx_scratch.tensor();  // expert-ordered rows of dX, summed per token below
  auto dw = new_empty({kept}, m.x.options().dtype(ct));    // routing-weight gradient of each expert-ordered row

  for_each_group(bounds, 16, [&](int64_t e, int64_t lo, int64_t hi) {
    const auto tok = token.slice(0, lo, hi);
    const auto s = scale.slice(0, lo, hi);
    const auto pre = h_pre.slice(0, lo, hi);  // read in its storage dtype by the activation's backward
    auto g = gather_rows(grad, tok);  // dOut rows of this expert's tokens
    const auto w_down = to_gemm_kept(Kept::weight_a, m.down[e]);
    const auto [g_k, w_k] = rows_apart(g, w_down);
    const auto dh = at::mm(g_k, w_k);  // [rows, H], before the routing weight
    // y = w * (h @ W_down^T + b), so dL/dw = dH . h + dOut . b
    const auto h = kept_empty(Kept::act, {hi - lo, m.H}, gt);
    const auto dpre = kept_empty(Kept::pre, {hi - lo, m.H2}, gt);
    auto dw_e = dw.slice(0, lo, hi);
    gated_act_backward_into(dpre, dh, pre, m.act, m.gated, s, h, dw_e);
    if (m.down_bias.defined()) dw_e.add_(at::mv(g.to(ct), to_compute(m.down_bias[e])));
    g.mul_(s);
    mm_into(grad_down[e], g.t(), h);
    if (m.down_bias.defined()) grad_down_b[e].copy_(g.sum(0));
    mm_into(grad_up[e], dpre.t(), gather_rows(m.x, tok));
    if (m.gate_up_bias.defined()) grad_up_b[e].copy_(dpre.sum(0));
    mm_into(dx.slice(0, lo, hi), dpre, to_gemm_kept(Kept::weight_b, m.gate_up[e]), true);
  });

  // rows of dx past kept are scratch no GEMM wrote: an inverse pointing there is refused
  auto grad_x = unpermute_to(dx, inverse, at::Tensor(), m.x.scalar_type(), kept, "moe_mlp_backward");
  auto grad_w = at::zeros({N}, dw.options()).index_copy_(0, kept_order, dw).view({m.T, k}).to(weights.scalar_type());
  return {grad_x, grad_w, grad_up, grad_down, grad_up_b, grad_down_b};
}

}  // namespace

void check_experts(const char* op, const at::Tensor& experts) {
  TORCH_CHECK(experts.dim() == 2 && experts.size(0) * experts.size(1) < (int64_t(1) << 31), op, ": experts ",
              experts.sizes(), " give T*k (token, slot) pairs that overflow the int32 indices");
}

void check_weights(const char* op, const at::Tensor& weights, int64_t T, int64_t k) {
  TORCH_CHECK(weights.dim() == 2 && weights.size(0) == T && weights.size(1) == k &&
                  at::isFloatingType(weights.scalar_type()),
              op, ": weights must be a floating [T, k] = [", T, ", ", k, "] tensor, got ", weights.sizes(), " ",
              weights.scalar_type());
}

at::Tensor bias_row(const at::Tensor& bias, int64_t e) { return bias.defined() ? to_gemm(bias[e]) : at::Tensor(); }

at::Tensor bias_arg(const char* op, const char* name, const std::optional<at::Tensor>& bias, int64_t E, int64_t n,
                    at::ScalarType dtype) {
  if (!bias.has_value()) return at::Tensor();
  TORCH_CHECK(bias->sizes() == at::IntArrayRef({E, n}) && bias->scalar_type() == dtype, op, ": ", name,
              " must be [E, ", n, "] = [", E, ", ", n, "] in x's dtype ", dtype, ", got ", bias->sizes(), " ",
              bias->scalar_type());
  return bias->contiguous();
}

void expert_rows_forward(const at::Tensor& xe, int64_t H2, const GemmInto& up, const GemmInto& down,
                         const Activation& act, bool gated, const at::Tensor& y, const at::Tensor& pre_in,
                         const at::Tensor& save) {
  const int64_t rows = xe.size(0);
  const auto gt = xe.scalar_type();
  const auto pre = pre_in.defined() ? pre_in : kept_empty(Kept::pre, {rows, H2}, gt);
  up(xe, pre);
  const auto h = kept_empty(Kept::act, {rows, gated ? H2 / 2 : H2}, gt);
  gated_act_into(h, pre, act, gated, save);
  down(h, y);
}

Routed routed_forward(const char* op, const at::Tensor& x, const at::Tensor& experts, const at::Tensor& weights,
                      int64_t E, int64_t O, int64_t capacity, const ExpertRows& expert, int64_t serial_rows) {
  const int64_t T = x.size(0);
  check_experts(op, experts);
  TORCH_CHECK(experts.size(0) == T, op, ": experts must be [T = ", T, ", k], got ", experts.sizes());
  const int64_t k = experts.size(1), N = T * k;
  check_weights(op, weights, T, k);
  auto [order, inverse, offsets] = sort_by_expert(experts, E, capacity);
  const auto bounds = read_offsets(offsets, N, op);
  const int64_t kept = bounds.back();
  const auto token = at::div(order.narrow(0, 0, kept), k, "floor");  // token of each expert-ordered row
  const Scratch y_scratch({N, O}, x.options().dtype(gemm_dtype(x.scalar_type())));
  const at::Tensor& y = y_scratch.tensor();  // expert-ordered, unweighted expert outputs
  for_each_group(bounds, 16, [&](int64_t e, int64_t lo, int64_t hi) { expert(e, lo, hi, token, y); }, serial_rows);
  return {unpermute_to(y, inverse, weights, x.scalar_type(), kept, op), order, inverse, offsets, kept};
}

TORCH_LIBRARY_FRAGMENT(moe_kernels_C, m) {
  m.def("moe_mlp_forward(Tensor x, Tensor experts, Tensor weights, Tensor gate_up_proj, Tensor down_proj, "
        "Tensor? gate_up_bias, Tensor? down_bias, str activation, bool gated, int capacity, bool save_for_backward) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("moe_mlp_backward(Tensor grad, Tensor x, Tensor weights, Tensor gate_up_proj, Tensor down_proj, "
        "Tensor? gate_up_bias, Tensor? down_bias, Tensor h_pre, Tensor order, Tensor inverse, Tensor offsets, "
        "str activation, bool gated) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(moe_kernels_C, CPU, m) {
  m.impl("moe_mlp_forward", &moe_mlp_forward);
  m.impl("moe_mlp_backward", &moe_mlp_backward);
}

}  // namespace moe_kernels
