#pragma once
/// @file
/// The tiled kernel's backward pass (FlashAttention-2's, Dao 2023, without its atomics):
/// with S = scale·Q·Kᵀ (+ bias, score_mod, masks), the forward's row log-sum-exp L,
/// P = exp(S − L), O = P·V and the incoming gradient dO,
///
///     Δ = rowsum(dO ∘ O) − dL,  dV = Pᵀ·dO,  dP = dO·Vᵀ,  dS = P ∘ (dP − Δ),
///     dQ = scale·dS·K,  dK = scale·dSᵀ·Q,
///
/// P recomputed tile by tile from L and never stored. Two passes, so that every output row
/// is reduced by one thread in a fixed order and the result is bitwise the same at any
/// thread count: one over key blocks (each owns its rows of dK and dV, and visits the
/// query blocks of its group's heads in order), one over query blocks (each owns its rows
/// of dQ). That recomputes S, P and dP once more than an atomic dQ would: 7 tile products
/// against 5.

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <limits>
#include <type_traits>
#include <vector>

#include <Eigen/Core>

#include "../detail/operands.hpp"
#include "../detail/parallel.hpp"
#include "../mask.hpp"
#include "../matrix_view.hpp"
#include "../mods.hpp"
#include "../options.hpp"
#include "../scores.hpp"
#include "../softmax.hpp"
#include "forward.hpp"
#include "tile.hpp"
#include "workspace.hpp"

namespace attn {

/// Whether a score modifier can take part in a backward pass: it says how it changes a
/// score, `derivative(score, query, key, head)` = d score_mod(score, …) / d score.
template <typename ScoreMod, typename Scalar, typename = void>
struct has_score_derivative : std::false_type {};
template <typename ScoreMod, typename Scalar>
struct has_score_derivative<ScoreMod, Scalar,
                            std::void_t<decltype(std::declval<const ScoreMod&>().derivative(
                                Scalar(), Eigen::Index(), Eigen::Index(), Eigen::Index()))>> : std::true_type {};

/// The gradients of a loss with respect to attention's inputs, each the shape of its input.
/// `d_bias` (n_q×n_k, the gradient with respect to `options.bias`) is filled only by the
/// reference backward, when the options carry a bias; it is empty otherwise.
template <typename Scalar>
struct AttentionGradients {
  Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic> dq;
  Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic> dk;
  Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic> dv;
  Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic> d_bias;
};

/// What a backward pass may take from its forward, and the gradient of the log-sum-exp.
/// All views (the matrices must outlive the call); each may be absent.
template <typename Scalar>
struct BackwardInputs {
  /// The forward's output (n_q×(H·d_v)) and log-sum-exp (n_q×H), both or neither, exactly
  /// as the tiled kernel returned them. Absent, the backward recomputes them (one forward
  /// pass more).
  MatrixView<Scalar> out;
  MatrixView<Scalar> lse;
  /// dLoss/dlse (n_q×H), when the loss used the log-sum-exp (as `merge_into` does); absent
  /// means zero.
  MatrixView<Scalar> d_lse;
};

namespace detail {

/// One thread's scratch for one tile of the backward pass, with a fixed row stride
/// (`block_k`) for the same reason as the forward's score tile: rows start at the same
/// place whatever the slot held before, so Eigen's SIMD covers the same entries.
template <typename Scalar>
struct BackwardSlot {
  Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic> queries;  // (block_q × d_k), scaled as the forward's
  Eigen::Matrix<Scalar, Eigen::Dynamic, 1> weights;               // (block_q × block_k): S, then P
  Eigen::Matrix<Scalar, Eigen::Dynamic, 1> d_scores;              // (block_q × block_k): dP, then dS
  Eigen::Matrix<Scalar, Eigen::Dynamic, 1> raw_scores;            // (block_q × block_k), with a score_mod only

  std::size_t scalars() const noexcept {
    return static_cast<std::size_t>(queries.size() + weights.size() + d_scores.size() + raw_scores.size());
  }
};

struct BackwardAccess;

}  // namespace detail

/// Scratch for the backward pass, reusable across calls like `Workspace`: per-thread tiles,
/// the rows' Δ terms, and the forward's output and log-sum-exp when the caller did not keep
/// them. Grows to the largest call seen and never shrinks: a training loop that keeps it
/// allocates on its first step only. Not safe to share between calls running at once.
template <typename Scalar>
class BackwardWorkspace {
 public:
  /// Bytes of scratch held now.
  std::size_t bytes() const noexcept {
    std::size_t scalars = static_cast<std::size_t>(out_.size() + lse_.size() + row_terms_.size());
    for (const auto& slot : slots_) scalars += slot.scalars();
    return scalars * sizeof(Scalar) + forward_.bytes();
  }

  /// Scratch slots held now: one per thread of the widest call seen.
  std::size_t thread_slots() const noexcept { return slots_.size(); }

 private:
  friend struct detail::BackwardAccess;

  Workspace<Scalar> forward_;
  Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic> out_;                    // (n_q × H·d_v), recomputed
  Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic> lse_;                    // (n_q × H), recomputed
  detail::row_major_matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic> row_terms_;  // (n_q × H): Δ, and L's shift
  std::vector<detail::BackwardSlot<Scalar>> slots_;
};

using BackwardWorkspacef = BackwardWorkspace<float>;
using BackwardWorkspaced = BackwardWorkspace<double>;

namespace detail {

/// The default tiles of the backward pass: square, 64 (32 in double) keys and queries,
/// so that its five tile buffers and Eigen's packing of the 64×d operands stay in L2.
template <typename Scalar>
constexpr Eigen::Index default_backward_block() noexcept {
  return sizeof(Scalar) > 4 ? 32 : 64;
}

/// The backward pass's shape: tiles, work items of each pass, threads.
struct BackwardPlan {
  Eigen::Index n_q = 0, n_k = 0, d_k = 0, d_v = 0;
  Eigen::Index num_heads = 1, num_kv_heads = 1;
  Eigen::Index block_q = 0, block_k = 0;
  Eigen::Index query_blocks = 0, key_blocks = 0;
  int threads = 1;

  Eigen::Index heads_per_kv_head() const noexcept { return num_heads / num_kv_heads; }
  /// Work items of the key pass (kv head-major) and of the query pass (head-major).
  Eigen::Index key_items() const noexcept { return num_kv_heads * key_blocks; }
  Eigen::Index query_items() const noexcept { return num_heads * query_blocks; }
};

template <typename Scalar>
BackwardPlan plan_backward(Eigen::Index n_q, Eigen::Index n_k, Heads heads, Eigen::Index d_k, Eigen::Index d_v,
                           int num_threads, Eigen::Index block_q, Eigen::Index block_k) {
  BackwardPlan plan;
  plan.n_q = n_q;
  plan.n_k = n_k;
  plan.d_k = d_k;
  plan.d_v = d_v;
  plan.num_heads = heads.num_heads;
  plan.num_kv_heads = heads.num_kv_heads;
  plan.block_q = block_q > 0 ? block_q : default_backward_block<Scalar>();
  plan.block_k = block_k > 0 ? block_k : default_backward_block<Scalar>();
  plan.query_blocks = (n_q + plan.block_q - 1) / plan.block_q;
  plan.key_blocks = (n_k + plan.block_k - 1) / plan.block_k;
  const Eigen::Index most_items = std::max(plan.key_items(), plan.query_items());
  plan.threads = static_cast<int>(std::clamp<Eigen::Index>(resolve_thread_count(num_threads), 1,
                                                           std::max<Eigen::Index>(most_items, 1)));
  return plan;
}

/// The backward pass's way into its workspace.
struct BackwardAccess {
  template <typename Scalar>
  static void reserve(BackwardWorkspace<Scalar>& workspace, const BackwardPlan& plan, bool raw_scores) {
    auto& slots = workspace.slots_;
    if (slots.size() < static_cast<std::size_t>(plan.threads)) slots.resize(static_cast<std::size_t>(plan.threads));
    const Eigen::Index tile = plan.block_q * plan.block_k;
    for (auto& slot : slots) {
      grow_to(slot.queries, plan.block_q, plan.d_k);
      grow_to(slot.weights, tile, 1);
      grow_to(slot.d_scores, tile, 1);
      if (raw_scores) grow_to(slot.raw_scores, tile, 1);
    }
    grow_to(workspace.row_terms_, plan.n_q, 2 * plan.num_heads);
  }
  template <typename Scalar>
  static BackwardSlot<Scalar>& slot(BackwardWorkspace<Scalar>& workspace, int thread) {
    return workspace.slots_[static_cast<std::size_t>(thread)];
  }
  template <typename Scalar>
  static auto row_terms(BackwardWorkspace<Scalar>& workspace, const BackwardPlan& plan) {
    return workspace.row_terms_.topLeftCorner(plan.n_q, 2 * plan.num_heads);
  }
  template <typename Scalar>
  static Workspace<Scalar>& forward(BackwardWorkspace<Scalar>& workspace) {
    return workspace.forward_;
  }
  template <typename Scalar>
  static auto out(BackwardWorkspace<Scalar>& workspace, Eigen::Index rows, Eigen::Index cols) {
    grow_to(workspace.out_, rows, cols);
    return workspace.out_.topLeftCorner(rows, cols);
  }
  template <typename Scalar>
  static auto lse(BackwardWorkspace<Scalar>& workspace, Eigen::Index rows, Eigen::Index cols) {
    grow_to(workspace.lse_, rows, cols);
    return workspace.lse_.topLeftCorner(rows, cols);
  }
};

/// dS = P ∘ (dP − Δ), and exactly 0 wherever P is 0: a masked key (or one whose weight
/// underflowed) passes no gradient, even when its value is garbage and made dP NaN.
template <typename Scalar>
struct weighted_difference_op {
  Scalar operator()(Scalar weight, Scalar difference) const { return weight == Scalar(0) ? Scalar(0) : weight * difference; }
  template <typename Packet>
  Packet packetOp(const Packet& weight, const Packet& difference) const {
    namespace internal = Eigen::internal;
    return internal::pandnot(internal::pmul(weight, difference),
                             internal::pcmp_eq(weight, internal::pzero(weight)));
  }
};

}  // namespace detail
}  // namespace attn

namespace Eigen::internal {
template <typename Scalar>
struct functor_traits<attn::detail::weighted_difference_op<Scalar>> {
  enum { Cost = NumTraits<Scalar>::MulCost + 2, PacketAccess = packet_traits<Scalar>::HasMul };
};
}  // namespace Eigen::internal

namespace attn::detail {

/// Everything one backward call's tile passes read.
template <typename Scalar, typename DerivedQ, typename DerivedK, typename DerivedV, typename DerivedDOut,
          typename ScoreMod, typename MaskMod>
struct BackwardProblem {
  const Eigen::MatrixBase<DerivedQ>& q;
  const Eigen::MatrixBase<DerivedK>& k;
  const Eigen::MatrixBase<DerivedV>& v;
  const Eigen::MatrixBase<DerivedDOut>& d_out;
  const AttentionOptions<Scalar>& options;
  const ScoreMod& score_mod;
  const MaskMod& mask_mod;
  const BackwardPlan& plan;
  KeyBand band;
  Scalar scale;
};

/// One tile of both passes: rows = queries [first_query, +queries) of `head`, cols = keys
/// [first_key, +cols) of its kv head. Leaves P in the slot's weights and dS in its
/// d_scores (both rows × cols, row stride block_k), and returns them; `queries` is the
/// block's query rows as the forward scales them (`scale_queries_first`).
template <typename Problem, typename Scalar, typename Queries, typename RowTerms>
auto backward_tile(const Problem& problem, BackwardSlot<Scalar>& slot, const Queries& queries, Eigen::Index head,
                   Eigen::Index first_query, Eigen::Index first_key, Eigen::Index cols, const RowTerms& row_terms) {
  using Tile = Eigen::Map<row_major_matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic>, Eigen::Unaligned,
                          Eigen::OuterStride<>>;
  using ScoreMod = std::decay_t<decltype(problem.score_mod)>;
  const BackwardPlan& plan = problem.plan;
  const Eigen::Index rows = queries.rows();
  const Eigen::Index kv_head = head / plan.heads_per_kv_head();
  const Eigen::OuterStride<> stride(plan.block_k);
  Tile weights(slot.weights.data(), rows, cols, stride);
  Tile d_scores(slot.d_scores.data(), rows, cols, stride);
  const auto keys = problem.k.block(first_key, kv_head * plan.d_k, cols, plan.d_k);
  const auto values = problem.v.block(first_key, kv_head * plan.d_v, cols, plan.d_v);
  const auto d_out = problem.d_out.block(first_query, head * plan.d_v, rows, plan.d_v);

  weights.noalias() = queries * keys.transpose();
  if (!scale_queries_first(problem.scale)) weights *= problem.scale;
  const Eigen::Index last_query = first_query + rows - 1;
  const bool inside_band =
      problem.band.key_first(last_query) <= first_key && problem.band.key_end(first_query) >= first_key + cols;
  for (Eigen::Index r = 0; r < rows; ++r) {
    const Eigen::Index query = first_query + r;
    auto row = weights.row(r);
    add_bias_row(problem, row, query, first_key);
    if constexpr (!is_identity_mod<ScoreMod>::value) {
      Tile(slot.raw_scores.data(), rows, cols, stride).row(r) = row;
      modify_row(problem, row, query, head, first_key);
    }
    mask_row(problem, row, query, head, first_key, inside_band);
    // P = exp(S − L); a row that attended nothing has L = −∞ and is shifted by +∞ instead
    // (stored as its second row term), so its P is 0, not exp(−∞ + ∞) = NaN.
    row.array() = exp_of_shifted(row.array() - row_terms(query, 2 * head + 1));
  }
  d_scores.noalias() = d_out * values.transpose();
  for (Eigen::Index r = 0; r < rows; ++r) {
    auto d_row = d_scores.row(r);
    d_row.array() = weights.row(r).array().binaryExpr(d_row.array() - row_terms(first_query + r, 2 * head),
                                                      weighted_difference_op<Scalar>{});
    if constexpr (!is_identity_mod<ScoreMod>::value) {
      const auto raw = Tile(slot.raw_scores.data(), rows, cols, stride).row(r);
      for (Eigen::Index c = 0; c < cols; ++c) {
        if (d_row(c) != Scalar(0)) {
          d_row(c) *= problem.score_mod.derivative(raw(c), first_query + r, first_key + c, head);
        }
      }
    }
  }
  return std::make_pair(weights, d_scores);
}

/// The block's query rows of `head`, scaled as the forward scales them, in the slot.
template <typename Problem, typename Scalar>
auto load_backward_queries(const Problem& problem, BackwardSlot<Scalar>& slot, Eigen::Index head,
                           Eigen::Index first_query, Eigen::Index rows) {
  const Eigen::Index d_k = problem.plan.d_k;
  auto queries = slot.queries.topLeftCorner(rows, d_k);
  const Scalar query_scale = scale_queries_first(problem.scale) ? problem.scale : Scalar(1);
  queries.noalias() = query_scale * problem.q.block(first_query, head * d_k, rows, d_k);
  return queries;
}

/// target += weightsᵀ·rows (target.row(c) += weights(r, c)·rows.row(r)), reading no row
/// whose weight is 0: the slow path for a block whose gradients came out non-finite, where
/// a masked key's or an empty row's garbage (NaN, ∞) may have entered through 0·∞.
template <typename Weights, typename Rows, typename Target>
void add_transposed_product_skipping_zeros(const Weights& weights, const Rows& rows, Target&& target) {
  for (Eigen::Index r = 0; r < weights.rows(); ++r) {
    for (Eigen::Index c = 0; c < weights.cols(); ++c) {
      if (weights(r, c) != 0) target.row(c) += weights(r, c) * rows.row(r);
    }
  }
}

/// The key pass's item: key block `block` of kv head `kv_head` owns dK and dV's rows
/// there. It visits its group's query heads in order, and each head's query blocks that
/// may attend one of its keys in order: a fixed order of sums whatever the threads.
/// `SkipZeros` is the slow path of `add_transposed_product_skipping_zeros`.
template <bool SkipZeros = false, typename Problem, typename Scalar, typename RowTerms, typename DK, typename DV>
void backward_key_block(const Problem& problem, BackwardSlot<Scalar>& slot, Eigen::Index kv_head, Eigen::Index block,
                        const RowTerms& row_terms, DK& dk, DV& dv) {
  const BackwardPlan& plan = problem.plan;
  const Eigen::Index first_key = block * plan.block_k;
  const Eigen::Index cols = std::min(plan.block_k, plan.n_k - first_key);
  auto dk_block = dk.block(first_key, kv_head * plan.d_k, cols, plan.d_k);
  auto dv_block = dv.block(first_key, kv_head * plan.d_v, cols, plan.d_v);
  dk_block.setZero();
  dv_block.setZero();
  // dK = scale·dSᵀ·Q: the loaded queries already carry a shrinking scale.
  const Scalar key_scale = scale_queries_first(problem.scale) ? Scalar(1) : problem.scale;
  const Eigen::Index queries_from = problem.band.query_first(first_key);
  const Eigen::Index queries_to = problem.band.query_end(first_key + cols - 1);
  for (Eigen::Index h = 0; h < plan.heads_per_kv_head(); ++h) {
    const Eigen::Index head = kv_head * plan.heads_per_kv_head() + h;
    for (Eigen::Index first_query = queries_from - queries_from % plan.block_q; first_query < queries_to;
         first_query += plan.block_q) {
      const Eigen::Index rows = std::min(plan.block_q, plan.n_q - first_query);
      const auto queries = load_backward_queries(problem, slot, head, first_query, rows);
      const auto [weights, d_scores] = backward_tile(problem, slot, queries, head, first_query, first_key, cols, row_terms);
      const auto d_out = problem.d_out.block(first_query, head * plan.d_v, rows, plan.d_v);
      if constexpr (SkipZeros) {
        add_transposed_product_skipping_zeros(weights, d_out, dv_block);
        add_transposed_product_skipping_zeros(key_scale * d_scores, queries, dk_block);
      } else {
        dv_block.noalias() += weights.transpose() * d_out;
        dk_block.noalias() += key_scale * (d_scores.transpose() * queries);
      }
    }
  }
  // Non-finite values stay non-finite: one check at the end finds every block that may
  // have read garbage, and the rerun decides which gradients really are.
  if constexpr (!SkipZeros) {
    if (!dk_block.allFinite() || !dv_block.allFinite()) {
      backward_key_block<true>(problem, slot, kv_head, block, row_terms, dk, dv);
    }
  }
}

/// The query pass's item: query block `block` of `head` owns dQ's rows there, summed over
/// the keys its rows may attend, in order. `SkipZeros`: as for `backward_key_block`.
template <bool SkipZeros = false, typename Problem, typename Scalar, typename RowTerms, typename DQ>
void backward_query_block(const Problem& problem, BackwardSlot<Scalar>& slot, Eigen::Index head, Eigen::Index block,
                          const RowTerms& row_terms, DQ& dq) {
  const BackwardPlan& plan = problem.plan;
  const Eigen::Index first_query = block * plan.block_q;
  const Eigen::Index rows = std::min(plan.block_q, plan.n_q - first_query);
  const Eigen::Index kv_head = head / plan.heads_per_kv_head();
  auto dq_block = dq.block(first_query, head * plan.d_k, rows, plan.d_k);
  dq_block.setZero();
  const auto queries = load_backward_queries(problem, slot, head, first_query, rows);
  const Eigen::Index keys_from = problem.band.key_first(first_query);
  const Eigen::Index keys_to = problem.band.key_end(first_query + rows - 1);
  // Key blocks on the key pass's grid, so both passes compute the same tiles.
  for (Eigen::Index first_key = keys_from - keys_from % plan.block_k; first_key < keys_to;
       first_key += plan.block_k) {
    const Eigen::Index cols = std::min(plan.block_k, plan.n_k - first_key);
    const auto [weights, d_scores] = backward_tile(problem, slot, queries, head, first_query, first_key, cols, row_terms);
    (void)weights;
    const auto keys = problem.k.block(first_key, kv_head * plan.d_k, cols, plan.d_k);
    if constexpr (SkipZeros) {
      add_transposed_product_skipping_zeros((problem.scale * d_scores).transpose(), keys, dq_block);
    } else {
      dq_block.noalias() += problem.scale * (d_scores * keys);
    }
  }
  if constexpr (!SkipZeros) {
    if (!dq_block.allFinite()) backward_query_block<true>(problem, slot, head, block, row_terms, dq);
  }
}

/// Each row's two terms per head: Δ = rowsum(dO ∘ O) − dL (column 2h) and the shift that
/// turns S into log P (column 2h + 1): L, or +∞ for a row that attended nothing.
template <typename Scalar, typename DOut, typename Out, typename Lse, typename RowTerms>
void compute_row_terms(const BackwardPlan& plan, const DOut& d_out, const Out& out, const Lse& lse,
                       const MatrixView<Scalar>& d_lse, RowTerms& row_terms) {
  constexpr Scalar infinity = std::numeric_limits<Scalar>::infinity();
  for (Eigen::Index head = 0; head < plan.num_heads; ++head) {
    for (Eigen::Index query = 0; query < plan.n_q; ++query) {
      Scalar delta = d_out.row(query).segment(head * plan.d_v, plan.d_v).dot(out.row(query).segment(head * plan.d_v, plan.d_v));
      if (!d_lse.empty()) delta -= d_lse(query, head);
      const Scalar log_sum = lse(query, head);
      row_terms(query, 2 * head) = delta;
      row_terms(query, 2 * head + 1) = log_sum == -infinity ? infinity : log_sum;
    }
  }
}

/// The backward pass on operands as the kernels take them (`kernel_operand`).
template <typename DerivedQ, typename DerivedK, typename DerivedV, typename DerivedDOut, typename Scalar,
          typename ScoreMod, typename MaskMod, typename DQ, typename DK, typename DV>
void run_flash_attention_backward(const Eigen::MatrixBase<DerivedQ>& q, const Eigen::MatrixBase<DerivedK>& k,
                                  const Eigen::MatrixBase<DerivedV>& v, const Eigen::MatrixBase<DerivedDOut>& d_out,
                                  Heads heads, const AttentionOptions<Scalar>& options,
                                  const BackwardInputs<Scalar>& inputs, const Mods<ScoreMod, MaskMod>& mods, DQ& dq,
                                  DK& dk, DV& dv, BackwardWorkspace<Scalar>& workspace, Eigen::Index block_q,
                                  Eigen::Index block_k) {
  const Eigen::Index d_k = q.cols() / heads.num_heads;
  const Eigen::Index d_v = v.cols() / heads.num_kv_heads;
  const BackwardPlan plan =
      plan_backward<Scalar>(q.rows(), k.rows(), heads, d_k, d_v, options.num_threads, block_q, block_k);
  BackwardAccess::reserve(workspace, plan, !is_identity_mod<ScoreMod>::value);
  auto row_terms = BackwardAccess::row_terms(workspace, plan);
  if (inputs.out.empty()) {
    auto out = BackwardAccess::out(workspace, q.rows(), heads.num_heads * d_v);
    auto lse = BackwardAccess::lse(workspace, q.rows(), heads.num_heads);
    flash_attention_unchecked(q, k, v, heads, options, mods, out, lse, BackwardAccess::forward(workspace));
    compute_row_terms(plan, d_out, out, lse, inputs.d_lse, row_terms);
  } else {
    compute_row_terms(plan, d_out, inputs.out.map(), inputs.lse.map(), inputs.d_lse, row_terms);
  }
  const BackwardProblem<Scalar, DerivedQ, DerivedK, DerivedV, DerivedDOut, ScoreMod, MaskMod> problem{
      q,    k,    v,    d_out, options, mods.score_mod, mods.mask_mod, plan, KeyBand(options, q.rows(), k.rows()),
      options.scale ? *options.scale : default_scale<Scalar>(d_k)};
  parallel_for(plan.key_items(), plan.threads, [&](Eigen::Index item, int thread) {
    backward_key_block(problem, BackwardAccess::slot(workspace, thread), item / plan.key_blocks,
                       item % plan.key_blocks, row_terms, dk, dv);
  });
  parallel_for(plan.query_items(), plan.threads, [&](Eigen::Index item, int thread) {
    backward_query_block(problem, BackwardAccess::slot(workspace, thread), item / plan.query_blocks,
                         item % plan.query_blocks, row_terms, dq);
  });
}

/// The tiled backward pass after its checks: the caller has checked the operands and the
/// options and sized dq, dk, dv like q, k, v. `out`/`lse` are the forward's, when given.
template <int BlockQ = 0, int BlockK = 0, typename DerivedQ, typename DerivedK, typename DerivedV, typename DerivedDOut,
          typename Scalar, typename ScoreMod, typename MaskMod, typename DQ, typename DK, typename DV>
void flash_attention_backward_unchecked(const Eigen::MatrixBase<DerivedQ>& q, const Eigen::MatrixBase<DerivedK>& k,
                                        const Eigen::MatrixBase<DerivedV>& v,
                                        const Eigen::MatrixBase<DerivedDOut>& d_out, Heads heads,
                                        const AttentionOptions<Scalar>& options, const BackwardInputs<Scalar>& inputs,
                                        const Mods<ScoreMod, MaskMod>& mods, DQ& dq, DK& dk, DV& dv,
                                        BackwardWorkspace<Scalar>& workspace) {
  decltype(auto) dq_map = kernel_output(dq);
  decltype(auto) dk_map = kernel_output(dk);
  decltype(auto) dv_map = kernel_output(dv);
  run_flash_attention_backward(kernel_operand(q), kernel_operand(k), kernel_operand(v), kernel_operand(d_out), heads,
                               options, inputs, mods, dq_map, dk_map, dv_map, workspace, BlockQ, BlockK);
}

}  // namespace attn::detail
