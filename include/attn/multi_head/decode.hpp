#pragma once
/// @file
/// `MultiHeadAttention::decode_into`: one step of autoregressive decoding over a `KVCache`.

#include <algorithm>
#include <string>
#include <type_traits>

#include <Eigen/Core>

#include "../detail/operands.hpp"
#include "../error.hpp"
#include "../flash.hpp"
#include "../kv_cache.hpp"
#include "../rope.hpp"
#include "module.hpp"

namespace attn {

template <typename Scalar>
template <typename DerivedX, typename Storage, typename Out>
void MultiHeadAttention<Scalar>::decode_into(const Eigen::MatrixBase<DerivedX>& x, KVCache<Storage>& cache,
                                             Eigen::Index layer, const AttentionOptions<Scalar>& options, Out&& out,
                                             MultiHeadWorkspace<Scalar>& workspace) const {
  constexpr const char* operation = "attn::MultiHeadAttention::decode_into";
  static_assert(std::is_same_v<detail::compute_scalar_t<Storage>, Scalar>,
                "attn::MultiHeadAttention::decode_into: the cache must store the module's scalar, or bfloat16 "
                "half or q8_0 for a float module");
  detail::require_writable<Out>();
  detail::require_floating_point<typename DerivedX::Scalar>();
  static_assert(std::is_same_v<typename DerivedX::Scalar, Scalar>,
                "attn::MultiHeadAttention: inputs must have the module's scalar type");
  if (kdim() != embed_dim() || vdim() != embed_dim()) {
    detail::raise<std::invalid_argument>(
        operation, ": a decode step is self-attention, which needs kdim = vdim = embed_dim, got kdim = ", kdim(),
        ", vdim = ", vdim(), ", embed_dim = ", embed_dim());
  }
  detail::require_shape(operation, detail::operand("x", x), x.rows(), embed_dim(), "n_new x embed_dim");
  if (cache.key_width() != kv_width() || cache.value_width() != kv_width()) {
    detail::raise<dimension_error>(operation, ": cache holds keys of ", cache.key_width(), " and values of ",
                                   cache.value_width(), " columns but the module's are num_kv_heads*head_dim = ",
                                   kv_width());
  }
  const Eigen::Index n_new = x.rows();
  const Eigen::Index n_past = cache.size(layer);
  const Eigen::Index n_total = n_past + n_new;
  AttentionOptions<Scalar> step = options;
  step.causal = true;
  detail::validate_options(operation, step, n_new, n_total);
  detail::fit_output(operation, "out", out, n_new, embed_dim());

  // Everything that can allocate or throw, before the cache changes: the new tokens'
  // projections go to the workspace (column-major, where Eigen's products need no heap for
  // one token), and the kernel's scratch is reserved for the plan at the cache's capacity,
  // which has the most key chunks and threads of any step until the cache grows.
  auto [queries, keys, values, context] = project_inputs(x, x, x, workspace);
  if (rope()) {
    // The new tokens sit at positions n_past, n_past + 1, …: the cache keeps rotated keys.
    apply_rope_inplace(queries, n_past, head_dim(), *rope());
    apply_rope_inplace(keys, n_past, head_dim(), *rope());
  }
  workspace.flash.reserve(
      detail::plan_attention(n_new, std::max(cache.capacity(), n_total), heads(), head_dim(), head_dim(), step));

  cache.extend(layer, n_new).assign(keys, values);
  try {
    attend(queries, detail::KVCacheAccess::keys(cache, layer), detail::KVCacheAccess::values(cache, layer), step,
           context, workspace.flash);
  } catch (...) {
    cache.truncate(layer, n_past);
    throw;
  }
  project_output(context, out);
}

}  // namespace attn
