#pragma once
/// @file
/// Masks: which keys each query may attend, as explicit bool matrices (`true` = may
/// attend) and applied to a score matrix. The rules are documented on
/// `attn::AttentionOptions`.

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>

#include <Eigen/Core>

#include "detail/operands.hpp"
#include "error.hpp"
#include "options.hpp"

namespace attn {

/// A bool matrix of n_q×n_k, `true` = may attend.
using MaskMatrix = Eigen::Matrix<bool, Eigen::Dynamic, Eigen::Dynamic>;

/// The causal rule, aligned bottom-right: query i of n_q may attend key j of n_k iff
/// j ≤ i + (n_k − n_q).
constexpr bool causal_allows(Eigen::Index query, Eigen::Index key, Eigen::Index n_q, Eigen::Index n_k) noexcept {
  return key <= query + (n_k - n_q);
}


/// The causal rule as an explicit n_q×n_k matrix.
inline MaskMatrix causal_mask(Eigen::Index n_q, Eigen::Index n_k) {
  MaskMatrix mask(n_q, n_k);
  for (Eigen::Index key = 0; key < n_k; ++key) {
    for (Eigen::Index query = 0; query < n_q; ++query) mask(query, key) = causal_allows(query, key, n_q, n_k);
  }
  return mask;
}

/// Sliding-window attention as an explicit n_q×n_k matrix (see `AttentionOptions::window`).
inline MaskMatrix sliding_window_mask(Eigen::Index n_q, Eigen::Index n_k, SlidingWindow window) {
  MaskMatrix mask(n_q, n_k);
  const Eigen::Index offset = n_k - n_q;
  // Wider than both sequences is unbounded; capping keeps the sums below from overflowing.
  if (window.left > n_q + n_k) window.left = n_q + n_k;
  if (window.right > n_q + n_k) window.right = n_q + n_k;
  for (Eigen::Index key = 0; key < n_k; ++key) {
    for (Eigen::Index query = 0; query < n_q; ++query) {
      mask(query, key) = (window.left < 0 || key >= query + offset - window.left) &&
                         (window.right < 0 || key <= query + offset + window.right);
    }
  }
  return mask;
}

/// Key padding as an explicit n_q×n_k matrix: the first `valid_keys` keys may be attended.
inline MaskMatrix key_padding_mask(Eigen::Index n_q, Eigen::Index n_k, Eigen::Index valid_keys) {
  MaskMatrix mask(n_q, n_k);
  for (Eigen::Index key = 0; key < n_k; ++key) mask.col(key).setConstant(key < valid_keys);
  return mask;
}

namespace detail {

/// The rules that depend only on positions (causal, window, valid_keys) keep, for each
/// query, one contiguous band of keys, and for each key one contiguous band of queries:
/// both bands move right as the other index grows. Masking and the tiled kernel's tile
/// skipping both work from these bounds.
class KeyBand {
 public:
  template <typename Scalar>
  KeyBand(const AttentionOptions<Scalar>& options, Eigen::Index n_q, Eigen::Index n_k)
      : n_q_(n_q),
        offset_(n_k - n_q),
        left_(bounded_side(options.window ? options.window->left : -1, n_q, n_k)),
        right_(options.causal ? 0 : bounded_side(options.window ? options.window->right : -1, n_q, n_k)),
        key_end_(options.valid_keys ? *options.valid_keys : n_k) {}

  /// Query i may attend keys [key_first(i), key_end(i)); empty when key_end ≤ key_first.
  Eigen::Index key_first(Eigen::Index query) const noexcept {
    return left_ < 0 ? 0 : std::clamp<Eigen::Index>(query + offset_ - left_, 0, key_end_);
  }
  Eigen::Index key_end(Eigen::Index query) const noexcept {
    const Eigen::Index end = right_ < 0 ? key_end_ : std::clamp<Eigen::Index>(query + offset_ + right_ + 1, 0, key_end_);
    return std::max(end, key_first(query));
  }
  /// Key j may be attended by queries [query_first(j), query_end(j)).
  Eigen::Index query_first(Eigen::Index key) const noexcept {
    if (key >= key_end_) return n_q_;
    return right_ < 0 ? 0 : std::clamp<Eigen::Index>(key - offset_ - right_, 0, n_q_);
  }
  Eigen::Index query_end(Eigen::Index key) const noexcept {
    if (key >= key_end_) return n_q_;
    const Eigen::Index end = left_ < 0 ? n_q_ : std::clamp<Eigen::Index>(key - offset_ + left_ + 1, 0, n_q_);
    return std::max(end, query_first(key));
  }
  /// One past the last key any query may attend: keys beyond it are padding.
  Eigen::Index key_limit() const noexcept { return key_end_; }

  /// A window side wider than both sequences reaches everything: cap it there, so that
  /// index arithmetic with it cannot overflow (a side of INT64_MAX would wrap around).
  static Eigen::Index bounded_side(Eigen::Index side, Eigen::Index n_q, Eigen::Index n_k) noexcept {
    return side < 0 ? side : std::min(side, n_q + n_k);
  }

 private:
  Eigen::Index n_q_;
  Eigen::Index offset_;
  Eigen::Index left_;   // −1: unbounded
  Eigen::Index right_;  // −1: unbounded
  Eigen::Index key_end_;
};

/// score + bias as the options define it: a bias of −∞ masks its key whatever the score
/// (NaN and +∞ included, so that garbage in a padded key cannot leak through a float mask),
/// and two finite terms whose sum overflows saturate at ±max() instead: a finite bias
/// never masks a key (−∞) nor turns its row NaN (+∞ − +∞). Vectorised, as the bias is added
/// to every score of a tile.
template <typename Scalar>
struct biased_score_op {
  Scalar operator()(Scalar score, Scalar bias) const {
    constexpr Scalar infinity = std::numeric_limits<Scalar>::infinity();
    if (bias == -infinity) return -infinity;
    const Scalar sum = score + bias;
    if (std::isfinite(score) && std::isfinite(bias)) {
      return std::clamp(sum, std::numeric_limits<Scalar>::lowest(), std::numeric_limits<Scalar>::max());
    }
    return sum;
  }

  template <typename Packet>
  Packet packetOp(const Packet& score, const Packet& bias) const {
    namespace internal = Eigen::internal;
    using Limits = std::numeric_limits<Scalar>;
    const Packet infinity = internal::pset1<Packet>(Limits::infinity());
    const Packet sum = internal::padd(score, bias);
    // |x| < ∞ is false for ±∞ and for NaN.
    const Packet finite_terms = internal::pand(internal::pcmp_lt(internal::pabs(score), infinity),
                                               internal::pcmp_lt(internal::pabs(bias), infinity));
    const Packet saturated = internal::pmin(internal::pmax(sum, internal::pset1<Packet>(Limits::lowest())),
                                            internal::pset1<Packet>(Limits::max()));
    const Packet biased = internal::pselect(finite_terms, saturated, sum);
    const Packet masking = internal::pcmp_eq(bias, internal::pnegate(infinity));
    return internal::pselect(masking, internal::pnegate(infinity), biased);
  }
};

}  // namespace detail
}  // namespace attn

namespace Eigen::internal {
template <typename Scalar>
struct functor_traits<attn::detail::biased_score_op<Scalar>> {
  enum { Cost = 8 * NumTraits<Scalar>::AddCost, PacketAccess = packet_traits<Scalar>::HasAbs };
};
}  // namespace Eigen::internal

namespace attn {
namespace detail {

/// Adds the options' bias to an n_q×n_k score matrix (as `biased_score_op`), without
/// checking the options.
template <typename Derived, typename Scalar>
void add_bias_unchecked(Eigen::MatrixBase<Derived>& scores, const AttentionOptions<Scalar>& options) {
  // An empty matrix may have a null data pointer that not even a zero-length row may offset.
  if (scores.size() == 0 || options.bias.empty()) return;
  scores = scores.binaryExpr(options.bias.map(), biased_score_op<Scalar>{});
}

/// Sets every score the options mask (keep-mask, causal, window, key padding) to −∞,
/// without checking the options.
template <typename Derived, typename Scalar>
void apply_masks_unchecked(Eigen::MatrixBase<Derived>& scores, const AttentionOptions<Scalar>& options) {
  constexpr Scalar masked = -std::numeric_limits<Scalar>::infinity();
  const Eigen::Index n_q = scores.rows();
  const Eigen::Index n_k = scores.cols();
  if (n_q == 0 || n_k == 0) return;
  if (!options.mask.empty()) {
    for (Eigen::Index key = 0; key < n_k; ++key) {
      for (Eigen::Index query = 0; query < n_q; ++query) {
        if (!options.mask(query, key)) scores(query, key) = masked;
      }
    }
  }
  if (!options.causal && !options.window && !options.valid_keys) return;
  const KeyBand band(options, n_q, n_k);
  // Walk the storage order: row ends for row-major, column ends for column-major
  // (strided writes across a column-major matrix cost ~100× more at n = 1024).
  if constexpr (Derived::IsRowMajor) {
    for (Eigen::Index query = 0; query < n_q; ++query) {
      scores.row(query).head(band.key_first(query)).setConstant(masked);
      scores.row(query).tail(n_k - band.key_end(query)).setConstant(masked);
    }
  } else {
    for (Eigen::Index key = 0; key < n_k; ++key) {
      scores.col(key).head(band.query_first(key)).setConstant(masked);
      scores.col(key).tail(n_q - band.query_end(key)).setConstant(masked);
    }
  }
}

}  // namespace detail

/// Applies `options`' bias and masks to an n_q×n_k score matrix in place: the bias is added
/// and every masked score becomes −∞, ready for `softmax_rows_inplace`. The scale is not
/// applied here (`scaled_scores` does that).
template <typename Scores, typename Scalar>
void mask_scores_inplace(Scores&& scores, const AttentionOptions<Scalar>& options) {
  detail::require_writable<Scores>();
  // Only the static_assert above speaks for a const or expression argument.
  if constexpr (detail::is_writable_matrix_v<Scores>) {
    static_assert(std::is_same_v<typename std::decay_t<Scores>::Scalar, Scalar>,
                  "attn::mask_scores_inplace: the options must have the scores' scalar type");
    detail::validate_options("attn::mask_scores_inplace", options, scores.rows(), scores.cols());
    detail::add_bias_unchecked(scores, options);
    detail::apply_masks_unchecked(scores, options);
  }
}

}  // namespace attn
