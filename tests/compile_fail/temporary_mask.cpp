// Must not compile: options.mask is a view, and a temporary matrix would be destroyed at
// the end of this statement, leaving the view dangling. The deleted constructor says so.

#include <attn/attn.hpp>

int main() {
  attn::AttentionOptionsf options;
  options.mask = attn::causal_mask(3, 3);
  return options.mask.empty() ? 1 : 0;
}
