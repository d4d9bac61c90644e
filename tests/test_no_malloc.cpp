// The no-hidden-allocation promise: fixed-size attention never touches the heap, and a
// loop of `_into` calls that reuses its buffers allocates nothing after the first call.
//
// Eigen checks every heap allocation against set_is_malloc_allowed when
// EIGEN_RUNTIME_NO_MALLOC is defined, through eigen_assert; that assertion is redirected
// to an exception here so the check also holds in release builds (NDEBUG).

#include <stdexcept>
#include <string>

namespace attn_test {
struct eigen_assertion_failure : std::runtime_error {
  using std::runtime_error::runtime_error;
};
}  // namespace attn_test

#ifndef EIGEN_RUNTIME_NO_MALLOC
#define EIGEN_RUNTIME_NO_MALLOC
#endif
#define eigen_assert(condition)                                                         \
  do {                                                                                  \
    if (!(condition)) throw ::attn_test::eigen_assertion_failure("eigen_assert: " #condition); \
  } while (false)

#include <attn/attn.hpp>

#include "attn_test.hpp"
#include "reference.hpp"

using Eigen::Index;

namespace {

/// Forbids heap allocation for its lifetime.
class HeapForbidden {
 public:
  HeapForbidden() { Eigen::internal::set_is_malloc_allowed(false); }
  ~HeapForbidden() { Eigen::internal::set_is_malloc_allowed(true); }
  HeapForbidden(const HeapForbidden&) = delete;
  HeapForbidden& operator=(const HeapForbidden&) = delete;
};

}  // namespace

TEST_CASE("the guard catches an allocation (so the tests below can fail)", "[no_malloc]") {
  HeapForbidden forbidden;
  CHECK_THROWS_AS(Eigen::MatrixXf(64, 64), attn_test::eigen_assertion_failure);
}

TEMPLATE_TEST_CASE("the worked example runs fixed-size with the heap forbidden", "[no_malloc][golden]", float, double) {
  using Scalar = TestType;
  Eigen::Matrix<Scalar, 3, 4> x;
  x << 1, 0, 1, 0, 0, 2, 0, 2, 1, 1, 1, 1;
  Eigen::Matrix<Scalar, 4, 3> w_key, w_query, w_value;
  w_key << 0, 0, 1, 1, 1, 0, 0, 1, 0, 1, 1, 0;
  w_query << 1, 0, 1, 1, 0, 0, 0, 0, 1, 0, 1, 1;
  w_value << 0, 2, 0, 0, 3, 0, 1, 0, 3, 1, 1, 0;
  Eigen::Matrix<Scalar, 3, 3> outputs, weights;

  {
    HeapForbidden forbidden;
    const attn::QKVProjection<Scalar, 4, 3, 3> projection(w_query, w_key, w_value);
    attn::AttentionOptions<Scalar> unscaled;
    unscaled.scale = Scalar(1);
    outputs = attn::self_attention(x, projection, unscaled, weights);
  }
  const double tol = std::is_same_v<Scalar, float> ? 1e-6 : 1e-9;
  CHECK_THAT(double(outputs(0, 0)), attn_test::WithinRel(1.9366210617, tol));
  CHECK_THAT(double(outputs(1, 1)), attn_test::WithinRel(7.9639915951, tol));
  CHECK_THAT(double(outputs(2, 2)), attn_test::WithinRel(0.3583892947, tol));
  CHECK_THAT(double(weights(0, 1)), attn_test::WithinRel(0.4683105308, tol));
}

TEMPLATE_TEST_CASE("a loop of _into calls reusing its buffers allocates nothing", "[no_malloc]", float, double) {
  using Scalar = TestType;
  using Matrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic>;
  const Index n = 24, d_model = 16, d_k = 8, d_v = 8;
  const Matrix x = attn_test::random_matrix<Scalar>(n, d_model, 1);
  const attn::QKVProjection<Scalar> projection(attn_test::random_matrix<Scalar>(d_model, d_k, 2),
                                               attn_test::random_matrix<Scalar>(d_model, d_k, 3),
                                               attn_test::random_matrix<Scalar>(d_model, d_v, 4),
                                               attn_test::random_matrix<Scalar>(1, d_k, 5),
                                               attn_test::random_matrix<Scalar>(1, d_k, 6),
                                               attn_test::random_matrix<Scalar>(1, d_v, 7));
  const Eigen::Matrix<bool, Eigen::Dynamic, Eigen::Dynamic> keep = attn_test::random_keep_mask(n, n, 8, 0.8);
  const Matrix bias = attn_test::random_matrix<Scalar>(n, n, 9);
  attn::AttentionOptions<Scalar> options;
  options.causal = true;
  options.mask = keep;
  options.bias = bias;
  options.valid_keys = n - 2;

  Matrix q, k, v, scores, out, weights;
  const auto step = [&] {
    projection.project_into(x, q, k, v);
    attn::scaled_scores_into(q, k, attn::default_scale<Scalar>(d_k), scores);
    attn::mask_scores_inplace(scores, options);
    attn::softmax_rows_inplace(scores);
    attn::attention_into(q, k, v, options, out, weights);
  };
  step();  // sizes the buffers
  const Matrix first = out;
  {
    HeapForbidden forbidden;
    for (int iteration = 0; iteration < 3; ++iteration) REQUIRE_NOTHROW(step());
  }
  CHECK(out == first);
  CHECK(attn_test::max_abs_difference(scores, weights) <= attn_test::tolerance<Scalar>(d_k, n));
}

TEST_CASE("the tiled kernel reuses its workspace without allocating", "[no_malloc][flash]") {
  // One scalar: what allocates depends on the tile sizes, which the default-tile tests
  // below cover for float and double; each scalar costs this executable a minute of
  // compiling under the sanitizers.
  using Scalar = float;
  using Matrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic>;
  // Several query blocks, heads with a shared K/V head, every mask; then the decode split.
  const Index n = 150, d = 16;
  const Matrix q = attn_test::random_matrix<Scalar>(n, 4 * d, 11);
  const Matrix k = attn_test::random_matrix<Scalar>(n, 2 * d, 12);
  const Matrix v = attn_test::random_matrix<Scalar>(n, 2 * d, 13);
  const Eigen::Matrix<bool, Eigen::Dynamic, Eigen::Dynamic> keep = attn_test::random_keep_mask(n, n, 14, 0.8);
  const Matrix bias = attn_test::random_matrix<Scalar>(n, n, 15);
  attn::AttentionOptions<Scalar> options;
  options.causal = true;
  options.mask = keep;
  options.bias = bias;
  options.window = attn::SlidingWindow{100, -1};
  const Matrix q_decode = attn_test::random_matrix<Scalar>(1, 4 * d, 16);
  const Matrix k_long = attn_test::random_matrix<Scalar>(2 * attn::split_key_chunk + 5, 2 * d, 17);
  const Matrix v_long = attn_test::random_matrix<Scalar>(2 * attn::split_key_chunk + 5, 2 * d, 18);
  attn::AttentionOptions<Scalar> decode_options;
  decode_options.causal = true;

  attn::Workspace<Scalar> workspace;
  Matrix out, lse, decoded, decoded_lse;
  const auto step = [&] {
    attn::flash_attention_into<32, 64>(q, k, v, attn::Heads{4, 2}, options, out, lse, workspace);
    attn::flash_attention_into<32, 64>(q, k, v, attn::Heads{4, 2}, options, out, workspace);
    attn::flash_attention_into<32, 64>(q_decode, k_long, v_long, attn::Heads{4, 2}, decode_options, decoded,
                                       decoded_lse, workspace);
  };
  step();
  const Matrix first = out, first_decoded = decoded;
  {
    HeapForbidden forbidden;
    for (int iteration = 0; iteration < 3; ++iteration) REQUIRE_NOTHROW(step());
  }
  CHECK(out == first);
  CHECK(decoded == first_decoded);
}

TEMPLATE_TEST_CASE("with its default tiles the kernel never allocates, for head widths up to 256", "[no_malloc][flash]",
                   float, double) {
  using Scalar = TestType;
  using Matrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic>;
  // Eigen's packing buffers go to the heap past EIGEN_STACK_ALLOCATION_LIMIT; the default
  // tiles are sized to stay under it, with partial tiles at both ends (n = 300).
  const Index width = GENERATE(32, 64, 128, 256);
  INFO("d = " << width);
  const Index n = 300;
  const Matrix q = attn_test::random_matrix<Scalar>(n, width, 21);
  const Matrix k = attn_test::random_matrix<Scalar>(n, width, 22);
  const Matrix v = attn_test::random_matrix<Scalar>(n, width, 23);
  attn::AttentionOptions<Scalar> options;
  attn::Workspace<Scalar> workspace;
  Matrix out;
  attn::flash_attention_into(q, k, v, attn::Heads{}, options, out, workspace);
  const Matrix first = out;
  {
    HeapForbidden forbidden;
    REQUIRE_NOTHROW(attn::flash_attention_into(q, k, v, attn::Heads{}, options, out, workspace));
  }
  CHECK(out == first);
}

TEMPLATE_TEST_CASE("a training loop's backward pass reuses its workspace and gradients without allocating",
                   "[no_malloc][backward]", float, double) {
  using Scalar = TestType;
  using Matrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic>;
  // Default tiles, head widths up to 256, grouped-query heads, partial tiles at both ends;
  // with and without the forward's out and lse (recomputed in the workspace when absent).
  const Index width = GENERATE(32, 128, 256);
  INFO("d = " << width);
  const Index n = 150;
  const attn::Heads heads{2, 1};
  const Matrix q = attn_test::random_matrix<Scalar>(n, 2 * width, 31);
  const Matrix k = attn_test::random_matrix<Scalar>(n, width, 32);
  const Matrix v = attn_test::random_matrix<Scalar>(n, width, 33);
  const Matrix d_out = attn_test::random_matrix<Scalar>(n, 2 * width, 34);
  attn::AttentionOptions<Scalar> options;
  options.causal = true;
  attn::Workspace<Scalar> forward_workspace;
  Matrix out, lse;
  attn::flash_attention_into(q, k, v, heads, options, out, lse, forward_workspace);
  attn::BackwardInputs<Scalar> kept;
  kept.out = out;
  kept.lse = lse;
  attn::BackwardWorkspace<Scalar> workspace;
  attn::AttentionGradients<Scalar> gradients;
  attn::flash_attention_backward_into(q, k, v, heads, options, d_out, gradients, workspace);
  const Matrix first_dq = gradients.dq;
  {
    HeapForbidden forbidden;
    REQUIRE_NOTHROW(attn::flash_attention_backward_into(q, k, v, heads, options, d_out, gradients, workspace));
    REQUIRE_NOTHROW(attn::flash_attention_backward_into(q, k, v, heads, options, d_out, gradients, workspace, kept));
  }
  CHECK(gradients.dq == first_dq);
}

TEST_CASE("MultiHeadAttention::backward_into reuses its workspace and gradients without allocating",
          "[no_malloc][multi_head][backward]") {
  // float only: the module adds projections around the kernel, whose double tiles the
  // test above covers; each scalar costs this executable a minute of compile time.
  using Scalar = float;
  using Matrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic>;
  attn::MultiHeadOptions shape;
  shape.num_kv_heads = 2;
  shape.rope = attn::Rope{};
  shape.alibi = true;
  attn::MultiHeadAttention<Scalar> module(32, 4, shape);
  module.set_weights(attn_test::random_matrix<Scalar>(32, 32, 61), attn_test::random_matrix<Scalar>(32, 16, 62),
                     attn_test::random_matrix<Scalar>(32, 16, 63), attn_test::random_matrix<Scalar>(32, 32, 64));
  const Matrix x = attn_test::random_matrix<Scalar>(40, 32, 65);
  const Matrix d_out = attn_test::random_matrix<Scalar>(40, 32, 66);
  attn::AttentionOptions<Scalar> options;
  options.causal = true;
  attn::MultiHeadBackwardWorkspace<Scalar> workspace;
  attn::MultiHeadGradients<Scalar> gradients;
  module.backward_into(x, x, x, options, d_out, gradients, workspace);
  const Matrix first = gradients.query_weight;
  {
    HeapForbidden forbidden;
    REQUIRE_NOTHROW(module.backward_into(x, x, x, options, d_out, gradients, workspace));
  }
  CHECK(gradients.query_weight == first);
}

// ---- Positions (rope.hpp, alibi.hpp): RoPE in place and the ALiBi modifier ---------------

TEMPLATE_TEST_CASE("RoPE in place and ALiBi in the tiled kernel allocate nothing", "[no_malloc][rope][alibi]",
                   double) {
  using Scalar = TestType;
  using Matrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic>;
  const Index n = 150, d = 16;
  Matrix q = attn_test::random_matrix<Scalar>(n, 4 * d, 31);
  Matrix k = attn_test::random_matrix<Scalar>(n, 2 * d, 32);
  const Matrix v = attn_test::random_matrix<Scalar>(n, 2 * d, 33);
  Matrix wide = attn_test::random_matrix<Scalar>(5, 2 * 256, 34);  // 128 pairs: two stack chunks
  const Eigen::VectorXi positions = Eigen::VectorXi::LinSpaced(n, 3, 3 + n - 1);
  const Eigen::Matrix<Index, 1, Eigen::Dynamic> wide_positions =
      Eigen::Matrix<Index, 1, Eigen::Dynamic>::LinSpaced(5, 4000, 4004);
  const Eigen::Matrix<Scalar, Eigen::Dynamic, 1> slopes = attn::alibi_slopes<Scalar>(4);
  attn::AttentionOptions<Scalar> options;
  options.causal = true;
  attn::Workspace<Scalar> workspace;
  Matrix out, lse;
  attn::flash_attention_into<32, 64>(q, k, v, attn::Heads{4, 2}, options, out, lse, workspace);  // sizes the buffers
  {
    HeapForbidden forbidden;
    REQUIRE_NOTHROW(attn::apply_rope_inplace(q, positions, d));
    REQUIRE_NOTHROW(attn::apply_rope_inplace(k.middleCols(d, d), 3, d, attn::Rope{500000.0, attn::RopeStyle::interleaved}));
    REQUIRE_NOTHROW(attn::apply_rope_inplace(wide, wide_positions, 256));
    const auto mods = attn::Mods{attn::alibi_score_mod(slopes, n, n), attn::NoMaskMod{}};
    for (int iteration = 0; iteration < 2; ++iteration) {
      REQUIRE_NOTHROW(attn::flash_attention_into<32, 64>(q, k, v, attn::Heads{4, 2}, options, out, lse, workspace, mods));
    }
  }
  CHECK(out.allFinite());
}
// ---- end of positions -------------------------------------------------------------------

// ---- MultiHeadAttention: forward with a kept workspace, and decode steps -----------------

namespace {

/// A module with random parameters: 8 heads, 2 KV heads, and RoPE (positions = 1), ALiBi (2)
/// or neither (0).
template <typename Scalar>
attn::MultiHeadAttention<Scalar> random_module(int positions, Index embed_dim) {
  attn::MultiHeadOptions options;
  options.num_kv_heads = 2;
  if (positions == 1) options.rope = attn::Rope{};
  options.alibi = positions == 2;
  attn::MultiHeadAttention<Scalar> module(embed_dim, 8, options);
  const Index kv = module.kv_width();
  module.set_weights(attn_test::random_matrix<Scalar>(embed_dim, embed_dim, 1),
                     attn_test::random_matrix<Scalar>(embed_dim, kv, 2), attn_test::random_matrix<Scalar>(embed_dim, kv, 3),
                     attn_test::random_matrix<Scalar>(embed_dim, embed_dim, 4));
  module.set_biases(attn_test::random_matrix<Scalar>(1, embed_dim, 5), attn_test::random_matrix<Scalar>(1, kv, 6),
                    attn_test::random_matrix<Scalar>(1, kv, 7), attn_test::random_matrix<Scalar>(1, embed_dim, 8));
  return module;
}

}  // namespace

TEST_CASE("MultiHeadAttention::forward_into reuses its workspace without allocating", "[no_malloc][multi_head]") {
  // One scalar: what allocates depends on the tile sizes, which the default-tile tests
  // below cover for float and double; each scalar costs this executable a minute of
  // compiling under the sanitizers.
  using Scalar = float;
  using Matrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic>;
  const int positions = GENERATE(0, 1, 2);  // none, RoPE, ALiBi
  CAPTURE(positions);
  // E = 64: at E = 512 and 200 tokens Eigen's projection products need heap blocking
  // buffers; the promise is attn's own scratch.
  const auto module = random_module<Scalar>(positions, 64);
  attn::MultiHeadWorkspace<Scalar> workspace;
  Matrix out;
  const Matrix x = attn_test::random_matrix<Scalar>(200, 64, 9);
  attn::AttentionOptions<Scalar> causal;
  causal.causal = true;
  module.forward_into(x, x, x, causal, out, workspace);
  const Matrix first = out;
  {
    HeapForbidden forbidden;
    REQUIRE_NOTHROW(module.forward_into(x, x, x, causal, out, workspace));
  }
  CHECK(out == first);
}

namespace {

// Decode steps over a cache stored as `Storage` (float, 16 or 8 bits, read back into float
// in registers): none may allocate once the first has sized the workspace.
template <typename Storage>
void check_decode_allocates_nothing(int positions, Index embed_dim) {
  using Scalar = float;
  using Matrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic>;
  const auto module = random_module<Scalar>(positions, embed_dim);
  attn::MultiHeadWorkspace<Scalar> workspace;
  Matrix out;
  // The first one-token step sizes the workspace for the cache's whole capacity; every
  // later step must then allocate nothing. What a step does depends on the cache's length
  // only through the tiling: one partial key tile (block_k = 256 or 512 keys here), several
  // tiles, and past split_key_chunk (1024) the key split into chunks and their merge. So
  // the steps run in windows that reach each of those and cross each boundary between them
  // (512, 1024), up to the cache's capacity; the tokens between windows are appended
  // directly (their values do not matter here). 119 steps instead of 1299 keep the test
  // fast under the sanitizers.
  const Index n = 1300;
  const Index windows[][2] = {{1, 40}, {500, 530}, {1010, 1040}, {1280, n}};
  const Matrix tokens = attn_test::random_matrix<Scalar>(n, embed_dim, 10);
  const Matrix filler = attn_test::random_matrix<Scalar>(n, module.kv_width(), 11);
  auto cache = module.template make_cache<Storage>(1, n);
  module.decode_into(tokens.topRows(1), cache, 0, {}, out, workspace);  // sizes the workspace
  Index steps = 0;
  for (const auto& window : windows) {
    const Index gap = window[0] - cache.size(0);
    if (gap > 0) cache.append(0, filler.topRows(gap), filler.bottomRows(gap));
    REQUIRE(cache.size(0) == window[0]);
    HeapForbidden forbidden;
    for (Index t = window[0]; t < window[1]; ++t, ++steps) {
      REQUIRE_NOTHROW(module.decode_into(tokens.middleRows(t, 1), cache, 0, {}, out, workspace));
    }
  }
  CHECK(steps == 119);
  CHECK(cache.size(0) == n);
  CHECK(out.allFinite());
}

}  // namespace

TEST_CASE("a decode step allocates nothing once the cache's capacity is reserved", "[no_malloc][multi_head][decode]") {
  // One scalar: what allocates depends on the tile sizes, which the default-tile tests
  // below cover for float and double; each scalar costs this executable a minute of
  // compiling under the sanitizers.
  const int positions = GENERATE(0, 1, 2);  // none, RoPE, ALiBi
  // E = 512 as well: a one-token step's products stay matrix-vector products, heap-free
  // whatever the width.
  const Index embed_dim = GENERATE(64, 512);
  CAPTURE(positions, embed_dim);
  check_decode_allocates_nothing<float>(positions, embed_dim);
}

TEST_CASE("a decode step over a 16-bit or 8-bit cache allocates nothing either",
          "[no_malloc][multi_head][decode][precision]") {
  const Index embed_dim = GENERATE(64, 512);
  CAPTURE(embed_dim);
  check_decode_allocates_nothing<attn::bfloat16>(1, embed_dim);
  check_decode_allocates_nothing<attn::q8_0>(1, embed_dim);
}
