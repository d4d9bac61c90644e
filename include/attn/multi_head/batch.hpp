#pragma once
/// @file
/// `MultiHeadAttention::forward_batch`: sequences of any lengths, without padding, in
/// parallel across sequences (or across heads when there are fewer sequences than threads).

#include <algorithm>
#include <cstddef>
#include <string>
#include <vector>

#include <Eigen/Core>

#include "../detail/parallel.hpp"
#include "../error.hpp"
#include "module.hpp"

namespace attn {

template <typename Scalar>
template <typename SequenceQ, typename SequenceK, typename SequenceV>
auto MultiHeadAttention<Scalar>::forward_batch(const std::vector<SequenceQ>& queries,
                                               const std::vector<SequenceK>& keys,
                                               const std::vector<SequenceV>& values,
                                               const AttentionOptions<Scalar>& options) const -> std::vector<Matrix> {
  constexpr const char* operation = "attn::MultiHeadAttention::forward_batch";
  // Every check before any work, whatever the batch's size, so that bad options or a bad
  // sequence throw before threads start.
  detail::validate_sizeless_options(operation, options);
  if (!options.mask.empty() || !options.bias.empty()) {
    detail::raise<std::invalid_argument>(operation,
                                         ": options.mask and options.bias have one sequence's shape; pass "
                                         "per-sequence masks to forward() instead");
  }
  if (keys.size() != queries.size() || values.size() != queries.size()) {
    detail::raise<dimension_error>(operation, ": the batch has ", queries.size(), " query sequences but ", keys.size(),
                                   " key and ", values.size(), " value sequences");
  }
  const Eigen::Index batch = static_cast<Eigen::Index>(queries.size());
  for (Eigen::Index i = 0; i < batch; ++i) {
    const auto at = static_cast<std::size_t>(i);
    const std::string name = detail::message(operation, " (sequence ", i, ")");
    check_inputs(name.c_str(), queries[at], keys[at], values[at], options);
  }
  std::vector<Matrix> outputs(queries.size());
  for (std::size_t at = 0; at < queries.size(); ++at) outputs[at].resize(queries[at].rows(), embed_dim());
  const int threads = detail::resolve_thread_count(options.num_threads);
  if (batch >= threads) {
    // Sequences in parallel, each on one thread.
    const auto sequence_threads = static_cast<std::size_t>(std::min<Eigen::Index>(threads, batch));
    std::vector<MultiHeadWorkspace<Scalar>> workspaces(sequence_threads);
    AttentionOptions<Scalar> sequential = options;
    sequential.num_threads = 1;
    detail::parallel_for(batch, static_cast<int>(workspaces.size()), [&](Eigen::Index i, int thread) {
      const auto at = static_cast<std::size_t>(i);
      forward_unchecked(queries[at], keys[at], values[at], sequential, outputs[at],
                        workspaces[static_cast<std::size_t>(thread)]);
    });
  } else {
    // Fewer sequences than threads: one at a time, heads and query blocks in parallel.
    MultiHeadWorkspace<Scalar> workspace;
    for (std::size_t at = 0; at < queries.size(); ++at) {
      forward_unchecked(queries[at], keys[at], values[at], options, outputs[at], workspace);
    }
  }
  return outputs;
}

}  // namespace attn
