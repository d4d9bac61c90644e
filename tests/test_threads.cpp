// The tiled kernel with OpenMP: every thread count gives bitwise the same result, because
// each output row is reduced by one thread in a fixed order and a key split merges its
// chunks in a fixed order. Built only when OpenMP is found (it links attn::attn_openmp).

#include <cstddef>
#include <stdexcept>
#include <vector>

#include <omp.h>

#include <attn/attn.hpp>

#include "attn_test.hpp"
#include "reference.hpp"

#if !defined(_OPENMP)
#error "test_threads.cpp must be built with OpenMP (link attn::attn_openmp)"
#endif

using Eigen::Index;

namespace {
// attn caps num_threads at omp_get_max_threads(), one per core by default: let the tests
// below ask for up to 4 threads on a 2-core machine, so that 3 and 4 are really 3 and 4.
const int raised_thread_limit = [] {
  omp_set_num_threads(4);
  return 4;
}();
}  // namespace

TEST_CASE("num_threads far above what OpenMP offers is capped there: slots, threads and memory",
          "[threads][workspace]") {
  REQUIRE(omp_get_max_threads() == raised_thread_limit);
  using Matrix = Eigen::MatrixXf;
  // 16 heads × 10 query blocks: 160 work items, each of which would get a thread and a
  // workspace slot if a count of a million were taken at its word.
  const attn::Heads heads{16, 16};
  const Index n = 640, d = 8;
  const Matrix q = attn_test::random_matrix<float>(n, heads.num_heads * d, 1);
  const Matrix k = attn_test::random_matrix<float>(n, heads.num_heads * d, 2);
  const Matrix v = attn_test::random_matrix<float>(n, heads.num_heads * d, 3);
  attn::AttentionOptionsf options;
  attn::Workspace<float> workspace;
  Matrix sequential, out;
  attn::flash_attention_into<64, 64>(q, k, v, heads, options, sequential, workspace);
  options.num_threads = 1'000'000;
  attn::flash_attention_into<64, 64>(q, k, v, heads, options, out, workspace);
  CHECK(workspace.thread_slots() == static_cast<std::size_t>(raised_thread_limit));
  CHECK(out == sequential);
  omp_set_num_threads(2);
  attn::Workspace<float> small_workspace;
  attn::flash_attention_into<64, 64>(q, k, v, heads, options, out, small_workspace);
  CHECK(small_workspace.thread_slots() == 2);
  omp_set_num_threads(raised_thread_limit);
}

TEST_CASE("results are bitwise identical whatever the thread count", "[threads]") {
  // One scalar: the order of the sums does not depend on it (the odd-width test below runs
  // both); each scalar costs this executable a minute of compiling under the sanitizers.
  using Scalar = float;
  using Matrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic>;
  // (n_q, n_k): many query blocks; one query block over a long cache (the key split).
  const auto [n_q, n_k] = GENERATE(table<Index, Index>({{300, 260}, {2, 5 * attn::split_key_chunk + 7}}));
  const bool causal = GENERATE(false, true);
  INFO("n_q=" << n_q << " n_k=" << n_k << " causal=" << causal);
  const Index d = 16;
  const Matrix q = attn_test::random_matrix<Scalar>(n_q, 4 * d, 1, 2.0);
  const Matrix k = attn_test::random_matrix<Scalar>(n_k, 2 * d, 2, 2.0);
  const Matrix v = attn_test::random_matrix<Scalar>(n_k, 2 * d, 3);
  attn::AttentionOptions<Scalar> options;
  options.causal = causal;
  attn::Workspace<Scalar> workspace;

  Matrix sequential, sequential_lse;
  options.num_threads = 1;
  attn::flash_attention_into<32, 64>(q, k, v, attn::Heads{4, 2}, options, sequential, sequential_lse, workspace);
  for (const int threads : {2, 3, 4, 0}) {
    INFO(threads << " threads");
    options.num_threads = threads;
    Matrix out, lse;
    attn::flash_attention_into<32, 64>(q, k, v, attn::Heads{4, 2}, options, out, lse, workspace);
    CHECK(out == sequential);
    CHECK(lse == sequential_lse);
  }
  // And the threaded result is right, not merely repeatable.
  Matrix weights;
  const Matrix reference = attn::attention(q.leftCols(d), k.leftCols(d), v.leftCols(d), options, weights);
  CHECK(attn_test::max_abs_difference(sequential.leftCols(d), reference) <=
        attn_test::tolerance<Scalar>(d, n_k, 2.0 * std::sqrt(double(d))));
}

TEST_CASE("the backward pass gives the same bits whatever the thread count", "[threads][backward]") {
  // float only: double runs the same passes over the same explicit tiles.
  using Scalar = float;
  using Matrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic>;
  const bool causal = GENERATE(false, true);
  INFO("causal=" << causal);
  const Index n_q = 150, n_k = 170, d = 16;
  const Matrix q = attn_test::random_matrix<Scalar>(n_q, 4 * d, 41, 2.0);
  const Matrix k = attn_test::random_matrix<Scalar>(n_k, 2 * d, 42, 2.0);
  const Matrix v = attn_test::random_matrix<Scalar>(n_k, 2 * d, 43);
  const Matrix d_out = attn_test::random_matrix<Scalar>(n_q, 4 * d, 44);
  attn::AttentionOptions<Scalar> options;
  options.causal = causal;
  attn::BackwardWorkspace<Scalar> workspace;
  attn::AttentionGradients<Scalar> sequential, parallel;
  options.num_threads = 1;
  attn::flash_attention_backward_into<16, 32>(q, k, v, attn::Heads{4, 2}, options, d_out, sequential, workspace);
  for (const int threads : {2, 3, 4, 0}) {
    INFO(threads << " threads");
    options.num_threads = threads;
    attn::flash_attention_backward_into<16, 32>(q, k, v, attn::Heads{4, 2}, options, d_out, parallel, workspace);
    CHECK(parallel.dq == sequential.dq);
    CHECK(parallel.dk == sequential.dk);
    CHECK(parallel.dv == sequential.dv);
  }
  // And the threaded gradients are right, not merely repeatable: head 0 against the
  // reference backward (head 0 alone has no group partner in dk, so compare dq).
  Matrix weights;
  const auto reference =
      attn::attention_backward(q.leftCols(d), k.leftCols(d), v.leftCols(d), d_out.leftCols(d), options, weights);
  CHECK(attn_test::max_abs_difference(parallel.dq.leftCols(d), reference.dq) <=
        attn_test::tolerance<Scalar>(d, n_q + n_k, 8.0));
}

TEMPLATE_TEST_CASE("default tiles of an odd width give the same bits whatever the workspace has seen",
                   "[threads][workspace]", float, double) {
  using Scalar = TestType;
  using Matrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic>;
  // d = 96 makes the default key block 341 (170 in double), not a multiple of the SIMD
  // width: each score row's unaligned head is computed by scalar code, so every slot and
  // every call must place rows alike.
  const Index n_q = 300, n_k = 700, d = 96;
  const Matrix q = attn_test::random_matrix<Scalar>(n_q, 2 * d, 11, 2.0);
  const Matrix k = attn_test::random_matrix<Scalar>(n_k, 2 * d, 12, 2.0);
  const Matrix v = attn_test::random_matrix<Scalar>(n_k, 2 * d, 13);
  attn::AttentionOptions<Scalar> options;
  attn::Workspace<Scalar> fresh;
  Matrix expected, expected_lse;
  attn::flash_attention_into(q, k, v, attn::Heads{2, 2}, options, expected, expected_lse, fresh);

  // A workspace first grown by a call with wider score rows (d = 64: 512 keys).
  attn::Workspace<Scalar> used;
  const Matrix narrow = attn_test::random_matrix<Scalar>(200, 64, 14);
  Matrix scratch;
  options.num_threads = 2;
  attn::flash_attention_into(narrow, narrow, narrow, attn::Heads{}, options, scratch, used);
  for (const int threads : {1, 2}) {
    INFO(threads << " threads");
    options.num_threads = threads;
    Matrix out, lse;
    attn::flash_attention_into(q, k, v, attn::Heads{2, 2}, options, out, lse, used);
    CHECK(out == expected);
    CHECK(lse == expected_lse);
  }
}

TEST_CASE("an exception thrown by a modifier on a worker thread reaches the caller", "[threads][mods]") {
  const Eigen::MatrixXf x = attn_test::random_matrix<float>(300, 8, 21);
  attn::AttentionOptionsf options;
  options.num_threads = 2;
  const auto refuse_key_7 = [](Index, Index key, Index) {
    if (key == 7) throw std::runtime_error("key 7 is not allowed");
    return true;
  };
  attn::Workspacef workspace;
  Eigen::MatrixXf out;
  const auto run = [&] {
    attn::flash_attention_into<32, 32>(x, x, x, attn::Heads{}, options, out, workspace,
                                       attn::Mods{attn::NoScoreMod{}, refuse_key_7});
  };
  CHECK_THROWS_WITH(run(), "key 7 is not allowed");
}

TEST_CASE("MultiHeadAttention: batches give the same bits on any thread count",
          "[threads][multi_head]") {
  using Matrix = Eigen::MatrixXf;
  attn::MultiHeadOptions shape;
  shape.num_kv_heads = 2;
  shape.rope = attn::Rope{};
  attn::MultiHeadAttentionf module(32, 4, shape);
  module.set_weights(attn_test::random_matrix<float>(32, 32, 1), attn_test::random_matrix<float>(32, 16, 2),
                     attn_test::random_matrix<float>(32, 16, 3), attn_test::random_matrix<float>(32, 32, 4));
  std::vector<Matrix> batch;
  for (Index length : {70, 3, 0, 150, 9}) batch.push_back(attn_test::random_matrix<float>(length, 32, 5));
  attn::AttentionOptionsf options;
  options.causal = true;
  options.num_threads = 1;
  const auto sequential = module.forward_batch(batch, options);
  // 5 sequences on up to 4 threads run sequences in parallel; 3 sequences on 4 threads run
  // one at a time with heads in parallel. (Not 8 threads: under LeakSanitizer, LLVM 14's
  // libomp then leaks 5760 bytes of its own, reported from inside libomp.so.)
  for (const std::size_t sequences : {std::size_t(5), std::size_t(3)}) {
    const std::vector<Matrix> part(batch.begin(), batch.begin() + std::ptrdiff_t(sequences));
    for (const int threads : {2, 3, 4, 0}) {
      INFO(sequences << " sequences, " << threads << " threads");
      options.num_threads = threads;
      const auto parallel = module.forward_batch(part, options);
      for (std::size_t i = 0; i < sequences; ++i) CHECK(parallel[i] == sequential[i]);
    }
  }

}

TEST_CASE("MultiHeadAttention::backward: the same bits on any thread count", "[threads][multi_head][backward]") {
  using Matrix = Eigen::MatrixXf;
  attn::MultiHeadOptions shape;
  shape.num_kv_heads = 2;
  shape.rope = attn::Rope{};
  attn::MultiHeadAttentionf module(32, 4, shape);
  module.set_weights(attn_test::random_matrix<float>(32, 32, 51), attn_test::random_matrix<float>(32, 16, 52),
                     attn_test::random_matrix<float>(32, 16, 53), attn_test::random_matrix<float>(32, 32, 54));
  const Matrix x = attn_test::random_matrix<float>(200, 32, 55);
  const Matrix d_out = attn_test::random_matrix<float>(200, 32, 56);
  attn::AttentionOptionsf options;
  options.causal = true;
  attn::MultiHeadBackwardWorkspacef workspace;
  attn::MultiHeadGradients<float> sequential, parallel;
  module.backward_into(x, x, x, options, d_out, sequential, workspace);
  for (const int threads : {2, 3, 4}) {
    INFO(threads << " threads");
    options.num_threads = threads;
    module.backward_into(x, x, x, options, d_out, parallel, workspace);
    CHECK(parallel.d_query == sequential.d_query);
    CHECK(parallel.d_key == sequential.d_key);
    CHECK(parallel.query_weight == sequential.query_weight);
    CHECK(parallel.key_weight == sequential.key_weight);
    CHECK(parallel.value_weight == sequential.value_weight);
  }
}

TEMPLATE_TEST_CASE("decode steps: the same bits on any thread count, and scratch sized once",
                   "[threads][multi_head][decode]", float, attn::bfloat16, attn::q8_0) {
  using Storage = TestType;  // the cache's: float, or 16 or 8 bits converted as they are read
  using Matrix = Eigen::MatrixXf;
  // Multi-query attention: its single KV head makes the fewest work items, so the thread
  // slots a step needs grow most with the cache (one per key chunk).
  attn::MultiHeadOptions shape;
  shape.num_kv_heads = 1;
  attn::MultiHeadAttentionf module(32, 4, shape);
  module.set_weights(attn_test::random_matrix<float>(32, 32, 1), attn_test::random_matrix<float>(32, 8, 2),
                     attn_test::random_matrix<float>(32, 8, 3), attn_test::random_matrix<float>(32, 32, 4));
  // Long enough for the key split, whose chunks run on several threads.
  const Matrix tokens = attn_test::random_matrix<float>(2200, 32, 6);
  Matrix outputs[3];
  for (const int threads : {1, 2, 3}) {
    INFO(threads << " threads");
    auto cache = module.template make_cache<Storage>(1, tokens.rows());
    attn::MultiHeadWorkspace<float> workspace;
    attn::AttentionOptionsf step;
    step.num_threads = threads;
    Matrix out;
    module.decode_into(tokens.topRows(1), cache, 0, step, out, workspace);
    // The first step sized everything for the cache's capacity: no step after it grows the
    // scratch (which would allocate), neither the buffers nor the per-thread slots.
    const std::size_t bytes = workspace.bytes();
    const std::size_t slots = workspace.flash.thread_slots();
    for (Index t = 1; t < tokens.rows(); ++t) module.decode_into(tokens.middleRows(t, 1), cache, 0, step, out, workspace);
    CHECK(workspace.bytes() == bytes);
    CHECK(workspace.flash.thread_slots() == slots);
    outputs[threads - 1] = out;
  }
  CHECK(outputs[1] == outputs[0]);
  CHECK(outputs[2] == outputs[0]);
}
