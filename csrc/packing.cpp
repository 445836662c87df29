// Sequence packing and sample-index building for the SPIN data path.
//
// Two routines, each mirrored line for line by the pure-Python fallback in
// spin_mcore/data/packing.py (a test asserts identical output on random inputs):
//
//   pack_pairs(lengths int64 [N,2], seq_len) -> (offsets int64 [B+1], pair_order int64 [N])
//       First-fit-decreasing on each pair's total length (chosen + rejected), ties by
//       pair index (a counting sort, O(N + max total)). The leftmost bin with room is found in O(log N) with a max segment
//       tree over bin remaining capacities; unopened bins start full, so "leftmost bin
//       with room" is automatically either an open bin or the next new one.
//
//   build_sample_index(n_items, epochs, seed) -> int64 [n_items * epochs]
//       One Fisher-Yates permutation per epoch driven by splitmix64; the bounded draw is
//       the multiply-high (r * (i + 1)) >> 64 (bias <= n / 2^64, negligible), which
//       needs no rejection loop, so the Python side can vectorise the draws.

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <stdexcept>
#include <string>
#include <vector>

namespace py = pybind11;

namespace {

constexpr uint64_t kGolden = 0x9E3779B97F4A7C15ULL;

// splitmix64 finaliser (Steele, Lea, Flood 2014; constants from Vigna's reference code).
inline uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

// Start state of epoch `epoch`'s stream: two rounds of mixing so that nearby seeds and
// nearby epochs give unrelated streams (a plain seed + epoch offset would make epoch e+1
// a one-step shift of epoch e).
inline uint64_t epoch_key(uint64_t seed, uint64_t epoch) { return mix64(mix64(seed + kGolden) + epoch + kGolden); }

void check_lengths(const int64_t* len, int64_t n, int64_t seq_len) {
  if (seq_len < 1) throw std::invalid_argument("pack_pairs: seq_len=" + std::to_string(seq_len) + " must be >= 1");
  for (int64_t i = 0; i < n; ++i) {
    const int64_t c = len[2 * i], r = len[2 * i + 1];
    if (c < 1 || r < 1)
      throw std::invalid_argument("pack_pairs: pair " + std::to_string(i) + " has a length < 1 (chosen=" + std::to_string(c) +
                                  ", rejected=" + std::to_string(r) + ")");
    if (c + r > seq_len)
      throw std::invalid_argument("pack_pairs: pair " + std::to_string(i) + " needs " + std::to_string(c + r) +
                                  " tokens (chosen=" + std::to_string(c) + ", rejected=" + std::to_string(r) +
                                  ") but seq_len=" + std::to_string(seq_len));
  }
}

py::tuple pack_pairs(py::array_t<int64_t, py::array::c_style | py::array::forcecast> lengths, int64_t seq_len) {
  if (lengths.ndim() != 2 || lengths.shape(1) != 2)
    throw std::invalid_argument("pack_pairs: lengths must have shape [N, 2]");
  const int64_t n = lengths.shape(0);
  const int64_t* len = lengths.data();
  check_lengths(len, n, seq_len);

  std::vector<int64_t> offsets_v, order_v;
  {
    py::gil_scoped_release release;
    std::vector<int64_t> total(n), sorted(n), bin_of(n);
    for (int64_t i = 0; i < n; ++i) total[i] = len[2 * i] + len[2 * i + 1];
    // Order: descending total, ascending index among ties (a stable sort on -total).
    const int64_t max_total = n ? *std::max_element(total.begin(), total.end()) : 0;
    if (max_total <= (int64_t(1) << 24)) {
      // Counting sort: O(N + max_total); filling buckets in index order keeps it stable.
      std::vector<int64_t> start(max_total + 2, 0);
      for (int64_t i = 0; i < n; ++i) start[max_total - total[i] + 1] += 1;
      for (int64_t t = 0; t <= max_total; ++t) start[t + 1] += start[t];
      for (int64_t i = 0; i < n; ++i) sorted[start[max_total - total[i]]++] = i;
    } else {
      std::iota(sorted.begin(), sorted.end(), 0);
      std::stable_sort(sorted.begin(), sorted.end(), [&](int64_t a, int64_t b) { return total[a] > total[b]; });
    }

    int64_t leaves = 1;
    while (leaves < std::max<int64_t>(n, 1)) leaves *= 2;
    std::vector<int64_t> tree(2 * leaves, seq_len);  // node = max remaining capacity below it
    int64_t n_bins = 0;
    for (int64_t k = 0; k < n; ++k) {
      const int64_t p = sorted[k], need = total[p];
      int64_t node = 1;
      while (node < leaves) node = (tree[2 * node] >= need) ? 2 * node : 2 * node + 1;
      const int64_t b = node - leaves;
      bin_of[p] = b;
      n_bins = std::max(n_bins, b + 1);
      tree[node] -= need;
      for (node /= 2; node >= 1; node /= 2) tree[node] = std::max(tree[2 * node], tree[2 * node + 1]);
    }

    // Counting sort by bin; within a bin, pairs keep their placement (sorted) order.
    offsets_v.assign(n_bins + 1, 0);
    for (int64_t i = 0; i < n; ++i) offsets_v[bin_of[i] + 1] += 1;
    for (int64_t b = 0; b < n_bins; ++b) offsets_v[b + 1] += offsets_v[b];
    std::vector<int64_t> cursor(offsets_v.begin(), offsets_v.end() - 1);
    order_v.assign(n, 0);
    for (int64_t k = 0; k < n; ++k) order_v[cursor[bin_of[sorted[k]]]++] = sorted[k];
  }
  py::array_t<int64_t> offsets(offsets_v.size()), order(order_v.size());
  std::copy(offsets_v.begin(), offsets_v.end(), offsets.mutable_data());
  std::copy(order_v.begin(), order_v.end(), order.mutable_data());
  return py::make_tuple(offsets, order);
}

py::array_t<int64_t> build_sample_index(int64_t n_items, int64_t epochs, uint64_t seed) {
  if (n_items < 0 || epochs < 0)
    throw std::invalid_argument("build_sample_index: n_items=" + std::to_string(n_items) +
                                " and epochs=" + std::to_string(epochs) + " must be >= 0");
  if (n_items > (int64_t(1) << 32)) throw std::invalid_argument("build_sample_index: n_items must be <= 2^32");
  py::array_t<int64_t> out(n_items * epochs);
  int64_t* dst = out.mutable_data();
  {
    py::gil_scoped_release release;
    for (int64_t e = 0; e < epochs; ++e) {
      int64_t* perm = dst + e * n_items;
      for (int64_t i = 0; i < n_items; ++i) perm[i] = i;
      uint64_t state = epoch_key(seed, static_cast<uint64_t>(e));
      for (int64_t i = n_items - 1; i >= 1; --i) {
        state += kGolden;
        const uint64_t r = mix64(state);
        const uint64_t j = static_cast<uint64_t>((static_cast<unsigned __int128>(r) * static_cast<uint64_t>(i + 1)) >> 64);
        std::swap(perm[i], perm[j]);
      }
    }
  }
  return out;
}

}  // namespace

PYBIND11_MODULE(_packing, m) {
  m.doc() = "C++ sequence packing and sample-index building (mirrors spin_mcore/data/packing.py).";
  m.def("pack_pairs", &pack_pairs, py::arg("lengths"), py::arg("seq_len"),
        "First-fit-decreasing packing of (chosen, rejected) pairs. Returns (offsets [B+1], pair_order [N]), int64.");
  m.def("build_sample_index", &build_sample_index, py::arg("n_items"), py::arg("epochs"), py::arg("seed"),
        "Seeded per-epoch permutations (splitmix64 + Fisher-Yates), int64 [n_items * epochs].");
}
