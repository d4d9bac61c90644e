#pragma once
/// @file
/// `attn::AttentionOptions`: the scale and the masks an attention call applies, and their
/// validation against the call's n_q×n_k score matrix.

#include <optional>
#include <sstream>
#include <string>

#include <Eigen/Core>

#include "error.hpp"
#include "matrix_view.hpp"

namespace attn {

/// A sliding window of keys around each query's diagonal; −1 = unbounded on that side.
struct SlidingWindow {
  Eigen::Index left = -1;
  Eigen::Index right = -1;
};

/// How an attention call scores and masks. Every field is optional; the defaults give
/// plain softmax(Q·Kᵀ/√d_k)·V over all keys.
///
/// Which keys query i may attend (key j is kept iff every present rule keeps it):
/// - `causal`: j ≤ i + (n_k − n_q), aligned bottom-right as FlashAttention and ONNX do, so
///   that the last query always sees the last key: a block of new queries at the end of a
///   longer key sequence (decoding with a KV cache) sees the whole cache plus its own past.
///   For n_q = n_k this is the usual j ≤ i. PyTorch's `is_causal` aligns top-left instead
///   (j ≤ i whatever n_k); the two differ only when n_q ≠ n_k.
/// - `mask`: an n_q×n_k bool matrix, `true` = may attend (the opposite of PyTorch's boolean
///   `attn_mask` and `key_padding_mask`, where `true` = masked).
/// - `valid_keys`: keys 0 … valid_keys−1 are real, the rest are padding.
/// - `window`: sliding-window (local) attention as FlashAttention's `window_size`, with
///   the same bottom-right alignment: j ≥ i + (n_k − n_q) − left and
///   j ≤ i + (n_k − n_q) + right, where −1 leaves that side unbounded. With `causal`, the
///   right side is 0 whatever `right` says.
/// - `bias`: an n_q×n_k matrix added to the scaled scores (ALiBi, relative positions, a
///   float mask); an entry of −∞ masks its key as the rules above do.
///
/// A query whose keys are all masked gets an output row of zeros and weights of zeros,
/// never NaN (PyTorch's MultiheadAttention returns NaN there).
///
/// `mask` and `bias` are views: the matrices they refer to must outlive the call.
template <typename Scalar>
struct AttentionOptions {
  /// Multiplies Q·Kᵀ; must be finite and positive. Absent: 1/√d_k (`attn::default_scale`).
  std::optional<Scalar> scale;
  bool causal = false;
  MatrixView<bool> mask;
  MatrixView<Scalar> bias;
  std::optional<Eigen::Index> valid_keys;
  std::optional<SlidingWindow> window;
  /// Threads for the tiled kernel (`flash_attention`): 1 = sequential, 0 = as many as
  /// OpenMP offers. A larger count is capped at what OpenMP offers, `omp_get_max_threads()`
  /// (OMP_NUM_THREADS or `omp_set_num_threads`, by default one per core): raise that to run
  /// more. Without OpenMP the kernel runs sequentially whatever this says. The result is
  /// bitwise the same for every thread count. The reference path ignores it.
  int num_threads = 1;
};

using AttentionOptionsf = AttentionOptions<float>;
using AttentionOptionsd = AttentionOptions<double>;

namespace detail {

/// Checks the options that hold whatever the sizes: the scale, the window's sides, the
/// thread count.
template <typename Scalar>
void validate_sizeless_options(const char* operation, const AttentionOptions<Scalar>& options) {
  if (options.scale) require_valid_scale(operation, *options.scale);
  if (options.window && (options.window->left < -1 || options.window->right < -1)) {
    raise<std::invalid_argument>(operation, ": window sides must be -1 (unbounded) or at least 0, got left = ",
                                 options.window->left, ", right = ", options.window->right);
  }
  if (options.num_threads < 0) {
    raise<std::invalid_argument>(operation, ": num_threads must be 0 (all) or positive, got ", options.num_threads);
  }
}

/// Checks every option against an n_q×n_k score matrix: O(1), whatever the sizes.
template <typename Scalar>
void validate_options(const char* operation, const AttentionOptions<Scalar>& options, Eigen::Index n_q,
                      Eigen::Index n_k) {
  validate_sizeless_options(operation, options);
  if (!options.mask.empty()) {
    require_shape(operation, Operand{"mask", options.mask.rows(), options.mask.cols()}, n_q, n_k, "n_q x n_k");
  }
  if (!options.bias.empty()) {
    require_shape(operation, Operand{"bias", options.bias.rows(), options.bias.cols()}, n_q, n_k, "n_q x n_k");
  }
  if (options.valid_keys && (*options.valid_keys < 0 || *options.valid_keys > n_k)) {
    raise<std::invalid_argument>(operation, ": valid_keys must be between 0 and n_k = ", n_k, ", got ",
                                 *options.valid_keys);
  }
}

/// The default scale 1/√d_k needs d_k > 0; with d_k = 0 the caller must give a scale.
template <typename Scalar>
void require_defined_scale(const char* operation, const AttentionOptions<Scalar>& options, Eigen::Index d_k) {
  if (!options.scale && d_k == 0) {
    raise<std::invalid_argument>(operation,
                                 ": d_k is 0, so the default scale 1/sqrt(d_k) is undefined; set options.scale");
  }
}

}  // namespace detail
}  // namespace attn
