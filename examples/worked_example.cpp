/// @file
/// Self-attention by hand, in the eight steps of the worked example attn started from (a
/// Chinese tutorial on dot-product self-attention): three 4-dimensional inputs,
/// 3-dimensional keys, queries and values, every intermediate matrix printed. Then the same
/// computation in one call, and once more with the 1/√d_k scale of Vaswani et al. 2017
/// ("Attention Is All You Need") that real models use.

#include <iostream>
#include <sstream>
#include <string>

#include <Eigen/Core>

#include <attn/attn.hpp>

namespace {

// One token per row, columns aligned, a fixed number of decimals (std::fixed is set in
// main): none for the tutorial's whole numbers, three for the weights, two for the rest.
template <typename Derived>
void show(const std::string& caption, const Eigen::MatrixBase<Derived>& matrix, int decimals = 2) {
  // The stream's precision, not IOFormat's: Eigen reads an IOFormat precision of 0 as
  // "leave the stream's precision alone".
  const Eigen::IOFormat format(Eigen::StreamPrecision, 0, ", ", "\n", "    [", "]");
  const std::streamsize saved_precision = std::cout.precision(decimals);
  std::cout << caption << '\n' << matrix.format(format) << "\n\n";
  std::cout.precision(saved_precision);
}

void step(int number, const std::string& title) {
  std::cout << "== Step " << number << ": " << title << " ==\n";
}

}  // namespace

int main() {
  std::cout << std::fixed;
  std::cout.precision(3);

  // Step 1: three inputs (tokens), each a vector of d_model = 4 numbers, one per row.
  step(1, "prepare the inputs");
  Eigen::Matrix<float, 3, 4> x;
  x << 1, 0, 1, 0,  // input 1
      0, 2, 0, 2,   // input 2
      1, 1, 1, 1;   // input 3
  show("x: three inputs of d_model = 4, one per row (3 x 4)", x, 0);

  // Step 2: the learned parameters. Each maps a 4-d input to a 3-d key, query or value.
  step(2, "initialise the weights");
  Eigen::Matrix<float, 4, 3> w_key;
  w_key << 0, 0, 1,  //
      1, 1, 0,       //
      0, 1, 0,       //
      1, 1, 0;
  Eigen::Matrix<float, 4, 3> w_query;
  w_query << 1, 0, 1,  //
      1, 0, 0,         //
      0, 0, 1,         //
      0, 1, 1;
  Eigen::Matrix<float, 4, 3> w_value;
  w_value << 0, 2, 0,  //
      0, 3, 0,         //
      1, 0, 3,         //
      1, 1, 0;
  show("w_key: turns an input into the key other inputs match against (4 x 3)", w_key, 0);
  show("w_query: turns an input into the query it asks with (4 x 3)", w_query, 0);
  show("w_value: turns an input into the value it hands on (4 x 3)", w_value, 0);

  // Step 3: project every input at once, K = x·w_key and so on. All sizes are fixed at
  // compile time, so this runs on the stack. Note the argument order: query, key, value.
  step(3, "derive keys, queries and values");
  const attn::QKVProjection<float, 4, 3, 3> projection(w_query, w_key, w_value);
  const auto qkv = projection.project(x);
  show("keys = x * w_key: one key per input (3 x 3)", qkv.k, 0);
  show("queries = x * w_query: one query per input (3 x 3)", qkv.q, 0);
  show("values = x * w_value: one value per input (3 x 3)", qkv.v, 0);

  // Step 4: input 1's query is compared with every key, its own included, by a dot
  // product. The tutorial uses no scale, i.e. scale = 1; we come back to that at the end.
  step(4, "attention scores for input 1");
  const Eigen::Matrix3f scores = attn::scaled_scores(qkv.q, qkv.k, 1.0f);
  show("scores of input 1 = query 1 . (key 1, key 2, key 3): expect [2, 4, 4]", scores.row(0), 0);
  show("all scores = queries * keys^T: row i scores input i against every input (3 x 3)", scores, 0);

  // Step 5: softmax turns each row of scores into weights that are positive and sum to 1.
  step(5, "softmax");
  const Eigen::Matrix3f weights = attn::softmax_rows(scores);
  show("weights = softmax of each row: exp(score) / sum of exp(scores), so each row sums to 1", weights, 3);
  // The tutorial rounds to one decimal. Plain rounding would turn input 1's first weight,
  // 0.063, into 0.1 and make its row sum 1.1; the tutorial writes 0.0, which keeps it at 1.
  Eigen::Matrix3f rounded_weights;
  rounded_weights << 0.0f, 0.5f, 0.5f,  //
      0.0f, 1.0f, 0.0f,                 //
      0.0f, 0.9f, 0.1f;
  show("the tutorial's one-decimal weights, softmax([2, 4, 4]) ~ [0.0, 0.5, 0.5]\n"
       "(0.063 would round to 0.1; the tutorial writes 0.0, which keeps the row sum at 1)",
       rounded_weights, 1);

  // Step 6: scale each value by how much input 1 attends to its input.
  step(6, "weight the values for input 1");
  Eigen::Matrix3f weighted_values;  // row j: weight(1, j) * value j
  Eigen::Matrix3f weighted_values_rounded;
  for (Eigen::Index j = 0; j < 3; ++j) {
    weighted_values.row(j) = weights(0, j) * qkv.v.row(j);
    weighted_values_rounded.row(j) = rounded_weights(0, j) * qkv.v.row(j);
  }
  show("with the tutorial's weights: 0.0 * value 1, 0.5 * value 2, 0.5 * value 3", weighted_values_rounded, 1);
  std::ostringstream exact_caption;
  exact_caption.precision(3);
  exact_caption << std::fixed << "with the exact weights: " << weights(0, 0) << " * value 1, " << weights(0, 1)
                << " * value 2, " << weights(0, 2) << " * value 3";
  show(exact_caption.str(), weighted_values);

  // Step 7: output 1 is the sum of the weighted values: a blend of every input's value,
  // mixed in the proportions input 1's query chose.
  step(7, "sum the weighted values into output 1");
  const Eigen::RowVector3f output_1_rounded = weighted_values_rounded.colwise().sum();
  const Eigen::RowVector3f output_1 = weighted_values.colwise().sum();
  show("output 1 with the tutorial's rounded weights: expect [2.0, 7.0, 1.5]", output_1_rounded, 1);
  std::ostringstream output_caption;
  output_caption.precision(2);
  output_caption << std::fixed << "output 1 with the exact weights (the tutorial's rounding moved it by up to "
                 << (output_1 - output_1_rounded).cwiseAbs().maxCoeff() << ")";
  show(output_caption.str(), output_1);

  // Step 8: steps 4-7 for every input at once are one matrix product: outputs = weights·values.
  step(8, "repeat for inputs 2 and 3: all outputs at once");
  show("outputs = weights * values (attn::weighted_sum), one row per input (3 x 3)",
       attn::weighted_sum(weights, qkv.v));
  attn::AttentionOptionsf unscaled;
  unscaled.scale = 1.0f;
  show("the whole pipeline in one call, attn::self_attention(x, projection, {scale = 1})",
       attn::self_attention(x, projection, unscaled));

  // Real models scale the scores by 1/√d_k (Vaswani et al. 2017). If the entries of q and k
  // have variance 1, q·k sums d_k such products and has variance d_k: the scores spread out
  // as d_k grows, the softmax saturates into a one-hot choice and its gradients vanish.
  // Multiplying by 1/√d_k brings the variance back to 1 whatever d_k.
  std::cout << "== Finally: the scale real models use ==\n";
  const float scale = attn::default_scale<float>(projection.d_k());
  std::cout << "Transformers multiply the scores by 1/sqrt(d_k), here 1/sqrt(3) = " << scale << ".\n"
            << "A dot product of d_k terms spreads wider as d_k grows (its variance is d_k for unit-variance\n"
            << "entries), which would push the softmax towards a one-hot choice with vanishing gradients;\n"
            << "the scale keeps the spread the same whatever d_k. attn applies it unless told otherwise.\n\n";
  Eigen::Matrix3f scaled_weights;
  attn::self_attention(x, projection, attn::AttentionOptionsf{}, scaled_weights);
  show("weights with the default scale: softer than step 5's", scaled_weights, 3);
  show("outputs = attn::self_attention(x, projection), with the default scale (3 x 3)",
       attn::self_attention(x, projection));
  return 0;
}
