/// @file
/// Training an attention layer in C++: one `MultiHeadAttention` (2 heads, E = 8) learns to
/// copy the marked token of a sequence to every position, from random data, with Adam on
/// the mean squared error. Each token is 7 random features and a mark (1 on one token of
/// the sequence, 0 elsewhere); the target at every position is the marked token's
/// features. The layer can only solve it by attention: every query must find the one key
/// whose mark is set, whatever its position. The gradients come from
/// `MultiHeadAttention::backward_into` (deterministic at any thread count); the loss falls
/// from 0.22 to 0.0002 in 400 steps (a quarter of a second). Exits non-zero if it does not
/// fall below 0.01, so the suite runs it as a test.
///
///     train [STEPS]     (default 400)

#include <cmath>
#include <cstdlib>
#include <iostream>
#include <random>

#include <Eigen/Core>

#include <attn/attn.hpp>

namespace {

constexpr Eigen::Index embed_dim = 8;
constexpr Eigen::Index num_heads = 2;
constexpr Eigen::Index sequence_length = 12;
constexpr Eigen::Index batch_size = 16;

using Matrix = Eigen::MatrixXf;

/// A sequence and its target: random features, one marked token, the marked token's
/// features everywhere.
struct Example {
  Matrix tokens;  // (sequence_length × E)
  Matrix target;  // (sequence_length × E)
};

Example make_example(std::mt19937& rng) {
  std::normal_distribution<float> normal(0.0f, 0.5f);
  std::uniform_int_distribution<Eigen::Index> position(0, sequence_length - 1);
  Example example{Matrix::Zero(sequence_length, embed_dim), Matrix::Zero(sequence_length, embed_dim)};
  for (Eigen::Index t = 0; t < sequence_length; ++t) {
    for (Eigen::Index f = 0; f + 1 < embed_dim; ++f) example.tokens(t, f) = normal(rng);
  }
  const Eigen::Index marked = position(rng);
  example.tokens(marked, embed_dim - 1) = 1.0f;
  example.target.rowwise() = example.tokens.row(marked);
  example.target.col(embed_dim - 1).setZero();
  return example;
}

/// Adam (Kingma & Ba 2015) for one parameter matrix: its two moment estimates.
struct AdamState {
  Matrix first, second;

  void step(Matrix& parameter, const Matrix& gradient, float learning_rate, int t) {
    constexpr float beta1 = 0.9f, beta2 = 0.999f, epsilon = 1e-8f;
    if (first.size() == 0) {
      first = Matrix::Zero(parameter.rows(), parameter.cols());
      second = Matrix::Zero(parameter.rows(), parameter.cols());
    }
    first = beta1 * first + (1 - beta1) * gradient;
    second = beta2 * second + (1 - beta2) * gradient.cwiseAbs2();
    const float correction1 = 1 - std::pow(beta1, float(t));
    const float correction2 = 1 - std::pow(beta2, float(t));
    parameter.array() -= learning_rate * (first.array() / correction1) /
                         ((second.array() / correction2).sqrt() + epsilon);
  }
};

/// The layer's eight parameters, the gradients summed over a batch, and Adam's state.
struct Trainer {
  attn::MultiHeadAttentionf layer{embed_dim, num_heads};
  Matrix weights[4];     // W_q, W_k, W_v, W_o
  Matrix biases[4];      // b_q, b_k, b_v, b_o, as 1×E matrices
  Matrix weight_sums[4];
  Matrix bias_sums[4];
  AdamState weight_adam[4], bias_adam[4];
  attn::MultiHeadGradients<float> gradients;
  attn::MultiHeadBackwardWorkspacef workspace;

  explicit Trainer(std::mt19937& rng) {
    std::normal_distribution<float> normal(0.0f, 1.0f / std::sqrt(float(embed_dim)));
    for (int p = 0; p < 4; ++p) {
      weights[p] = Matrix::NullaryExpr(embed_dim, embed_dim, [&] { return normal(rng); });
      biases[p] = Matrix::Zero(1, embed_dim);
    }
    load();
  }

  void load() {
    layer.set_weights(weights[0], weights[1], weights[2], weights[3]);
    layer.set_biases(biases[0], biases[1], biases[2], biases[3]);
  }

  /// One step of Adam on a batch; returns the batch's mean squared error before the step.
  float train_step(std::mt19937& rng, float learning_rate, int t) {
    for (int p = 0; p < 4; ++p) {
      weight_sums[p] = Matrix::Zero(embed_dim, embed_dim);
      bias_sums[p] = Matrix::Zero(1, embed_dim);
    }
    float loss = 0;
    const float count = float(batch_size * sequence_length * embed_dim);
    for (Eigen::Index b = 0; b < batch_size; ++b) {
      const Example example = make_example(rng);
      const Matrix out = layer.forward(example.tokens, example.tokens, example.tokens);
      const Matrix error = out - example.target;
      loss += error.squaredNorm() / count;
      // dLoss/dout of the mean squared error.
      const Matrix d_out = (2.0f / count) * error;
      layer.backward_into(example.tokens, example.tokens, example.tokens, {}, d_out, gradients, workspace);
      weight_sums[0] += gradients.query_weight;
      weight_sums[1] += gradients.key_weight;
      weight_sums[2] += gradients.value_weight;
      weight_sums[3] += gradients.output_weight;
      bias_sums[0] += gradients.query_bias;
      bias_sums[1] += gradients.key_bias;
      bias_sums[2] += gradients.value_bias;
      bias_sums[3] += gradients.output_bias;
    }
    for (int p = 0; p < 4; ++p) {
      weight_adam[p].step(weights[p], weight_sums[p], learning_rate, t);
      bias_adam[p].step(biases[p], bias_sums[p], learning_rate, t);
    }
    load();
    return loss;
  }
};

}  // namespace

int main(int argc, char** argv) {
  const int steps = argc > 1 ? std::atoi(argv[1]) : 400;
  if (steps <= 0) {
    std::cerr << "usage: train [STEPS]   (a positive number of steps)\n";
    return 2;
  }
  std::mt19937 rng(7);
  Trainer trainer(rng);
  std::cout << "Training one attention layer (E = " << embed_dim << ", " << num_heads
            << " heads) to copy the marked token, " << batch_size << " sequences of " << sequence_length
            << " tokens per step.\n";
  float first_loss = 0, loss = 0;
  for (int t = 1; t <= steps; ++t) {
    loss = trainer.train_step(rng, 0.01f, t);
    if (t == 1) first_loss = loss;
    if (t == 1 || t % 50 == 0) std::cout << "step " << t << "  loss " << loss << "\n";
  }
  const bool learned = loss < 0.1f * first_loss && loss < 0.01f;
  std::cout << (learned ? "Learned: the loss fell from " : "Did not learn: the loss went from ") << first_loss
            << " to " << loss << ".\n";
  // Fewer steps than the default are a demonstration, not a test of learning.
  return learned || steps < 400 ? 0 : 1;
}
