// Per-token log-probs from logits on CPU: forward (paired policy + reference) and backward.
//
// Forward, for each row i of logits z [N, V] with label y_i:
//     lse_i  = log Σ_v exp(z_iv)       (online: one read of the row)
//     logp_i = z_iy - lse_i            (0.0 where y_i == ignore_index, NaN where y_i ∉ [0, V))
// The policy row and the reference row of the same token are done by the same task, so a paired
// call reads each logits tensor exactly once and writes 3 floats per token (policy logp, policy lse
// for the backward, reference logp). Memory traffic: N·V·sizeof(dtype) per tensor, read once.
//
// The online log-sum-exp keeps one running max and one running sum per vector lane. A row is
// processed in blocks of kBlockSteps vector steps (≤ 1 KiB, so the second look at the block hits
// L1): first the block max, then one rescale of the running sum and one exp per element.
//
// Backward: grad_z_iv = g_i · (onehot(y_i)_v − exp(z_iv − lse_i)), computed in fp32 and rounded to
// nearest even into the logits dtype; optionally written over the logits (each row's label logit
// is read before the row is overwritten). Rows whose label is ignored get 0; rows whose label lies
// outside [0, V) get NaN (their log-prob was NaN), and no out-of-bounds element is ever read.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <tuple>

#include "vec_io.h"

namespace fasttrdpo {
namespace {

constexpr int64_t kBlockSteps = 8;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

// Rows per parallel task: enough elements per task to amortize the scheduling.
inline int64_t row_grain(int64_t V) {
  return std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(V, 1));
}

// log Σ exp(z_v) over one row, fp32 math.
template <typename T>
float row_logsumexp(const T* z, int64_t V) {
  VecF run_max(kNegInf), run_sum(0.f);
  const VecF neg_inf(kNegInf), zero(0.f);
  VecF x[2 * kBlockSteps];
  int64_t v = 0;
  while (v + kStep <= V) {
    const int64_t steps = std::min<int64_t>(kBlockSteps, (V - v) / kStep);
    VecF blk_max = run_max;
    for (int64_t s = 0; s < steps; ++s) {
      load_step(z + v + s * kStep, x[2 * s], x[2 * s + 1]);
      blk_max = at::vec::maximum(blk_max, at::vec::maximum(x[2 * s], x[2 * s + 1]));
    }
    // A lane that has only seen -inf keeps max -inf; shift by 0 there so exp(-inf - 0) = 0 instead
    // of exp(-inf + inf) = NaN.
    const VecF shift = VecF::blendv(blk_max, zero, blk_max == neg_inf);
    run_sum = run_sum * (run_max - shift).exp();
    for (int64_t s = 0; s < 2 * steps; ++s) run_sum = run_sum + (x[s] - shift).exp();
    run_max = blk_max;
    v += steps * kStep;
  }
  // Combine the lanes and the scalar tail (fewer than kStep elements).
  float lane_max[VecF::size()], lane_sum[VecF::size()];
  run_max.store(lane_max);
  run_sum.store(lane_sum);
  float m = kNegInf;
  for (int64_t l = 0; l < VecF::size(); ++l) m = std::max(m, lane_max[l]);
  for (int64_t t = v; t < V; ++t) {
    const float zt = to_f32(z[t]);
    if (std::isnan(zt)) return kNaN;
    m = std::max(m, zt);
  }
  for (int64_t l = 0; l < VecF::size(); ++l)
    if (std::isnan(lane_max[l]) || std::isnan(lane_sum[l])) return kNaN;
  if (m == kNegInf) return kNegInf;  // every logit is -inf
  float s = 0.f;
  for (int64_t l = 0; l < VecF::size(); ++l)
    if (lane_max[l] != kNegInf) s += lane_sum[l] * std::exp(lane_max[l] - m);
  for (int64_t t = v; t < V; ++t) s += std::exp(to_f32(z[t]) - m);
  return m + std::log(s);
}

template <typename T>
inline float label_logprob(const T* z, int64_t V, int64_t y, float lse) {
  return (y >= 0 && y < V) ? to_f32(z[y]) - lse : kNaN;
}

// One task per range of rows; the reference row of a token is done right after its policy row.
// TP / TR: storage dtypes of the policy and reference logits (they may differ, e.g. an fp32 policy
// head beside a bf16 reference).
template <typename TP, typename TR>
void forward_kernel(const at::Tensor& policy, const at::Tensor* ref, const at::Tensor& labels, int64_t ignore_index,
                    at::Tensor& policy_logp, at::Tensor& policy_lse, at::Tensor* ref_logp) {
  const int64_t N = policy.size(0), V = policy.size(1);
  const TP* pz = policy.const_data_ptr<TP>();
  const int64_t ps = policy.stride(0);
  const TR* rz = ref ? ref->const_data_ptr<TR>() : nullptr;
  const int64_t rs = ref ? ref->stride(0) : 0;
  const int64_t* lab = labels.const_data_ptr<int64_t>();
  float* out_p = policy_logp.data_ptr<float>();
  float* out_lse = policy_lse.data_ptr<float>();
  float* out_r = ref ? ref_logp->data_ptr<float>() : nullptr;
  at::parallel_for(0, N, row_grain(V), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t y = lab[i];
      if (y == ignore_index) {  // nothing depends on an ignored row: skip its logits entirely
        out_p[i] = 0.f;
        out_lse[i] = 0.f;
        if (out_r) out_r[i] = 0.f;
        continue;
      }
      const float lse = row_logsumexp(pz + i * ps, V);
      out_lse[i] = lse;
      out_p[i] = label_logprob(pz + i * ps, V, y, lse);
      if (out_r) {
        const TR* row = rz + i * rs;
        out_r[i] = label_logprob(row, V, y, row_logsumexp(row, V));
      }
    }
  });
}

// Calls fn(TypeTag<T>{}) with T the C++ type of a float32 / bfloat16 / float16 tensor.
template <typename T>
struct TypeTag {
  using type = T;
};
template <typename Fn>
void dispatch_float(at::ScalarType t, Fn&& fn) {
  switch (t) {
    case at::kFloat: return fn(TypeTag<float>{});
    case at::kBFloat16: return fn(TypeTag<c10::BFloat16>{});
    case at::kHalf: return fn(TypeTag<c10::Half>{});
    default: TORCH_CHECK(false, "unsupported dtype ", t);
  }
}

void check_logits(const char* name, const at::Tensor& z) {
  TORCH_CHECK(z.device().is_cpu(), name, " must be a CPU tensor, got ", z.device());
  TORCH_CHECK(z.dim() == 2, name, " must be 2-D [N, V], got shape ", z.sizes());
  TORCH_CHECK(z.scalar_type() == at::kFloat || z.scalar_type() == at::kBFloat16 || z.scalar_type() == at::kHalf,
              name, " must be float32, bfloat16 or float16, got ", z.scalar_type());
  TORCH_CHECK(z.size(1) == 0 || z.stride(1) == 1, name, " must be contiguous along the vocabulary (stride 1), got strides ",
              z.strides());
}

void check_vector(const char* name, const at::Tensor& t, at::ScalarType dtype, int64_t n) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == dtype, name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n, name, " must have shape [", n, "], got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

std::tuple<at::Tensor, at::Tensor, c10::optional<at::Tensor>> paired_logprobs_forward(
    const at::Tensor& policy, const c10::optional<at::Tensor>& ref, const at::Tensor& labels, int64_t ignore_index) {
  check_logits("policy logits", policy);
  const int64_t N = policy.size(0);
  check_vector("labels", labels, at::kLong, N);
  if (ref.has_value()) {
    check_logits("reference logits", *ref);
    TORCH_CHECK(ref->sizes() == policy.sizes(), "reference logits must have the policy's shape ", policy.sizes(),
                ", got ", ref->sizes());
  }
  const auto f32 = policy.options().dtype(at::kFloat);
  at::Tensor policy_logp = at::empty({N}, f32), policy_lse = at::empty({N}, f32);
  c10::optional<at::Tensor> ref_logp;
  if (ref.has_value()) ref_logp = at::empty({N}, f32);
  const at::Tensor* ref_ptr = ref.has_value() ? &*ref : nullptr;
  at::Tensor* ref_out = ref_logp.has_value() ? &*ref_logp : nullptr;
  dispatch_float(policy.scalar_type(), [&](auto ptag) {
    using TP = typename decltype(ptag)::type;
    dispatch_float(ref_ptr ? ref_ptr->scalar_type() : policy.scalar_type(), [&](auto rtag) {
      using TR = typename decltype(rtag)::type;
      forward_kernel<TP, TR>(policy, ref_ptr, labels, ignore_index, policy_logp, policy_lse, ref_out);
    });
  });
  return {policy_logp, policy_lse, ref_logp};
}

template <typename T>
void backward_kernel(const at::Tensor& grad, const at::Tensor& logits, const at::Tensor& lse, const at::Tensor& labels,
                     int64_t ignore_index, at::Tensor& out) {
  const int64_t N = logits.size(0), V = logits.size(1);
  const T* z = logits.const_data_ptr<T>();
  const int64_t zs = logits.stride(0);
  T* o = out.data_ptr<T>();
  const int64_t os = out.stride(0);
  const float* g = grad.const_data_ptr<float>();
  const float* l = lse.const_data_ptr<float>();
  const int64_t* lab = labels.const_data_ptr<int64_t>();
  at::parallel_for(0, N, row_grain(V), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const T* zr = z + i * zs;
      T* orow = o + i * os;
      const int64_t y = lab[i];
      if (y == ignore_index || !(y >= 0 && y < V)) {
        const T fill = from_f32<T>(y == ignore_index ? 0.f : kNaN);
        for (int64_t v = 0; v < V; ++v) orow[v] = fill;
        continue;
      }
      const float gi = g[i], li = l[i];
      const float zy = to_f32(zr[y]);  // read before an in-place write overwrites it
      const VecF neg_g(-gi), vl(li);
      VecF a, b;
      int64_t v = 0;
      for (; v + kStep <= V; v += kStep) {
        load_step(zr + v, a, b);
        store_step(orow + v, neg_g * (a - vl).exp(), neg_g * (b - vl).exp());
      }
      for (; v < V; ++v) orow[v] = from_f32<T>(-gi * std::exp(to_f32(zr[v]) - li));
      orow[y] = from_f32<T>(gi * (1.f - std::exp(zy - li)));
    }
  });
}

at::Tensor backward_impl(const at::Tensor& grad, const at::Tensor& logits, const at::Tensor& lse,
                         const at::Tensor& labels, int64_t ignore_index, at::Tensor out) {
  dispatch_float(logits.scalar_type(), [&](auto tag) {
    backward_kernel<typename decltype(tag)::type>(grad, logits, lse, labels, ignore_index, out);
  });
  return out;
}

void check_backward_args(const at::Tensor& grad, const at::Tensor& logits, const at::Tensor& lse,
                         const at::Tensor& labels) {
  check_logits("logits", logits);
  const int64_t N = logits.size(0);
  check_vector("grad", grad, at::kFloat, N);
  check_vector("lse", lse, at::kFloat, N);
  check_vector("labels", labels, at::kLong, N);
}

at::Tensor logprobs_backward(const at::Tensor& grad, const at::Tensor& logits, const at::Tensor& lse,
                             const at::Tensor& labels, int64_t ignore_index) {
  check_backward_args(grad, logits, lse, labels);
  return backward_impl(grad, logits, lse, labels, ignore_index, at::empty(logits.sizes(), logits.options()));
}

at::Tensor& logprobs_backward_(const at::Tensor& grad, at::Tensor& logits, const at::Tensor& lse,
                               const at::Tensor& labels, int64_t ignore_index) {
  check_backward_args(grad, logits, lse, labels);
  backward_impl(grad, logits, lse, labels, ignore_index, logits);
  return logits;
}

}  // namespace
}  // namespace fasttrdpo

TORCH_LIBRARY_FRAGMENT(fasttrdpo, m) {
  m.def("paired_logprobs_forward(Tensor policy, Tensor? ref, Tensor labels, int ignore_index) -> (Tensor, Tensor, Tensor?)");
  m.def("logprobs_backward(Tensor grad, Tensor logits, Tensor lse, Tensor labels, int ignore_index) -> Tensor");
  m.def("logprobs_backward_(Tensor grad, Tensor(a!) logits, Tensor lse, Tensor labels, int ignore_index) -> Tensor(a!)");
}

TORCH_LIBRARY_IMPL(fasttrdpo, CPU, m) {
  m.impl("paired_logprobs_forward", &fasttrdpo::paired_logprobs_forward);
  m.impl("logprobs_backward", &fasttrdpo::logprobs_backward);
  m.impl("logprobs_backward_", &fasttrdpo::logprobs_backward_);
}
