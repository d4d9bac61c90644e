#pragma once
/// @file
/// `attn::Workspace`: the tiled kernel's scratch, reusable across calls and sized from a
/// `TilePlan`.

#include <cstddef>
#include <vector>

#include <Eigen/Core>

#include "../detail/operands.hpp"
#include "plan.hpp"
#include "tile_products.hpp"

namespace attn {

namespace detail {

/// One thread's scratch for one query block: everything a tile pass writes.
template <typename Scalar>
struct TileSlot {
  Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic> queries;  // (block_q × d_k), scaled
  // The score tile, (block_q × block_k) with the plan's row stride: flat storage, so that a
  // slot grown by an earlier, wider call does not change where rows start, and with it
  // which entries Eigen computes with SIMD.
  Eigen::Matrix<Scalar, Eigen::Dynamic, 1> score_storage;
  row_major_matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic> accumulator;  // (block_q × d_v), unnormalised
  Eigen::Matrix<Scalar, Eigen::Dynamic, 1> row_max;
  Eigen::Matrix<Scalar, Eigen::Dynamic, 1> row_sum;
  // A key and a value tile converted from 16-bit storage, (block_k × d) each, in the
  // operand's storage order: only when the plan stages them.
  Eigen::Matrix<Scalar, Eigen::Dynamic, 1> key_storage;
  Eigen::Matrix<Scalar, Eigen::Dynamic, 1> value_storage;
  std::size_t tiles = 0;  // tiles computed in the last call

  std::size_t scalars() const noexcept {
    return static_cast<std::size_t>(queries.size() + score_storage.size() + accumulator.size() + row_max.size() +
                                    row_sum.size() + key_storage.size() + value_storage.size());
  }
};

struct WorkspaceAccess;

}  // namespace detail

/// Scratch for the tiled kernel, reusable across calls: per-thread tiles, and the partial
/// results of a key split. It grows to the largest plan it has seen and never shrinks, so a
/// loop of calls allocates on the first call only; `reserve(plan)` grows it ahead of time
/// (a decode loop reserves for its cache's capacity). Nothing in it is proportional to
/// n_q×n_k. Not safe to share between calls running at the same time.
template <typename Scalar>
class Workspace {
 public:
  /// Grows every buffer to what `plan` needs: a slot per thread, the key split's partial
  /// results, and the log-sum-exp for callers who want none.
  void reserve(const TilePlan& plan) {
    if (slots_.size() < static_cast<std::size_t>(plan.threads)) slots_.resize(static_cast<std::size_t>(plan.threads));
    for (auto& slot : slots_) {
      detail::grow_to(slot.queries, plan.block_q, plan.d_k);
      detail::grow_to(slot.score_storage, plan.block_q * plan.score_stride, 1);
      detail::grow_to(slot.accumulator, plan.block_q, plan.d_v);
      detail::grow_to(slot.row_max, plan.block_q, 1);
      detail::grow_to(slot.row_sum, plan.block_q, 1);
      // The packed keys and values of a tile (tile_products.hpp), or its keys and values
      // converted from 16 bits for Eigen's products.
      detail::grow_to(slot.key_storage, detail::packed_keys_size<Scalar>(plan.block_k, plan.d_k), 1);
      detail::grow_to(slot.value_storage, plan.block_k * plan.d_v, 1);
    }
    detail::grow_to(partial_out_, plan.partial_rows(), plan.d_v);
    detail::grow_to(partial_lse_, plan.partial_rows(), 1);
    detail::grow_to(lse_, plan.n_q, plan.num_heads);
  }

  /// Bytes of scratch held now.
  std::size_t bytes() const noexcept {
    std::size_t scalars =
        static_cast<std::size_t>(partial_out_.size() + partial_lse_.size() + lse_.size() + out_.size());
    for (const auto& slot : slots_) scalars += slot.scalars();
    return scalars * sizeof(Scalar);
  }

  /// Scratch slots held now: one per thread of the widest plan seen.
  std::size_t thread_slots() const noexcept { return slots_.size(); }

  /// Score tiles computed by the last call, summed over threads: a deterministic count of
  /// the work done, which shows masked tiles being skipped.
  std::size_t tiles_computed() const noexcept {
    std::size_t tiles = 0;
    for (const auto& slot : slots_) tiles += slot.tiles;
    return tiles;
  }

 private:
  friend struct detail::WorkspaceAccess;

  std::vector<detail::TileSlot<Scalar>> slots_;
  detail::row_major_matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic> partial_out_;  // (plan.partial_rows() × d_v)
  Eigen::Matrix<Scalar, Eigen::Dynamic, 1> partial_lse_;                          // (plan.partial_rows())
  Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic> lse_;                     // (n_q × H)
  Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic> out_;  // (n_q × H·d_v), for 16-bit outputs only
};

using Workspacef = Workspace<float>;
using Workspaced = Workspace<double>;

namespace detail {

/// The kernel's way into a workspace's buffers, which callers cannot reach.
struct WorkspaceAccess {
  template <typename Scalar>
  static TileSlot<Scalar>& slot(Workspace<Scalar>& workspace, int thread) {
    return workspace.slots_[static_cast<std::size_t>(thread)];
  }
  template <typename Scalar>
  static void start_call(Workspace<Scalar>& workspace) noexcept {
    for (auto& slot : workspace.slots_) slot.tiles = 0;
  }
  template <typename Scalar>
  static auto partial_out(Workspace<Scalar>& workspace, Eigen::Index first_row, Eigen::Index rows, Eigen::Index d_v) {
    return workspace.partial_out_.block(first_row, 0, rows, d_v);
  }
  template <typename Scalar>
  static auto partial_lse(Workspace<Scalar>& workspace, Eigen::Index first_row, Eigen::Index rows) {
    return workspace.partial_lse_.segment(first_row, rows);
  }
  /// The float output (n_q × H·d_v) of a call whose output is stored in 16 bits, grown to fit.
  template <typename Scalar>
  static auto out(Workspace<Scalar>& workspace, Eigen::Index n_q, Eigen::Index cols) {
    grow_to(workspace.out_, n_q, cols);
    return workspace.out_.topLeftCorner(n_q, cols);
  }
  /// The log-sum-exp scratch (n_q × H) for callers who want none, grown to fit.
  template <typename Scalar>
  static auto lse(Workspace<Scalar>& workspace, Eigen::Index n_q, Eigen::Index num_heads) {
    grow_to(workspace.lse_, n_q, num_heads);
    return workspace.lse_.topLeftCorner(n_q, num_heads);
  }
};

}  // namespace detail
}  // namespace attn
