/// @file
/// Causal self-attention over a short sentence, the way a decoder (GPT-style) model reads:
/// each word may look at itself and the words before it, never ahead. Embeddings and
/// weights are random from a fixed seed (a trained model would have learned them), and
/// the attention weights are drawn as a text heatmap with the words as labels.

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <random>
#include <string>
#include <vector>

#include <Eigen/Core>

#include <attn/attn.hpp>

namespace {

/// A rows×cols matrix of normal draws with the given standard deviation, filled row by
/// row so that the numbers do not depend on Eigen's evaluation order. (std::normal_distribution
/// is not specified bit for bit: another standard library may draw other numbers.)
Eigen::MatrixXf random_normal(Eigen::Index rows, Eigen::Index cols, float stddev, std::mt19937& rng) {
  std::normal_distribution<float> normal(0.0f, stddev);
  Eigen::MatrixXf matrix(rows, cols);
  for (Eigen::Index row = 0; row < rows; ++row) {
    for (Eigen::Index col = 0; col < cols; ++col) matrix(row, col) = normal(rng);
  }
  return matrix;
}

/// One shade per tenth of weight, from ' ' (exactly 0: masked) to '@' (1). Any weight
/// above 0 gets at least '.', so that "attended a little" and "masked" look different.
char shade(float weight) {
  static constexpr char shades[] = " .:-=+*#%@";
  constexpr int levels = static_cast<int>(sizeof(shades)) - 2;  // 9, not counting ' ' and '\0'
  if (weight <= 0.0f) return shades[0];
  const int level = static_cast<int>(std::lround(weight * levels));
  return shades[std::clamp(level, 1, levels)];
}

std::string label(const std::string& word, int width) {
  std::string text = word.substr(0, static_cast<std::size_t>(width));
  return text + std::string(static_cast<std::size_t>(width) - text.size(), ' ');
}

void print_header(const std::vector<std::string>& words, int width) {
  std::cout << "  " << label("", width);
  for (const std::string& word : words) std::cout << ' ' << label(word, width);
  std::cout << '\n';
}

}  // namespace

int main() {
  const std::vector<std::string> words{"the", "cat", "sat", "on", "a", "warm", "mat"};
  const auto n = static_cast<Eigen::Index>(words.size());
  constexpr Eigen::Index d_model = 16;
  constexpr Eigen::Index d_k = 8;
  constexpr Eigen::Index d_v = 8;
  constexpr int width = 5;  // characters per heatmap cell and label

  std::mt19937 rng(2017);
  // x: (n × d_model), one embedding per word, entries of variance 1.
  const Eigen::MatrixXf x = random_normal(n, d_model, 1.0f, rng);
  // Weights with standard deviation 1/√d_model keep q, k and v entries near variance 1
  // (LeCun initialisation), so the scores spread as they would in a freshly initialised model.
  const float weight_stddev = 1.0f / std::sqrt(static_cast<float>(d_model));
  const Eigen::MatrixXf w_q = random_normal(d_model, d_k, weight_stddev, rng);
  const Eigen::MatrixXf w_k = random_normal(d_model, d_k, weight_stddev, rng);
  const Eigen::MatrixXf w_v = random_normal(d_model, d_v, weight_stddev, rng);
  const attn::QKVProjectionf projection(w_q, w_k, w_v);

  std::cout << "Causal self-attention over \"";
  for (Eigen::Index i = 0; i < n; ++i) std::cout << (i == 0 ? "" : " ") << words[static_cast<std::size_t>(i)];
  std::cout << "\": " << n << " words, d_model = " << d_model << ", d_k = d_v = " << d_k << ",\n"
            << "random embeddings and weights (seed 2017), scale 1/sqrt(d_k).\n\n";

  // causal: word i attends words 0 … i only, as a model generating text left to right must.
  attn::AttentionOptionsf options;
  options.causal = true;
  Eigen::MatrixXf weights;  // (n × n), resized by the call
  const Eigen::MatrixXf output = attn::self_attention(x, projection, options, weights);
  std::cout << "output: " << output.rows() << " x " << output.cols() << " (one " << d_v
            << "-d vector per word); weights: " << weights.rows() << " x " << weights.cols() << "\n\n";

  std::cout << "Attention weights as a heatmap: row = the word asking (query), column = the word\n"
            << "looked at (key). Shades \" .:-=+*#%@\" run from 0 (blank: masked) to 1 ('@').\n\n";
  print_header(words, width);
  for (Eigen::Index i = 0; i < n; ++i) {
    std::cout << "  " << label(words[static_cast<std::size_t>(i)], width);
    for (Eigen::Index j = 0; j < n; ++j) std::cout << ' ' << std::string(width, shade(weights(i, j)));
    std::cout << '\n';
  }

  std::cout << "\nThe same weights as numbers (a bare 0 is exactly zero, 0.000 is merely small):\n\n";
  print_header(words, width);
  for (Eigen::Index i = 0; i < n; ++i) {
    std::cout << "  " << label(words[static_cast<std::size_t>(i)], width);
    char cell[32];
    for (Eigen::Index j = 0; j < n; ++j) {
      const float weight = weights(i, j);
      if (weight == 0.0f) {
        std::snprintf(cell, sizeof cell, " %*s", width, "0");
      } else {
        std::snprintf(cell, sizeof cell, " %*.3f", width, static_cast<double>(weight));
      }
      std::cout << cell;
    }
    std::cout << '\n';
  }

  // Each row is a probability distribution over the keys the word may see, and every key
  // ahead of the word is masked to −∞ before the softmax, so its weight is exactly 0.
  const float row_sum_error = (weights.rowwise().sum().array() - 1.0f).abs().maxCoeff();
  const Eigen::MatrixXf above_diagonal = weights.triangularView<Eigen::StrictlyUpper>();
  const bool future_is_zero = (above_diagonal.array() == 0.0f).all();
  const bool rows_sum_to_one = row_sum_error <= 8.0f * static_cast<float>(n) * Eigen::NumTraits<float>::epsilon();
  std::cout << "\nEvery row sums to 1: max |row sum - 1| = " << row_sum_error << (rows_sum_to_one ? " (ok)" : " (FAIL)")
            << "\nThe upper triangle (the future) is exactly 0: ";
  if (future_is_zero) {
    std::cout << "yes\n";
  } else {
    std::cout << "NO, its largest weight is " << above_diagonal.maxCoeff() << '\n';
  }
  // A failed check fails the run, so that the example doubles as a smoke test of the masks.
  return rows_sum_to_one && future_is_zero ? EXIT_SUCCESS : EXIT_FAILURE;
}
