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
// L1): first the block max, then one rescale of the running sum and one exp per element. Short
// batches split rows into segments (see split_rows) whose partial (max, sum) pairs are combined.
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
#include <vector>

#include "vec_io.h"

namespace fasttrdpo {
namespace {

constexpr int64_t kBlockSteps = 8;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

// Work split. Long batches: one task per row (policy and reference row of a token together).
// Short batches (fewer than kMinTasks rows, e.g. scoring one sequence against a 256k vocabulary):
// rows are cut into segments of ≥ kMinSegment logits so that every core still gets work; each
// segment yields a partial (max, Σ exp(z − max)) and the row's lse combines them.
constexpr int64_t kMinTasks = 64;
constexpr int64_t kMinSegment = 4096;  // a multiple of the vector block (kBlockSteps · kStep)

struct Split {
  int64_t segments, seg_len;
};

inline Split split_rows(int64_t N, int64_t V) {
  int64_t segs = 1;
  if (N < kMinTasks && V >= 2 * kMinSegment) {
    segs = std::min((V + kMinSegment - 1) / kMinSegment, (kMinTasks + N - 1) / N);
  }
  int64_t len = (V + segs - 1) / segs;
  const int64_t align = kBlockSteps * kStep;
  len = (len + align - 1) / align * align;  // vector-aligned segment starts
  return {(V + len - 1) / len, len};
}

// Tasks per parallel chunk: ≥ kMinChunkElems logits (tens of µs of work) per chunk, so that small
// problems run on one thread instead of paying a parallel region's wake-up.
constexpr int64_t kMinChunkElems = int64_t{1} << 17;
inline int64_t task_grain(int64_t len) {
  return std::max<int64_t>(1, kMinChunkElems / std::max<int64_t>(len, 1));
}

// A forward block (kBlockSteps vector steps) of T, prefetched kPrefetchBytes ahead as it is read.
template <typename T>
inline void prefetch_block(const T* p) {
  prefetch_ahead<kBlockSteps * kStep * static_cast<int64_t>(sizeof(T))>(p);
}

// Running max m and Σ exp(z − m) of a range of logits; m is NaN if any logit is NaN, -inf (with
// sum 0) if all are -inf.
struct MaxSum {
  float max, sum;
};

template <typename T>
MaxSum range_max_sum(const T* z, int64_t n) {
  VecF run_max(kNegInf), run_sum(0.f);
  const VecF neg_inf(kNegInf), zero(0.f);
  VecF x[2 * kBlockSteps];
  int64_t v = 0;
  while (v + kStep <= n) {
    const int64_t steps = std::min<int64_t>(kBlockSteps, (n - v) / kStep);
    VecF blk_max = run_max;
    prefetch_block(z + v);
    for (int64_t s = 0; s < steps; ++s) {
      load_step(z + v + s * kStep, x[2 * s], x[2 * s + 1]);
      blk_max = max_nan_unsafe(blk_max, max_nan_unsafe(x[2 * s], x[2 * s + 1]));
    }
    // A lane that has only seen -inf keeps max -inf; shift by 0 there so exp(-inf - 0) = 0 instead
    // of exp(-inf + inf) = NaN.
    const VecF shift = VecF::blendv(blk_max, zero, blk_max == neg_inf);
    run_sum = run_sum * vec_exp(run_max - shift);
    for (int64_t s = 0; s < 2 * steps; ++s) run_sum = run_sum + vec_exp(x[s] - shift);
    run_max = blk_max;
    v += steps * kStep;
  }
  // Combine the lanes and the scalar tail (fewer than kStep elements).
  float lane_max[VecF::size()], lane_sum[VecF::size()];
  run_max.store(lane_max);
  run_sum.store(lane_sum);
  float m = kNegInf;
  for (int64_t l = 0; l < VecF::size(); ++l) {
    if (std::isnan(lane_max[l]) || std::isnan(lane_sum[l])) return {kNaN, kNaN};
    m = std::max(m, lane_max[l]);
  }
  for (int64_t t = v; t < n; ++t) {
    const float zt = to_f32(z[t]);
    if (std::isnan(zt)) return {kNaN, kNaN};
    m = std::max(m, zt);
  }
  if (m == kNegInf) return {kNegInf, 0.f};
  float s = 0.f;
  for (int64_t l = 0; l < VecF::size(); ++l)
    if (lane_max[l] != kNegInf) s += lane_sum[l] * std::exp(lane_max[l] - m);
  for (int64_t t = v; t < n; ++t) s += std::exp(to_f32(z[t]) - m);
  return {m, s};
}

// lse of a row from its segments' partials (combined in double: no error added beyond theirs).
inline float combine_lse(const MaxSum* parts, int64_t count) {
  double m = -std::numeric_limits<double>::infinity();
  for (int64_t k = 0; k < count; ++k) {
    if (std::isnan(parts[k].max)) return kNaN;
    m = std::max(m, static_cast<double>(parts[k].max));
  }
  if (std::isinf(m)) return static_cast<float>(m);  // all -inf (or a +inf logit)
  double s = 0.0;
  for (int64_t k = 0; k < count; ++k)
    if (parts[k].max != kNegInf) s += static_cast<double>(parts[k].sum) * std::exp(parts[k].max - m);
  return static_cast<float>(m + std::log(s));
}

template <typename T>
inline float label_logprob(const T* z, int64_t V, int64_t y, float lse) {
  return (y >= 0 && y < V) ? to_f32(z[y]) - lse : kNaN;
}

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
  const Split sp = split_rows(N, V);
  // Partials [N, segments] for the policy and the reference; ignored rows are skipped entirely.
  std::vector<MaxSum> p_parts(N * sp.segments), r_parts(ref ? N * sp.segments : 0);
  at::parallel_for(0, N * sp.segments, task_grain(sp.seg_len), [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t i = task / sp.segments, v0 = (task % sp.segments) * sp.seg_len;
      if (lab[i] == ignore_index) continue;
      const int64_t n = std::min(V, v0 + sp.seg_len) - v0;
      p_parts[task] = range_max_sum(pz + i * ps + v0, n);
      if (ref) r_parts[task] = range_max_sum(rz + i * rs + v0, n);
    }
  });
  for (int64_t i = 0; i < N; ++i) {  // N small numbers per row: not worth a parallel region
    const int64_t y = lab[i];
    if (y == ignore_index) {
      out_p[i] = out_lse[i] = 0.f;
      if (out_r) out_r[i] = 0.f;
      continue;
    }
    const float lse = combine_lse(&p_parts[i * sp.segments], sp.segments);
    out_lse[i] = lse;
    out_p[i] = label_logprob(pz + i * ps, V, y, lse);
    if (out_r) out_r[i] = label_logprob(rz + i * rs, V, y, combine_lse(&r_parts[i * sp.segments], sp.segments));
  }
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
  const Split sp = split_rows(N, V);
  at::parallel_for(0, N * sp.segments, task_grain(sp.seg_len), [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t i = task / sp.segments, v0 = (task % sp.segments) * sp.seg_len;
      const int64_t v1 = std::min(V, v0 + sp.seg_len);
      const T* zr = z + i * zs;
      T* orow = o + i * os;
      const int64_t y = lab[i];
      if (y == ignore_index || !(y >= 0 && y < V)) {
        const T fill = from_f32<T>(y == ignore_index ? 0.f : kNaN);
        for (int64_t v = v0; v < v1; ++v) orow[v] = fill;
        continue;
      }
      const float gi = g[i], li = l[i];
      const bool has_label = y >= v0 && y < v1;  // only this segment touches the label's element
      const float zy = has_label ? to_f32(zr[y]) : 0.f;  // read before an in-place write overwrites it
      const VecF neg_g(-gi), vl(li);
      VecF a, b;
      int64_t v = v0;
      for (; v + kStep <= v1; v += kStep) {
        if (v % (kBlockSteps * kStep) == 0) prefetch_block(zr + v);  // once per forward-sized block
        load_step(zr + v, a, b);
        store_step(orow + v, neg_g * vec_exp(a - vl), neg_g * vec_exp(b - vl));
      }
      for (; v < v1; ++v) orow[v] = from_f32<T>(-gi * std::exp(to_f32(zr[v]) - li));
      if (has_label) orow[y] = from_f32<T>(gi * (1.f - std::exp(zy - li)));
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

// Out of place into a caller's buffer (a block of rows of a larger gradient): lets the Python side
// cover a [B, T, V] view block by block without copying the logits or the gradient.
at::Tensor& logprobs_backward_out(const at::Tensor& grad, const at::Tensor& logits, const at::Tensor& lse,
                                  const at::Tensor& labels, int64_t ignore_index, at::Tensor& out) {
  check_backward_args(grad, logits, lse, labels);
  check_logits("out", out);
  TORCH_CHECK(out.sizes() == logits.sizes() && out.scalar_type() == logits.scalar_type(),
              "out must have the logits' shape ", logits.sizes(), " and dtype ", logits.scalar_type(), ", got ",
              out.sizes(), " ", out.scalar_type());
  backward_impl(grad, logits, lse, labels, ignore_index, out);
  return out;
}

}  // namespace
}  // namespace fasttrdpo

namespace fasttrdpo {
namespace {
// The kernels' vector exp on a contiguous fp32 tensor (tails through the same vector code): lets
// the tests measure its error against float64.
at::Tensor vec_exp_op(const at::Tensor& x) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous() && x.device().is_cpu(),
              "vec_exp: x must be a contiguous float32 CPU tensor");
  at::Tensor out = at::empty_like(x);
  const float* p = x.const_data_ptr<float>();
  float* o = out.data_ptr<float>();
  const int64_t n = x.numel();
  for (int64_t i = 0; i < n; i += VecF::size()) {
    const int64_t c = std::min<int64_t>(VecF::size(), n - i);
    vec_exp(VecF::loadu(p + i, c)).store(o + i, c);
  }
  return out;
}
}  // namespace
}  // namespace fasttrdpo

TORCH_LIBRARY_FRAGMENT(fasttrdpo, m) {
  m.def("vec_exp(Tensor x) -> Tensor");
  m.def("paired_logprobs_forward(Tensor policy, Tensor? ref, Tensor labels, int ignore_index) -> (Tensor, Tensor, Tensor?)");
  m.def("logprobs_backward(Tensor grad, Tensor logits, Tensor lse, Tensor labels, int ignore_index) -> Tensor");
  m.def("logprobs_backward_(Tensor grad, Tensor(a!) logits, Tensor lse, Tensor labels, int ignore_index) -> Tensor(a!)");
  m.def("logprobs_backward_out(Tensor grad, Tensor logits, Tensor lse, Tensor labels, int ignore_index, Tensor(a!) out) -> Tensor(a!)");
}

TORCH_LIBRARY_IMPL(fasttrdpo, CPU, m) {
  m.impl("vec_exp", &fasttrdpo::vec_exp_op);
  m.impl("paired_logprobs_forward", &fasttrdpo::paired_logprobs_forward);
  m.impl("logprobs_backward", &fasttrdpo::logprobs_backward);
  m.impl("logprobs_backward_", &fasttrdpo::logprobs_backward_);
  m.impl("logprobs_backward_out", &fasttrdpo::logprobs_backward_out);
}
