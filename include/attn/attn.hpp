#pragma once
/// @file
/// The umbrella header: everything attn offers but the .npy file I/O. Self-attention as in
/// Vaswani et al. 2017, "Attention Is All You Need", on Eigen matrices with one token per
/// row. `<attn/npy.hpp>` is left out because it brings `<filesystem>` and `<fstream>` to
/// every user; include it where you read or write .npy files.

#include "version.hpp"
#include "error.hpp"
#include "matrix_view.hpp"
#include "precision.hpp"
#include "projection.hpp"
#include "scores.hpp"
#include "softmax.hpp"
#include "weighted_sum.hpp"
#include "options.hpp"
#include "mask.hpp"
#include "merge.hpp"
#include "mods.hpp"
#include "flash.hpp"
#include "attention.hpp"
#include "backward.hpp"
#include "rope.hpp"
#include "alibi.hpp"
#include "kv_cache.hpp"
#include "multi_head.hpp"
