/// @file
/// Generating text token by token with a KV cache, as a decoder-only transformer does: a
/// toy model of two attention layers (grouped-query attention with rotary positions, a
/// residual connection each) over a 64-token vocabulary, weights random from a fixed seed,
/// tokens sampled from its output. The prompt is read in one step (prefill), then each new
/// token costs one decode step per layer: project that token, append its key and value to
/// the cache, attend over the cache.
/// At the end, one causal forward over the whole text checks that stepping changed nothing.
///
///     decode [TOKENS]     (default 256 generated tokens)

#include <chrono>
#include <cmath>
#include <cstdlib>
#include <iostream>
#include <random>
#include <vector>

#include <Eigen/Core>

#include <attn/attn.hpp>

namespace {

constexpr Eigen::Index vocabulary = 64;
constexpr Eigen::Index embed_dim = 128;
constexpr Eigen::Index num_layers = 2;

Eigen::MatrixXf random_uniform(Eigen::Index rows, Eigen::Index cols, float range, std::mt19937& rng) {
  std::uniform_real_distribution<float> uniform(-range, range);
  Eigen::MatrixXf matrix(rows, cols);
  for (Eigen::Index row = 0; row < rows; ++row) {
    for (Eigen::Index col = 0; col < cols; ++col) matrix(row, col) = uniform(rng);
  }
  return matrix;
}

/// The next token, drawn from softmax(logits) with the logits read off the last hidden
/// state through the embeddings (a tied output layer), scaled by 1/√E.
Eigen::Index next_token(const Eigen::MatrixXf& embeddings, const Eigen::RowVectorXf& hidden, std::mt19937& rng) {
  const Eigen::VectorXf logits = embeddings * hidden.transpose() / std::sqrt(float(embed_dim));
  const Eigen::VectorXf weights = attn::softmax_rows(logits.transpose()).transpose();
  std::discrete_distribution<Eigen::Index> draw(weights.data(), weights.data() + weights.size());
  return draw(rng);
}

}  // namespace

int main(int argc, char** argv) {
  const Eigen::Index to_generate = argc > 1 ? std::atoll(argv[1]) : 256;
  if (to_generate < 0) {
    std::cerr << "usage: decode [TOKENS], TOKENS >= 0\n";
    return 2;
  }
  std::mt19937 rng(7);
  const Eigen::MatrixXf embeddings = random_uniform(vocabulary, embed_dim, 1.0f, rng);

  // 8 query heads share 2 key/value heads: the cache is 4× smaller than multi-head's.
  attn::MultiHeadOptions options;
  options.num_kv_heads = 2;
  options.rope = attn::Rope{10000.0, attn::RopeStyle::halves};
  std::vector<attn::MultiHeadAttentionf> layers;
  for (Eigen::Index layer = 0; layer < num_layers; ++layer) {
    attn::MultiHeadAttentionf attention(embed_dim, 8, options);
    const float range = 1.0f / std::sqrt(float(embed_dim));
    attention.set_weights(random_uniform(embed_dim, embed_dim, range, rng),
                          random_uniform(embed_dim, attention.kv_width(), range, rng),
                          random_uniform(embed_dim, attention.kv_width(), range, rng),
                          random_uniform(embed_dim, embed_dim, range, rng));
    layers.push_back(attention);
  }

  const std::vector<Eigen::Index> prompt = {3, 14, 15, 9, 26, 5, 35, 8};
  const Eigen::Index capacity = static_cast<Eigen::Index>(prompt.size()) + to_generate;
  // Storage for the whole text up front: the cache never reallocates, and with the
  // workspace kept, the attention steps allocate nothing (the sampling below does).
  auto cache = layers.front().make_cache(num_layers, capacity);
  attn::MultiHeadWorkspace<float> workspace;
  Eigen::MatrixXf hidden;
  Eigen::MatrixXf attended;

  // One decode step of the whole model for `x` (n_new × E): each layer adds its attention.
  const auto step = [&](const Eigen::MatrixXf& x) {
    hidden = x;
    for (Eigen::Index layer = 0; layer < num_layers; ++layer) {
      layers[static_cast<std::size_t>(layer)].decode_into(hidden, cache, layer, {}, attended, workspace);
      hidden += attended;
    }
  };

  std::vector<Eigen::Index> text = prompt;
  Eigen::MatrixXf prompt_embeddings(prompt.size(), embed_dim);
  for (std::size_t i = 0; i < prompt.size(); ++i) prompt_embeddings.row(Eigen::Index(i)) = embeddings.row(prompt[i]);
  step(prompt_embeddings);  // prefill

  const auto start = std::chrono::steady_clock::now();
  Eigen::MatrixXf token_embedding(1, embed_dim);
  for (Eigen::Index generated = 0; generated < to_generate; ++generated) {
    text.push_back(next_token(embeddings, hidden.bottomRows(1), rng));
    token_embedding = embeddings.row(text.back());
    step(token_embedding);
  }
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();

  std::cout << "prompt:   ";
  for (std::size_t i = 0; i < prompt.size(); ++i) std::cout << text[i] << ' ';
  std::cout << "\ngenerated:";
  for (std::size_t i = prompt.size(); i < text.size() && i < prompt.size() + 24; ++i) std::cout << ' ' << text[i];
  if (to_generate > 24) std::cout << " …";
  std::cout << "\n" << to_generate << " tokens (sampling included) in " << seconds * 1e3 << " ms: " << double(to_generate) / seconds
            << " tokens/s (" << num_layers << " layers, cache of " << cache.size(0) << " tokens, "
            << cache.bytes() / 1024 << " KiB)\n";

  // The same text in one causal forward per layer gives the same last hidden state.
  Eigen::MatrixXf whole(static_cast<Eigen::Index>(text.size()), embed_dim);
  for (Eigen::Index i = 0; i < whole.rows(); ++i) whole.row(i) = embeddings.row(text[static_cast<std::size_t>(i)]);
  attn::AttentionOptionsf causal;
  causal.causal = true;
  for (const auto& layer : layers) whole += layer.forward(whole, whole, whole, causal);
  const float difference = (whole.bottomRows(1) - hidden.bottomRows(1)).cwiseAbs().maxCoeff();
  std::cout << "last hidden state, stepped vs one causal forward: max difference " << difference << '\n';
  return difference <= 1e-4f ? EXIT_SUCCESS : EXIT_FAILURE;
}
