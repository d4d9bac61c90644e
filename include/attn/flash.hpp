#pragma once
/// @file
/// The tiled attention kernel: softmax(scale·Q·Kᵀ + bias, masked)·V computed one query
/// block × key block tile at a time with an online softmax (a running row maximum and
/// row sum, rescaling the partial output as the maximum grows), so the n_q×n_k score
/// matrix never exists. This is FlashAttention's algorithm (Dao et al. 2022, "FlashAttention:
/// Fast and Memory-Efficient Exact Attention with IO-Awareness"; the online softmax is
/// Milakov & Gimelshein 2018) on Eigen, for the CPU.
///
/// Same options, semantics and results as the reference path in attention.hpp (scale,
/// bottom-right causal, keep-mask, bias, key padding, sliding window, fully masked rows →
/// zeros), plus: several heads side by side as column blocks, grouped-query attention,
/// per-row log-sum-exp, threads, and compile-time score and mask modifiers.

///
/// The kernel's parts live in flash/: the tile plan (plan.hpp), the workspace
/// (workspace.hpp), the tile pieces (tile.hpp) and the forward pass (forward.hpp).

#include <string>
#include <type_traits>

#include <Eigen/Core>

#include "detail/operands.hpp"
#include "error.hpp"
#include "flash/forward.hpp"
#include "flash/plan.hpp"
#include "flash/workspace.hpp"
#include "mods.hpp"
#include "options.hpp"
#include "precision.hpp"

namespace attn {

namespace detail {

template <typename DerivedQ, typename DerivedK, typename DerivedV, typename Scalar>
void check_flash(const char* operation, const Eigen::MatrixBase<DerivedQ>& q, const Eigen::MatrixBase<DerivedK>& k,
                 const Eigen::MatrixBase<DerivedV>& v, Heads heads, const AttentionOptions<Scalar>& options) {
  require_storage_scalar<typename DerivedQ::Scalar>();
  require_storage_scalar<typename DerivedK::Scalar>();
  require_storage_scalar<typename DerivedV::Scalar>();
  require_floating_point<Scalar>();
  static_assert(std::is_same_v<compute_scalar_of<DerivedQ>, Scalar> &&
                    std::is_same_v<compute_scalar_of<DerivedK>, Scalar> &&
                    std::is_same_v<compute_scalar_of<DerivedV>, Scalar>,
                "attn::flash_attention: q, k and v must compute in the options' scalar: float, bfloat16 "
                "and half operands (all computed in float) mix freely, double goes with double");
  static_assert(extents_compatible(DerivedK::RowsAtCompileTime, DerivedV::RowsAtCompileTime),
                "attn::flash_attention: k and v must have the same number of rows (one per key)");
  if (heads.num_heads < 1 || heads.num_kv_heads < 1 || heads.num_heads % heads.num_kv_heads != 0) {
    raise<std::invalid_argument>(operation, ": num_heads must be a positive multiple of num_kv_heads, got num_heads = ",
                                 heads.num_heads, ", num_kv_heads = ", heads.num_kv_heads);
  }
  if (q.cols() % heads.num_heads != 0) {
    raise<dimension_error>(operation, ": q has ", q.cols(), " columns, not a multiple of num_heads = ", heads.num_heads,
                           " (q is ", Shape{q.rows(), q.cols()}, ")");
  }
  const Eigen::Index d_k = q.cols() / heads.num_heads;
  if (k.cols() != heads.num_kv_heads * d_k) {
    raise<dimension_error>(operation, ": k has ", k.cols(), " columns but must have num_kv_heads x d_k = ",
                           heads.num_kv_heads, " x ", d_k, " (q is ", Shape{q.rows(), q.cols()}, ", k is ",
                           Shape{k.rows(), k.cols()}, ")");
  }
  if (v.cols() % heads.num_kv_heads != 0) {
    raise<dimension_error>(operation, ": v has ", v.cols(), " columns, not a multiple of num_kv_heads = ",
                           heads.num_kv_heads, " (v is ", Shape{v.rows(), v.cols()}, ")");
  }
  require_extents_match(operation, operand("k", k), Extent::rows, operand("v", v), Extent::rows);
  validate_options(operation, options, q.rows(), k.rows());
  require_defined_scale(operation, options, d_k);
}

}  // namespace detail

/// Tiled attention written into caller storage, heads side by side (see `Heads`):
/// `out` is n_q×(H·d_v); `lse`, n_q×H, receives each row's natural log-sum-exp of its
/// (scaled, biased, modified, masked) scores, −∞ for a row that attends nothing. The
/// workspace is reused across calls; with it and `out`/`lse` already sized, the call
/// allocates nothing (with the default tiles, for heads up to d = 256). `out` and `lse`
/// must not alias an input. An exception thrown by a modifier propagates from the call
/// once all threads have stopped; `out` is then unspecified.
template <int BlockQ = 0, int BlockK = 0, typename DerivedQ, typename DerivedK,
          typename DerivedV, typename Out, typename Lse, typename ScoreMod = NoScoreMod, typename MaskMod = NoMaskMod>
void flash_attention_into(const Eigen::MatrixBase<DerivedQ>& q, const Eigen::MatrixBase<DerivedK>& k,
                          const Eigen::MatrixBase<DerivedV>& v, Heads heads,
                          const AttentionOptions<detail::compute_scalar_of<DerivedQ>>& options, Out&& out, Lse&& lse,
                          Workspace<detail::compute_scalar_of<DerivedQ>>& workspace,
                          const Mods<ScoreMod, MaskMod>& mods = {}) {
  constexpr const char* operation = "attn::flash_attention_into";
  detail::require_writable<Out>();
  detail::require_writable<Lse>();
  detail::require_output_scalar<Out, detail::compute_scalar_of<DerivedQ>>();
  static_assert(std::is_same_v<typename std::decay_t<Lse>::Scalar, detail::compute_scalar_of<DerivedQ>>,
                "attn::flash_attention_into: lse must have the scalar the kernel computes in (float for "
                "bfloat16 and half operands)");
  detail::check_flash(operation, q, k, v, heads, options);
  detail::fit_output(operation, "out", out, q.rows(), v.cols() / heads.num_kv_heads * heads.num_heads);
  detail::fit_output(operation, "lse", lse, q.rows(), heads.num_heads);
  detail::flash_attention_unchecked<BlockQ, BlockK>(q, k, v, heads, options, mods, out, lse, workspace);
}

/// Tiled attention into caller storage, without the log-sum-exp.
template <int BlockQ = 0, int BlockK = 0, typename DerivedQ, typename DerivedK,
          typename DerivedV, typename Out, typename ScoreMod = NoScoreMod, typename MaskMod = NoMaskMod>
void flash_attention_into(const Eigen::MatrixBase<DerivedQ>& q, const Eigen::MatrixBase<DerivedK>& k,
                          const Eigen::MatrixBase<DerivedV>& v, Heads heads,
                          const AttentionOptions<detail::compute_scalar_of<DerivedQ>>& options, Out&& out,
                          Workspace<detail::compute_scalar_of<DerivedQ>>& workspace,
                          const Mods<ScoreMod, MaskMod>& mods = {}) {
  constexpr const char* operation = "attn::flash_attention_into";
  detail::require_writable<Out>();
  detail::require_output_scalar<Out, detail::compute_scalar_of<DerivedQ>>();
  detail::check_flash(operation, q, k, v, heads, options);
  detail::fit_output(operation, "out", out, q.rows(), v.cols() / heads.num_kv_heads * heads.num_heads);
  detail::flash_attention_unchecked<BlockQ, BlockK>(q, k, v, heads, options, mods, out, workspace);
}

/// Tiled attention of several heads as a new n_q×(H·d_v) matrix (allocates its output
/// and a workspace; loops should keep both and call `flash_attention_into`).
template <int BlockQ = 0, int BlockK = 0, typename DerivedQ, typename DerivedK,
          typename DerivedV, typename ScoreMod = NoScoreMod, typename MaskMod = NoMaskMod>
auto flash_attention(const Eigen::MatrixBase<DerivedQ>& q, const Eigen::MatrixBase<DerivedK>& k,
                     const Eigen::MatrixBase<DerivedV>& v, Heads heads,
                     const AttentionOptions<detail::compute_scalar_of<DerivedQ>>& options = {},
                     const Mods<ScoreMod, MaskMod>& mods = {}) {
  using Scalar = detail::compute_scalar_of<DerivedQ>;
  detail::plain_matrix<Scalar, DerivedQ::RowsAtCompileTime, Eigen::Dynamic> out;
  Workspace<Scalar> workspace;
  flash_attention_into<BlockQ, BlockK>(q, k, v, heads, options, out, workspace, mods);
  return out;
}

/// Tiled attention of one head as a new n_q×d_v matrix: the same result as
/// `attention(q, k, v, options)`'s reference path, without the n_q×n_k matrix.
template <int BlockQ = 0, int BlockK = 0, typename DerivedQ, typename DerivedK,
          typename DerivedV>
auto flash_attention(const Eigen::MatrixBase<DerivedQ>& q, const Eigen::MatrixBase<DerivedK>& k,
                     const Eigen::MatrixBase<DerivedV>& v,
                     const AttentionOptions<detail::compute_scalar_of<DerivedQ>>& options = {}) {
  using Scalar = detail::compute_scalar_of<DerivedQ>;
  detail::plain_matrix<Scalar, DerivedQ::RowsAtCompileTime, DerivedV::ColsAtCompileTime> out(q.rows(), v.cols());
  Workspace<Scalar> workspace;
  flash_attention_into<BlockQ, BlockK>(q, k, v, Heads{}, options, out, workspace);
  return out;
}

}  // namespace attn
