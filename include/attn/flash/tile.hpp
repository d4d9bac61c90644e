#pragma once
/// @file
/// The tiled kernel's pieces, each a function of one step: the scaled queries of a block,
/// the key and value tiles in the kernel's scalar (converted from 16-bit storage), a score
/// tile (the tile product), the masks of a tile's row, the online-softmax update, the value
/// accumulation, and the normalisation at the end. `attend_query_block` runs them over a
/// work item's keys. A block of a few rows over keys and values stored row by row (a
/// decode step over a KV cache) takes the two products of row_products.hpp instead of
/// Eigen's (`score_tile_by_rows`, `accumulate_value_rows`); everything between them is
/// shared. Another storage (8-bit blocks) replaces `operand_tile` and the row products'
/// packet load, and nothing else.

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>

#include <Eigen/Core>

#include "../detail/operands.hpp"
#include "../mask.hpp"
#include "../mods.hpp"
#include "../options.hpp"
#include "../scores.hpp"
#include "../softmax.hpp"
#include "plan.hpp"
#include "row_products.hpp"
#include "tile_products.hpp"
#include "workspace.hpp"

namespace attn::detail {

/// Everything one call's tile passes read.
template <typename Scalar, typename Queries, typename Keys, typename Values, typename ScoreMod, typename MaskMod>
struct FlashProblem {
  const Queries& q;
  const Keys& k;
  const Values& v;
  const AttentionOptions<Scalar>& options;
  const ScoreMod& score_mod;
  const MaskMod& mask_mod;
  const TilePlan& plan;
  KeyBand band;
  Scalar scale;
  Eigen::Index heads_per_kv_head;
};

/// queries: (rows × d_k), the block's queries times the scale, once per block rather than
/// once per score, when the scale shrinks (`scale_queries_first`; `score_tile` applies a
/// growing one to the product). A copy, because a scaled view would make Eigen evaluate a
/// temporary (an allocation) when a single query row turns the tile product into a
/// matrix-vector product. Column-major like Eigen's default for the tile products, so
/// that copying from a column-major q is a vectorised copy; row-major (`Order`) for the
/// row products, which read a query row as one run.
template <int Order = Eigen::ColMajor, typename Problem, typename Scalar>
auto load_queries(const Problem& problem, TileSlot<Scalar>& slot, const QueryBlock& block) {
  const Eigen::Index d_k = problem.plan.d_k;
  using Queries = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Order>;
  const Eigen::Index outer_stride = Order == Eigen::RowMajor ? d_k : slot.queries.rows();
  Eigen::Map<Queries, Eigen::Unaligned, Eigen::OuterStride<>> queries(slot.queries.data(), block.rows(), d_k,
                                                                      Eigen::OuterStride<>(outer_stride));
  const Scalar query_scale = scale_queries_first(problem.scale) ? problem.scale : Scalar(1);
  for (Eigen::Index h = 0; h < block.heads; ++h) {
    queries.middleRows(h * block.queries, block.queries).noalias() =
        query_scale *
        problem.q.block(block.first_query, (block.first_head + h) * d_k, block.queries, d_k).template cast<Scalar>();
  }
  return queries;
}

/// Empties the block's running state: no keys seen, nothing accumulated.
template <typename Scalar>
void start_rows(TileSlot<Scalar>& slot, Eigen::Index rows, Eigen::Index d_v) {
  slot.accumulator.topLeftCorner(rows, d_v).setZero();
  slot.row_max.head(rows).setConstant(-std::numeric_limits<Scalar>::infinity());
  slot.row_sum.head(rows).setZero();
}

/// Rows [first_row, first_row + count) of head `kv_head`'s columns of `operand`, as stored.
template <typename Operand>
auto stored_block(const Eigen::MatrixBase<Operand>& operand, Eigen::Index kv_head, Eigen::Index first_row,
                  Eigen::Index count, Eigen::Index width) {
  return operand.block(first_row, kv_head * width, count, width);
}
template <typename Stored>
auto stored_block(const HeadMajorRows<Stored>& operand, Eigen::Index kv_head, Eigen::Index first_row,
                  Eigen::Index count, Eigen::Index /*width*/) {
  return operand.head_rows(kv_head, first_row, count);
}

/// Rows [first_row, first_row + count) of head `kv_head`'s columns of `operand`, in the
/// kernel's scalar: the operand's own block, or, for an operand stored in 16 bits, the block
/// converted into `storage`, in the operand's storage order (a vectorised copy). Converted
/// once per tile and query block, so that every product runs on float operands.
template <typename Scalar, typename Operand>
decltype(auto) operand_tile(const Eigen::MatrixBase<Operand>& operand,
                            Eigen::Matrix<Scalar, Eigen::Dynamic, 1>& storage, Eigen::Index kv_head,
                            Eigen::Index first_row, Eigen::Index count, Eigen::Index width) {
  const auto block = stored_block(operand, kv_head, first_row, count, width);
  if constexpr (std::is_same_v<typename Operand::Scalar, Scalar>) {
    return block;
  } else {
    constexpr int order = Operand::IsRowMajor ? Eigen::RowMajor : Eigen::ColMajor;
    using Tile = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, order>;
    if constexpr (is_unit_stride_v<Operand>) {
      // One contiguous run per row (row-major) or column, widened with SIMD; a block whose
      // runs follow each other (a KV cache head's rows) is a single run.
      const Eigen::Index runs = Operand::IsRowMajor ? count : width;
      const Eigen::Index run_length = Operand::IsRowMajor ? width : count;
      if (block.outerStride() == run_length) {
        widen(block.data(), storage.data(), runs * run_length);
      } else {
        for (Eigen::Index run = 0; run < runs; ++run) {
          widen(block.data() + run * block.outerStride(), storage.data() + run * run_length, run_length);
        }
      }
    } else {
      Eigen::Map<Tile>(storage.data(), count, width) = block.template cast<Scalar>();
    }
    return Eigen::Map<const Tile>(storage.data(), count, width);
  }
}

/// The same for a head-major operand (a KV cache): its head's rows are a matrix of their own.
template <typename Scalar, typename Stored>
decltype(auto) operand_tile(const HeadMajorRows<Stored>& operand, Eigen::Matrix<Scalar, Eigen::Dynamic, 1>& storage,
                            Eigen::Index kv_head, Eigen::Index first_row, Eigen::Index count, Eigen::Index width) {
  return operand_tile(stored_block(operand, kv_head, first_row, count, width), storage, 0, 0, count, width);
}

/// The same for a q8_0 store: its head's rows dequantised into `storage`, row-major.
template <typename Scalar>
auto operand_tile(const QuantizedRows& operand, Eigen::Matrix<Scalar, Eigen::Dynamic, 1>& storage,
                  Eigen::Index kv_head, Eigen::Index first_row, Eigen::Index count, Eigen::Index width) {
  static_assert(std::is_same_v<Scalar, float>, "attn: a q8_0 store is read by a float kernel");
  for (Eigen::Index i = 0; i < count; ++i) dequantize_row(operand, kv_head, first_row + i, storage.data() + i * width);
  return Eigen::Map<const row_major_matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic>>(storage.data(), count, width);
}

/// Whether a tile's products are tile_products.hpp's packed products, which pack keys and
/// values from their storage (float, double or 16 bits): every tile in float or double
/// but those of a q8_0 store, whose rows `operand_tile` dequantises for Eigen's products.
template <typename Scalar, typename Operand>
inline constexpr bool packs_tiles_v =
    (std::is_same_v<Scalar, float> || std::is_same_v<Scalar, double>) && !std::is_same_v<Operand, QuantizedRows>;

/// Whether a block of `rows` rows whose tiles `packs_tiles_v` allows packing does pack
/// them: a few rows (a decode step over column-major keys and values) read each packed key
/// and value once or twice, and packing them cost more than Eigen's matrix-vector products
/// (`attn_bench`'s decode, one query over column-major keys and values, 8 heads, Zen 4:
/// 5.4 and 3.1 GB/s packed at 4k and 64k keys, 27.7 and 12.3 through Eigen).
inline bool packs_tile(Eigen::Index rows) noexcept { return rows > row_product_max_rows; }

/// Keys [first_key, first_key + count) of `kv_head`, in the kernel's scalar.
template <typename Problem, typename Scalar>
decltype(auto) key_tile(const Problem& problem, TileSlot<Scalar>& slot, Eigen::Index kv_head, Eigen::Index first_key,
                        Eigen::Index count) {
  return operand_tile(problem.k, slot.key_storage, kv_head, first_key, count, problem.plan.d_k);
}

/// Values [first_key, first_key + count) of `kv_head`, in the kernel's scalar.
template <typename Problem, typename Scalar>
decltype(auto) value_tile(const Problem& problem, TileSlot<Scalar>& slot, Eigen::Index kv_head,
                          Eigen::Index first_key, Eigen::Index count) {
  return operand_tile(problem.v, slot.value_storage, kv_head, first_key, count, problem.plan.d_v);
}

/// scores (rows × cols) = queries · keys [first_key, first_key + cols) of `kv_head`ᵀ:
/// packed (tile_products.hpp) where `packs_tiles_v` and `packs_tile` say so, else Eigen's.
template <typename Problem, typename Scalar, typename Queries, typename Scores>
void score_products(const Problem& problem, TileSlot<Scalar>& slot, const Queries& queries, Eigen::Index kv_head,
                    Eigen::Index first_key, Scores& scores) {
  const Eigen::Index cols = scores.cols();
  if constexpr (packs_tiles_v<Scalar, std::decay_t<decltype(problem.k)>>) {
    if (packs_tile(queries.rows())) {
      const Eigen::Index d_k = problem.plan.d_k;
      pack_key_panels(stored_block(problem.k, kv_head, first_key, cols, d_k), slot.key_storage.data());
      score_packed_tile(queries.data(), queries.outerStride(), queries.rows(), d_k, slot.key_storage.data(), cols,
                        scores.data(), scores.outerStride());
      return;
    }
  }
  scores.noalias() = queries * key_tile(problem, slot, kv_head, first_key, cols).transpose();
}

/// scores: (rows × cols) = queries · keys [first_key, first_key + cols) of `kv_head`ᵀ, in
/// the slot's score tile.
template <typename Problem, typename Scalar, typename Queries>
auto score_tile(const Problem& problem, TileSlot<Scalar>& slot, const Queries& queries, Eigen::Index kv_head,
                Eigen::Index first_key, Eigen::Index cols) {
  Eigen::Map<row_major_matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic>, Eigen::Unaligned, Eigen::OuterStride<>> scores(
      slot.score_storage.data(), queries.rows(), cols, Eigen::OuterStride<>(problem.plan.score_stride));
  score_products(problem, slot, queries, kv_head, first_key, scores);
  if (!scale_queries_first(problem.scale)) scores *= problem.scale;
  return scores;
}

/// `score_tile` for a block of few rows through the row products (row_products.hpp):
/// queries is row-major.
template <typename Problem, typename Scalar, typename Queries>
auto score_tile_by_rows(const Problem& problem, TileSlot<Scalar>& slot, const Queries& queries, Eigen::Index kv_head,
                        Eigen::Index first_key, Eigen::Index cols) {
  const Eigen::Index stride = problem.plan.score_stride;
  Eigen::Map<row_major_matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic>, Eigen::Unaligned, Eigen::OuterStride<>> scores(
      slot.score_storage.data(), queries.rows(), cols, Eigen::OuterStride<>(stride));
  score_rows(row_operand(problem.k, slot.key_storage, kv_head, first_key, cols), kv_head, first_key, cols,
             problem.plan.d_k, queries.data(), queries.rows(), scores.data(), stride);
  if (!scale_queries_first(problem.scale)) scores *= problem.scale;
  return scores;
}

/// Adds the bias to one row of a score tile (keys [first_key, first_key + cols) of
/// `query`), as `biased_score_op` defines it.
template <typename Problem, typename Row>
EIGEN_ALWAYS_INLINE void add_bias_row(const Problem& problem, Row&& score_row, Eigen::Index query,
                                      Eigen::Index first_key) {
  using Scalar = typename std::decay_t<Row>::Scalar;
  const auto& bias = problem.options.bias;
  if (bias.empty()) return;
  score_row = score_row.binaryExpr(bias.map().block(query, first_key, 1, score_row.size()), biased_score_op<Scalar>{});
}

/// Applies the score modifier to one row of a score tile.
template <typename Problem, typename Row>
EIGEN_ALWAYS_INLINE void modify_row(const Problem& problem, Row&& score_row, Eigen::Index query, Eigen::Index head,
                                    Eigen::Index first_key) {
  using ScoreMod = std::decay_t<decltype(problem.score_mod)>;
  if constexpr (!is_identity_mod<ScoreMod>::value) {
    for (Eigen::Index c = 0; c < score_row.size(); ++c) {
      score_row(c) = problem.score_mod(score_row(c), query, first_key + c, head);
    }
  }
}

/// Sets every masked score of one row of a score tile to −∞: the positional rules (unless
/// `inside_band` says they keep the whole tile), the keep-mask, the mask modifier.
template <typename Problem, typename Row>
EIGEN_ALWAYS_INLINE void mask_row(const Problem& problem, Row&& score_row, Eigen::Index query, Eigen::Index head,
                                  Eigen::Index first_key, bool inside_band) {
  using Scalar = typename std::decay_t<Row>::Scalar;
  using MaskMod = std::decay_t<decltype(problem.mask_mod)>;
  constexpr Scalar minus_infinity = -std::numeric_limits<Scalar>::infinity();
  const Eigen::Index cols = score_row.size();
  if (!inside_band) {
    const Eigen::Index keep_from = std::clamp<Eigen::Index>(problem.band.key_first(query) - first_key, 0, cols);
    const Eigen::Index keep_to = std::clamp<Eigen::Index>(problem.band.key_end(query) - first_key, keep_from, cols);
    score_row.head(keep_from).setConstant(minus_infinity);
    score_row.tail(cols - keep_to).setConstant(minus_infinity);
  }
  const auto& mask = problem.options.mask;
  if (!mask.empty()) {
    for (Eigen::Index c = 0; c < cols; ++c) {
      if (!mask(query, first_key + c)) score_row(c) = minus_infinity;
    }
  }
  if constexpr (!is_identity_mod<MaskMod>::value) {
    for (Eigen::Index c = 0; c < cols; ++c) {
      if (!problem.mask_mod(query, first_key + c, head)) score_row(c) = minus_infinity;
    }
  }
}

/// Turns one row of a score tile (keys [first_key, first_key + cols) of `query` in `head`)
/// into the scores the softmax sees: the bias, the score modifier, then every mask as −∞.
/// `inside_band` says the positional rules keep the whole tile.
template <typename Problem, typename Row>
EIGEN_ALWAYS_INLINE void mask_score_row(const Problem& problem, Row&& score_row, Eigen::Index query, Eigen::Index head,
                                        Eigen::Index first_key, bool inside_band) {
  add_bias_row(problem, score_row, query, first_key);
  modify_row(problem, score_row, query, head, first_key);
  mask_row(problem, score_row, query, head, first_key, inside_band);
}

/// The running maximum of a row after one more tile of its scores, NaN if a NaN score makes
/// the row NaN. Eigen's fast maxCoeff and std::max may each drop a NaN; while the maximum
/// is finite that is harmless (the NaN score's weight exp(NaN − max) is NaN, and with it
/// the row's sum, output and log-sum-exp), but a maximum of −∞ would make the tile look
/// fully masked and skip the NaN. So only then look for one: nothing in the hot path (a
/// NaN-propagating maxCoeff cost the kernel 2–5%).
template <typename Scalar, typename Row>
EIGEN_ALWAYS_INLINE Scalar running_max(Scalar row_max, const Row& score_row) {
  const Scalar new_max = std::max(row_max, score_row.maxCoeff());
  if (new_max == -std::numeric_limits<Scalar>::infinity() && score_row.hasNaN()) {
    return std::numeric_limits<Scalar>::quiet_NaN();
  }
  return new_max;
}

/// The online softmax for one row and one tile: exponentiates the row's scores against the
/// running maximum (rescaling the sum and the accumulated output when the maximum grows),
/// leaving the tile's unnormalised weights in `score_row`. Forced inline: it runs once per
/// row per tile, and a call there cost 2% of the kernel's own instructions (callgrind).
template <typename Row, typename Scalar, typename AccumulatorRow>
EIGEN_ALWAYS_INLINE void online_softmax_row(Row&& score_row, Scalar& row_max, Scalar& row_sum,
                                            AccumulatorRow&& accumulator_row) {
  constexpr Scalar minus_infinity = -std::numeric_limits<Scalar>::infinity();
  const Scalar new_max = running_max(row_max, score_row);
  if (new_max == minus_infinity) {
    score_row.setZero();  // nothing attended yet: this tile adds nothing
    return;
  }
  const Scalar correction = row_max == minus_infinity ? Scalar(0) : std::exp(row_max - new_max);
  score_row.array() = exp_of_shifted(score_row.array() - new_max);
  row_sum = row_sum * correction + score_row.sum();
  if (correction != Scalar(1)) accumulator_row *= correction;
  row_max = new_max;
}

/// `online_softmax_row` and the value accumulation together, for one row and one tile,
/// key by key, skipping every key whose score is −∞: a masked key's value is never read,
/// so garbage in it (NaN or ∞ in padding) cannot reach the output through 0·∞ = NaN, as it
/// does through the tile product. The slow path, for blocks whose output came out
/// non-finite.
template <typename Row, typename Values, typename Scalar, typename AccumulatorRow>
void online_softmax_masked_row(const Row& score_row, const Values& values, Scalar& row_max, Scalar& row_sum,
                               AccumulatorRow&& accumulator_row) {
  constexpr Scalar minus_infinity = -std::numeric_limits<Scalar>::infinity();
  const Scalar new_max = running_max(row_max, score_row);
  if (new_max == minus_infinity) return;
  const Scalar correction = row_max == minus_infinity ? Scalar(0) : std::exp(row_max - new_max);
  row_sum *= correction;
  accumulator_row *= correction;
  const flushed_exp_op<Scalar> exp_op;
  for (Eigen::Index c = 0; c < score_row.size(); ++c) {
    if (score_row(c) == minus_infinity) continue;
    const Scalar weight = exp_op(score_row(c) - new_max);
    row_sum += weight;
    accumulator_row += weight * values.row(c);
  }
  row_max = new_max;
}

/// accumulator += weights · the values [first_key, first_key + cols) of `kv_head`:
/// (rows × cols)·(cols × d_v): packed (tile_products.hpp) where `packs_tiles_v` and
/// `packs_tile` say so, else through Eigen's products in the plan's slices of keys.
template <typename Problem, typename Scalar, typename Weights, typename Accumulator>
void accumulate_values(const Problem& problem, TileSlot<Scalar>& slot, const Weights& weights, Eigen::Index kv_head,
                       Eigen::Index first_key, Accumulator&& accumulator) {
  const Eigen::Index cols = weights.cols();
  if constexpr (packs_tiles_v<Scalar, std::decay_t<decltype(problem.v)>>) {
    if (packs_tile(weights.rows())) {
      const Eigen::Index d_v = problem.plan.d_v;
      const auto [values, value_stride] =
          value_rows(stored_block(problem.v, kv_head, first_key, cols, d_v), slot.value_storage.data());
      accumulate_packed_tile(weights.data(), weights.outerStride(), weights.rows(), values, value_stride, cols, d_v,
                             accumulator.data(), accumulator.outerStride());
      return;
    }
  }
  decltype(auto) values = value_tile(problem, slot, kv_head, first_key, cols);
  const Eigen::Index slice = problem.plan.value_slice(weights.rows());
  for (Eigen::Index first = 0; first < cols; first += slice) {
    const Eigen::Index count = std::min(slice, cols - first);
    accumulator.noalias() += weights.middleCols(first, count) * values.middleRows(first, count);
  }
}

/// Attends the rows of `item.block` to the item's keys, leaving the unnormalised output, row
/// maxima and row sums in `slot`. Only keys some row of the block may attend are visited:
/// the tiles outside the causal diagonal, the window or the key padding are never computed.
/// `IsolateMasked` takes the slow path of `online_softmax_masked_row` for every row.
template <bool IsolateMasked, typename Problem, typename Scalar>
void attend_tiles(const Problem& problem, TileSlot<Scalar>& slot, const WorkItem& item) {
  using Keys = std::decay_t<decltype(problem.k)>;
  using Values = std::decay_t<decltype(problem.v)>;
  const QueryBlock& block = item.block;
  const KeyBand& band = problem.band;
  const Eigen::Index rows = block.rows();
  const Eigen::Index first_query = block.first_query;
  const Eigen::Index last_query = first_query + block.queries - 1;
  const Eigen::Index kv_head = block.first_head / problem.heads_per_kv_head;
  const Eigen::Index keys_from = std::max(item.key_begin, band.key_first(first_query));
  const Eigen::Index keys_to = std::min(item.key_end, band.key_end(last_query));
  start_rows(slot, rows, problem.plan.d_v);
  auto accumulator = slot.accumulator.topLeftCorner(rows, problem.plan.d_v);

  // The tiles of keys [keys_from, keys_to): a score tile from `scores_of(first_key, cols)`,
  // masked and softmaxed row by row, then accumulated by `accumulate(scores, first_key)`
  // (or, isolating masked keys, key by key from the value tile).
  const auto for_each_tile = [&](auto&& scores_of, auto&& accumulate) {
    for (Eigen::Index first_key = keys_from; first_key < keys_to; first_key += problem.plan.block_k) {
      const Eigen::Index cols = std::min(problem.plan.block_k, keys_to - first_key);
      ++slot.tiles;
      const bool inside_band = band.key_first(last_query) <= first_key && band.key_end(first_query) >= first_key + cols;
      auto scores = scores_of(first_key, cols);
      if constexpr (IsolateMasked) {
        decltype(auto) values = value_tile(problem, slot, kv_head, first_key, cols);
        for (Eigen::Index r = 0; r < rows; ++r) {
          mask_score_row(problem, scores.row(r), block.query_of(r), block.head_of(r), first_key, inside_band);
          online_softmax_masked_row(scores.row(r), values, slot.row_max(r), slot.row_sum(r), accumulator.row(r));
        }
      } else {
        for (Eigen::Index r = 0; r < rows; ++r) {
          mask_score_row(problem, scores.row(r), block.query_of(r), block.head_of(r), first_key, inside_band);
          online_softmax_row(scores.row(r), slot.row_max(r), slot.row_sum(r), accumulator.row(r));
        }
        accumulate(scores, first_key);
      }
    }
  };

  if constexpr (!IsolateMasked && has_stored_rows_v<Keys> && has_stored_rows_v<Values>) {
    if (rows <= row_product_max_rows) {
      const auto queries = load_queries<Eigen::RowMajor>(problem, slot, block);
      for_each_tile(
          [&](Eigen::Index first_key, Eigen::Index cols) {
            return score_tile_by_rows(problem, slot, queries, kv_head, first_key, cols);
          },
          [&](const auto& weights, Eigen::Index first_key) {
            accumulate_value_rows(row_operand(problem.v, slot.value_storage, kv_head, first_key, weights.cols()),
                                  kv_head, first_key, weights.cols(), problem.plan.d_v, weights.data(),
                                  weights.outerStride(), rows, accumulator.data(), accumulator.outerStride());
          });
      return;
    }
  }
  const auto queries = load_queries(problem, slot, block);
  for_each_tile(
      [&](Eigen::Index first_key, Eigen::Index cols) {
        return score_tile(problem, slot, queries, kv_head, first_key, cols);
      },
      [&](const auto& weights, Eigen::Index first_key) {
        accumulate_values(problem, slot, weights, kv_head, first_key, accumulator);
      });
}

/// `attend_tiles`, fast, and again key by key when the output came out non-finite: a NaN
/// or ∞ anywhere in the accumulator stays there to the end (nothing finite arithmetic does
/// turns it finite), so one check after the last tile finds every case where the tile
/// product may have read a masked key's garbage. The rerun decides which rows really are
/// non-finite. The same item takes the same path at any thread count.
template <typename Problem, typename Scalar>
void attend_query_block(const Problem& problem, TileSlot<Scalar>& slot, const WorkItem& item) {
  attend_tiles<false>(problem, slot, item);
  if (!slot.accumulator.topLeftCorner(item.block.rows(), problem.plan.d_v).allFinite()) {
    attend_tiles<true>(problem, slot, item);
  }
}

/// Normalises rows [first_row, first_row + rows) of the slot's accumulator into `out`
/// (rows × d_v) and their log-sum-exp into `lse` (rows): a row that attended nothing gets
/// zeros and −∞, a row with a NaN or +∞ score NaN in both.
template <typename Scalar, typename Out, typename Lse>
void finish_rows(TileSlot<Scalar>& slot, Eigen::Index first_row, Eigen::Index rows, Eigen::Index d_v, Out&& out,
                 Lse&& lse) {
  auto row_sum = slot.row_sum.segment(first_row, rows);
  for (Eigen::Index r = 0; r < rows; ++r) {
    const Scalar sum = row_sum(r);
    // A row that attended nothing has a zero accumulator: dividing by 1 keeps it zero. A
    // NaN sum (a NaN or +∞ score) passes through both.
    lse(r) = sum == Scalar(0) ? -std::numeric_limits<Scalar>::infinity() : slot.row_max(first_row + r) + std::log(sum);
    row_sum(r) = sum == Scalar(0) ? Scalar(1) : Scalar(1) / sum;
  }
  // One assignment, so Eigen walks `out` in its own storage order: row by row, a
  // column-major output is written with a stride of n_q and thrashes the cache.
  out.noalias() = row_sum.asDiagonal() * slot.accumulator.block(first_row, 0, rows, d_v);
}

}  // namespace attn::detail
