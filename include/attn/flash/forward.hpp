#pragma once
/// @file
/// The tiled kernel's forward pass after its checks: plan the call, run its work items over
/// the threads, merge the key split's chunks in a fixed order.

#include <type_traits>

#include <Eigen/Core>

#include "../detail/parallel.hpp"
#include "../mask.hpp"
#include "../merge.hpp"
#include "../mods.hpp"
#include "../options.hpp"
#include "../scores.hpp"
#include "plan.hpp"
#include "tile.hpp"
#include "workspace.hpp"

namespace attn::detail {

/// The plan of a call with these options: the masks' band bounds the keys, 0 threads means
/// all that OpenMP offers. Also what a caller reserving a workspace ahead of time plans with.
template <typename Scalar>
TilePlan plan_attention(Eigen::Index n_q, Eigen::Index n_k, Heads heads, Eigen::Index d_k, Eigen::Index d_v,
                        const AttentionOptions<Scalar>& options, Eigen::Index block_q = 0, Eigen::Index block_k = 0) {
  const KeyBand band(options, n_q, n_k);
  TileShape shape;
  shape.n_q = n_q;
  shape.n_k = n_k;
  shape.heads = heads;
  shape.d_k = d_k;
  shape.d_v = d_v;
  shape.key_first = n_q == 0 ? 0 : band.key_first(0);
  shape.key_end = n_q == 0 ? 0 : band.key_end(n_q - 1);
  shape.threads = resolve_thread_count(options.num_threads);
  shape.block_q = block_q;
  shape.block_k = block_k;
  return plan_tiles<Scalar>(shape);
}

/// Runs every work item of the plan: each attends its block and writes its rows, into
/// `out` and `lse` directly, or into the key split's partial results.
template <typename Problem, typename Scalar, typename Out, typename Lse>
void run_work_items(const Problem& problem, Workspace<Scalar>& workspace, Out& out, Lse& lse) {
  const TilePlan& plan = problem.plan;
  const Eigen::Index d_v = plan.d_v;
  parallel_for(plan.items, plan.threads, [&](Eigen::Index index, int thread) {
    auto& slot = WorkspaceAccess::slot(workspace, thread);
    const WorkItem item = plan.item(index);
    const QueryBlock& block = item.block;
    attend_query_block(problem, slot, item);
    for (Eigen::Index h = 0; h < block.heads; ++h) {
      const Eigen::Index head = block.first_head + h;
      const Eigen::Index first_row = h * block.queries;
      if (plan.splits_keys()) {
        const Eigen::Index partial_row = plan.partial_row(head, item.chunk);
        finish_rows(slot, first_row, block.queries, d_v,
                    WorkspaceAccess::partial_out(workspace, partial_row, plan.n_q, d_v),
                    WorkspaceAccess::partial_lse(workspace, partial_row, plan.n_q));
      } else {
        finish_rows(slot, first_row, block.queries, d_v, out.block(block.first_query, head * d_v, block.queries, d_v),
                    lse.col(head).segment(block.first_query, block.queries));
      }
    }
  });
}

/// Merges each head's key chunks, in chunk order, into `out` and `lse`.
template <typename Scalar, typename Out, typename Lse>
void merge_key_chunks(const TilePlan& plan, Workspace<Scalar>& workspace, Out& out, Lse& lse) {
  const Eigen::Index n_q = plan.n_q;
  const Eigen::Index d_v = plan.d_v;
  parallel_for(plan.num_heads, plan.threads, [&](Eigen::Index head, int /*thread*/) {
    auto head_out = out.block(0, head * d_v, n_q, d_v);
    auto head_lse = lse.col(head).head(n_q);
    head_out = WorkspaceAccess::partial_out(workspace, plan.partial_row(head, 0), n_q, d_v);
    head_lse = WorkspaceAccess::partial_lse(workspace, plan.partial_row(head, 0), n_q);
    for (Eigen::Index chunk = 1; chunk < plan.key_chunks; ++chunk) {
      merge_into(head_out, head_lse, WorkspaceAccess::partial_out(workspace, plan.partial_row(head, chunk), n_q, d_v),
                 WorkspaceAccess::partial_lse(workspace, plan.partial_row(head, chunk), n_q));
    }
  });
}

/// Plan, reserve, run, merge, on operands as the kernels take them (`kernel_operand`).
template <typename Queries, typename Keys, typename Values, typename Scalar, typename ScoreMod, typename MaskMod,
          typename Out, typename Lse>
void run_flash_attention(const Queries& q, const Keys& k, const Values& v, Heads heads,
                         const AttentionOptions<Scalar>& options, const Mods<ScoreMod, MaskMod>& mods, Out& out,
                         Lse& lse, Workspace<Scalar>& workspace, Eigen::Index block_q, Eigen::Index block_k) {
  const Eigen::Index d_k = q.cols() / heads.num_heads;
  const Eigen::Index d_v = v.cols() / heads.num_kv_heads;
  const TilePlan plan = plan_attention(q.rows(), k.rows(), heads, d_k, d_v, options, block_q, block_k);
  WorkspaceAccess::start_call(workspace);
  if (plan.items == 0) return;
  workspace.reserve(plan);
  const FlashProblem<Scalar, Queries, Keys, Values, ScoreMod, MaskMod> problem{
      q,    k,    v,    options, mods.score_mod, mods.mask_mod, plan, KeyBand(options, q.rows(), k.rows()),
      options.scale ? *options.scale : default_scale<Scalar>(d_k), heads.num_heads / heads.num_kv_heads};
  run_work_items(problem, workspace, out, lse);
  if (plan.splits_keys()) merge_key_chunks(plan, workspace, out, lse);
}

/// The tiled kernel's one unchecked entry. The caller has checked the operands and the
/// options and sized `out` (n_q×(H·d_v)) and `lse` (n_q×H).
template <int BlockQ = 0, int BlockK = 0, typename Queries, typename Keys, typename Values, typename Scalar,
          typename ScoreMod, typename MaskMod, typename Out, typename Lse>
void flash_attention_unchecked(const Queries& q, const Keys& k, const Values& v, Heads heads,
                               const AttentionOptions<Scalar>& options, const Mods<ScoreMod, MaskMod>& mods, Out& out,
                               Lse& lse, Workspace<Scalar>& workspace) {
  static_assert(BlockQ >= 0 && BlockK >= 0,
                "attn::flash_attention: tile sizes must be positive (or 0 for the default)");
  decltype(auto) lse_map = kernel_output(lse);
  if constexpr (is_reduced_precision_v<typename Out::Scalar>) {
    // A 16-bit output is rounded once, from the finished float rows: the key split's
    // merge and the normalisation stay in float.
    auto computed = WorkspaceAccess::out(workspace, out.rows(), out.cols());
    run_flash_attention(kernel_operand(q), kernel_operand(k), kernel_operand(v), heads, options, mods, computed,
                        lse_map, workspace, BlockQ, BlockK);
    out = computed.template cast<typename Out::Scalar>();
  } else {
    decltype(auto) out_map = kernel_output(out);
    run_flash_attention(kernel_operand(q), kernel_operand(k), kernel_operand(v), heads, options, mods, out_map,
                        lse_map, workspace, BlockQ, BlockK);
  }
}

/// As above, with the log-sum-exp written to the workspace's scratch, for callers who want
/// none.
template <int BlockQ = 0, int BlockK = 0, typename Queries, typename Keys, typename Values, typename Scalar,
          typename ScoreMod, typename MaskMod, typename Out>
void flash_attention_unchecked(const Queries& q, const Keys& k, const Values& v, Heads heads,
                               const AttentionOptions<Scalar>& options, const Mods<ScoreMod, MaskMod>& mods, Out& out,
                               Workspace<Scalar>& workspace) {
  auto lse = WorkspaceAccess::lse(workspace, q.rows(), heads.num_heads);
  flash_attention_unchecked<BlockQ, BlockK>(q, k, v, heads, options, mods, out, lse, workspace);
}

}  // namespace attn::detail
