// Multi-tensor reference blend on CPU: for every pair, ref ← ref + α·(policy − ref).
//
// That exact formula in fp32 (three roundings: the difference, the product, the sum; no fused
// multiply-add — the loader compiles with -ffp-contract=off), then one round-to-nearest-even into
// the reference dtype. α = 1 is a cast-copy of the policy (exact), α = 0 writes nothing.
// The one exception: where p − r is ±inf (it overflows fp32 when |p|, |r| are near the top of the
// range with opposite signs, e.g. r = 3e38, p = −3e38), the element is α·p + (1 − α)·r instead,
// finite for finite inputs. Both forms are computed in registers and selected per lane: no extra
// pass over memory (the blend is bandwidth-bound).
// All tensors of the list are cut into chunks of kChunk elements and the chunks of every tensor
// share one parallel loop, so small tensors (biases, norms) do not serialize the pass.
// Memory traffic per element: read policy, read ref, write ref (6 B for bf16/bf16, 8 B for an fp32
// policy into a bf16 reference), the floor for this update.
// finite_flags: the check_finite pre-pass (which policy tensors hold NaN/inf), one read of each.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <array>
#include <atomic>
#include <cmath>
#include <limits>
#include <vector>

#include "vec_io.h"

namespace fasttrdpo {
namespace {

constexpr int64_t kChunk = int64_t{1} << 15;
// Below this many elements in all, one thread does the whole list (no parallel region's wake-up).
constexpr int64_t kMinParallelElems = int64_t{1} << 17;

// Chunks per parallel task: all of them (serial) when the whole list is small.
inline int64_t chunk_grain(int64_t total_elems, size_t chunk_count) {
  return total_elems < kMinParallelElems ? std::max<int64_t>(1, static_cast<int64_t>(chunk_count)) : 1;
}

// r + α·(p − r), or α·p + (1 − α)·r where p − r is ±inf (see the header).
inline VecF blend_vec(const VecF& r, const VecF& p, const VecF& va, const VecF& vb) {
  const VecF d = p - r;
  const VecF overflow = d.abs() == VecF(std::numeric_limits<float>::infinity());
  return VecF::blendv(r + va * d, va * p + vb * r, overflow);
}
inline float blend_scalar(float r, float p, float alpha, float beta) {
  const float d = p - r;
  return std::isinf(d) ? alpha * p + beta * r : r + alpha * d;
}

template <typename R, typename P>
void blend_range(R* ref, const P* pol, int64_t n, float alpha) {
  VecF ra, rb, pa, pb;
  int64_t i = 0;
  if (alpha == 1.f) {  // cast-copy: exact whatever the magnitudes
    for (; i + kStep <= n; i += kStep) {
      load_step(pol + i, pa, pb);
      store_step(ref + i, pa, pb);
    }
    for (; i < n; ++i) ref[i] = from_f32<R>(to_f32(pol[i]));
    return;
  }
  const float beta = 1.f - alpha;  // exact for α in [0.5, 1]; one rounding otherwise
  const VecF va(alpha), vb(beta);
  for (; i + kStep <= n; i += kStep) {
    if (i % (4 * kStep) == 0) {  // 4 steps: 256 B of a bf16 tensor, 512 B of an fp32 one
      prefetch_ahead<4 * kStep * static_cast<int64_t>(sizeof(P))>(pol + i);
      prefetch_ahead<4 * kStep * static_cast<int64_t>(sizeof(R))>(ref + i);
    }
    load_step(pol + i, pa, pb);
    load_step(ref + i, ra, rb);
    store_step(ref + i, blend_vec(ra, pa, va, vb), blend_vec(rb, pb, va, vb));
  }
  for (; i < n; ++i) ref[i] = from_f32<R>(blend_scalar(to_f32(ref[i]), to_f32(pol[i]), alpha, beta));
}

template <typename R>
void blend_dispatch_policy(const at::Tensor& ref, const at::Tensor& pol, int64_t begin, int64_t end, float alpha) {
  R* r = ref.data_ptr<R>() + begin;
  const int64_t n = end - begin;
  switch (pol.scalar_type()) {
    case at::kFloat: return blend_range(r, pol.const_data_ptr<float>() + begin, n, alpha);
    case at::kBFloat16: return blend_range(r, pol.const_data_ptr<c10::BFloat16>() + begin, n, alpha);
    case at::kHalf: return blend_range(r, pol.const_data_ptr<c10::Half>() + begin, n, alpha);
    default: TORCH_CHECK(false, "unreachable policy dtype ", pol.scalar_type());
  }
}

void blend_chunk(const at::Tensor& ref, const at::Tensor& pol, int64_t begin, int64_t end, float alpha) {
  switch (ref.scalar_type()) {
    case at::kFloat: return blend_dispatch_policy<float>(ref, pol, begin, end, alpha);
    case at::kBFloat16: return blend_dispatch_policy<c10::BFloat16>(ref, pol, begin, end, alpha);
    case at::kHalf: return blend_dispatch_policy<c10::Half>(ref, pol, begin, end, alpha);
    default: TORCH_CHECK(false, "unreachable reference dtype ", ref.scalar_type());
  }
}

bool is_float_dtype(at::ScalarType t) { return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf; }

void blend_(at::TensorList refs, at::TensorList policies, double alpha) {
  TORCH_CHECK(refs.size() == policies.size(), "blend_: ", refs.size(), " reference tensors but ", policies.size(),
              " policy tensors");
  TORCH_CHECK(alpha >= 0.0 && alpha <= 1.0, "blend_: alpha must lie in [0, 1], got ", alpha);
  // Check every pair before writing anything.
  for (size_t k = 0; k < refs.size(); ++k) {
    const at::Tensor &r = refs[k], &p = policies[k];
    TORCH_CHECK(r.device().is_cpu() && p.device().is_cpu(), "blend_: pair ", k, " must hold CPU tensors");
    TORCH_CHECK(r.sizes() == p.sizes(), "blend_: pair ", k, " shapes differ: ref ", r.sizes(), " policy ", p.sizes());
    TORCH_CHECK(is_float_dtype(r.scalar_type()) && is_float_dtype(p.scalar_type()), "blend_: pair ", k,
                " must be float32/bfloat16/float16, got ref ", r.scalar_type(), " policy ", p.scalar_type());
    TORCH_CHECK(r.is_contiguous() && p.is_contiguous(), "blend_: pair ", k, " must be contiguous");
  }
  if (alpha == 0.0) return;
  struct Chunk {
    int64_t pair, begin, end;
  };
  std::vector<Chunk> chunks;
  int64_t total = 0;
  for (size_t k = 0; k < refs.size(); ++k) {
    total += refs[k].numel();
    for (int64_t b = 0, n = refs[k].numel(); b < n; b += kChunk)
      chunks.push_back({static_cast<int64_t>(k), b, std::min(n, b + kChunk)});
  }
  const float a = static_cast<float>(alpha);
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), chunk_grain(total, chunks.size()),
                   [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const Chunk& ch = chunks[c];
      blend_chunk(refs[ch.pair], policies[ch.pair], ch.begin, ch.end, a);
    }
  });
}

// True in flag[k] iff tensor k holds no NaN/inf. x·0 is 0 for finite x and NaN for ±inf or NaN, so
// a chunk is finite iff the sum of x·0 over it is 0: one vectorized read, no branches in the loop.
template <typename T>
bool range_is_finite(const T* x, int64_t n) {
  const VecF zero(0.f);
  VecF acc(0.f), acc_b(0.f), a, b;  // two accumulators: two independent add chains
  int64_t i = 0;
  for (; i + kStep <= n; i += kStep) {
    if (i % (4 * kStep) == 0) prefetch_ahead<4 * kStep * static_cast<int64_t>(sizeof(T))>(x + i);
    load_step(x + i, a, b);
    acc = acc + a * zero;
    acc_b = acc_b + b * zero;
  }
  acc = acc + acc_b;
  float lanes[VecF::size()];
  acc.store(lanes);
  float s = 0.f;
  for (int64_t l = 0; l < VecF::size(); ++l) s += lanes[l];
  for (; i < n; ++i) s += to_f32(x[i]) * 0.f;
  return s == 0.f;
}

at::Tensor finite_flags(at::TensorList tensors) {
  const int64_t count = static_cast<int64_t>(tensors.size());
  for (int64_t k = 0; k < count; ++k) {
    const at::Tensor& t = tensors[k];
    TORCH_CHECK(t.device().is_cpu(), "finite_flags: tensor ", k, " must be a CPU tensor");
    TORCH_CHECK(is_float_dtype(t.scalar_type()), "finite_flags: tensor ", k,
                " must be float32/bfloat16/float16, got ", t.scalar_type());
    TORCH_CHECK(t.is_contiguous(), "finite_flags: tensor ", k, " must be contiguous");
  }
  std::vector<std::array<int64_t, 3>> chunks;  // (tensor, begin, end)
  int64_t total = 0;
  for (int64_t k = 0; k < count; ++k) {
    total += tensors[k].numel();
    for (int64_t b = 0, n = tensors[k].numel(); b < n; b += kChunk) chunks.push_back({k, b, std::min(n, b + kChunk)});
  }
  // One byte per tensor; chunks only ever clear it (a racing write of the same 0 is benign as a
  // relaxed atomic store).
  std::vector<std::atomic<uint8_t>> ok(count);
  for (auto& f : ok) f.store(1, std::memory_order_relaxed);
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), chunk_grain(total, chunks.size()),
                   [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const auto [k, b, e] = chunks[c];
      if (!ok[k].load(std::memory_order_relaxed)) continue;
      const at::Tensor& t = tensors[k];
      bool finite = true;
      switch (t.scalar_type()) {
        case at::kFloat: finite = range_is_finite(t.const_data_ptr<float>() + b, e - b); break;
        case at::kBFloat16: finite = range_is_finite(t.const_data_ptr<c10::BFloat16>() + b, e - b); break;
        default: finite = range_is_finite(t.const_data_ptr<c10::Half>() + b, e - b); break;
      }
      if (!finite) ok[k].store(0, std::memory_order_relaxed);
    }
  });
  at::Tensor out = at::empty({count}, at::TensorOptions().dtype(at::kBool));
  bool* o = out.data_ptr<bool>();
  for (int64_t k = 0; k < count; ++k) o[k] = ok[k].load(std::memory_order_relaxed) != 0;
  return out;
}

}  // namespace
}  // namespace fasttrdpo

TORCH_LIBRARY_FRAGMENT(fasttrdpo, m) {
  m.def("blend_(Tensor(a!)[] refs, Tensor[] policies, float alpha) -> ()");
  m.def("finite_flags(Tensor[] tensors) -> Tensor");
}

TORCH_LIBRARY_IMPL(fasttrdpo, CPU, m) {
  m.impl("blend_", &fasttrdpo::blend_);
  m.impl("finite_flags", &fasttrdpo::finite_flags);
}
