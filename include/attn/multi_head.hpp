#pragma once
/// @file
/// `attn::MultiHeadAttention`: multi-head attention (Vaswani et al. 2017, "Attention Is All
/// You Need", section 3.2.2) with PyTorch's `nn.MultiheadAttention` weights and numbers,
/// grouped-query and multi-query attention (Ainslie et al. 2023, "GQA"; Shazeer 2019),
/// cross-attention from key and value inputs of other widths, batches of sequences of
/// different lengths, and decoding token by token with a `KVCache`.
///
/// The attention itself runs in the tiled kernel (flash.hpp): no n_q×n_k matrix exists
/// unless the attention weights are asked for. The module's parts live in multi_head/: its
/// parameters and how they are loaded (parameters.hpp), what it computes (module.hpp),
/// batches (batch.hpp), the decode step (decode.hpp) and the gradients (backward.hpp).

#include "multi_head/parameters.hpp"
#include "multi_head/module.hpp"
#include "multi_head/batch.hpp"
#include "multi_head/decode.hpp"
#include "multi_head/backward.hpp"
