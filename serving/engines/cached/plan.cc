// One batch's cache plan for one table (serving/engines/cached/row_cache.py `RowCache.plan`)
// in C++, on the index arrays the Python RowCache owns: dedupe the batch's rows, count them
// (LFU with aging), split hits from misses, admit misses into free slots or in place of colder
// sampled rows not read by this batch. The same policy as the numpy version, without its
// dozens of array passes per batch; the GIL is released throughout.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

namespace py = pybind11;

namespace {

template <typename T>
T* Data(py::array_t<T>& a, const char* what, int64_t n = -1) {
  if (a.ndim() != 1 || (n >= 0 && a.shape(0) != n) || !a.writeable()) {
    throw py::value_error(std::string(what) + ": a writable 1-D array of the right size");
  }
  return a.mutable_data();
}

uint64_t Next(uint64_t* s) {  // xorshift64*
  uint64_t x = *s;
  x ^= x >> 12;
  x ^= x << 25;
  x ^= x >> 27;
  *s = x;
  return x * 0x2545F4914F6CDD1DULL;
}

// state: [nfree, since_aging, age_after, rng]; stats: [lookups, hits, unique, misses, inserts,
// evictions]. Returns (src per lookup, miss rows, insert slots, insert_from).
py::tuple Plan(py::array_t<int64_t, py::array::c_style | py::array::forcecast> rows_in,
               py::array_t<int32_t> slot_of_a, py::array_t<int64_t> row_of_a,
               py::array_t<uint32_t> freq_a, py::array_t<int64_t> free_a,
               py::array_t<uint8_t> read_a, py::array_t<int64_t> state_a,
               py::array_t<int64_t> stats_a) {
  const int64_t n = rows_in.shape(0);
  const int64_t* rows = rows_in.data();
  int32_t* slot_of = Data(slot_of_a, "slot_of");
  const int64_t table_rows = slot_of_a.shape(0);
  int64_t* row_of = Data(row_of_a, "row_of");
  const int64_t cap = row_of_a.shape(0);
  uint32_t* freq = Data(freq_a, "freq", table_rows);
  int64_t* free_slots = Data(free_a, "free", cap);
  uint8_t* read = Data(read_a, "read", cap);
  int64_t* st = Data(state_a, "state", 4);
  int64_t* stats = Data(stats_a, "stats", 6);
  for (int64_t i = 0; i < n; ++i) {
    if (rows[i] < 0 || rows[i] >= table_rows) throw py::value_error("row out of range");
  }
  py::array_t<int64_t> src_a(n);
  int64_t* src = src_a.mutable_data();
  std::vector<int64_t> miss, ins_slot, ins_from;
  {
    py::gil_scoped_release unlocked;
    std::vector<std::pair<int64_t, int64_t>> order(n);  // (row, lookup index): dedupe by sort
    for (int64_t i = 0; i < n; ++i) order[i] = {rows[i], i};
    std::sort(order.begin(), order.end());
    std::vector<int64_t> hit_slots;
    int64_t hits = 0, unique = 0;
    for (int64_t a = 0; a < n;) {
      int64_t b = a;
      while (b < n && order[b].first == order[a].first) ++b;
      const int64_t row = order[a].first, count = b - a;
      freq[row] = uint32_t(std::min<uint64_t>(uint64_t(freq[row]) + count, UINT32_MAX));
      int64_t s = slot_of[row];
      if (s >= 0) {
        hits += count;
        hit_slots.push_back(s);
      } else {
        s = cap + int64_t(miss.size());
        miss.push_back(row);
      }
      for (int64_t k = a; k < b; ++k) src[order[k].second] = s;
      ++unique;
      a = b;
    }
    st[1] += n;
    if (st[1] >= st[2]) {  // aging: every counter halves
      for (int64_t r = 0; r < table_rows; ++r) freq[r] >>= 1;
      st[1] = 0;
    }
    // Admission: hottest misses first, into free slots, then over colder sampled rows.
    std::vector<int64_t> by_heat(miss.size());
    for (size_t j = 0; j < miss.size(); ++j) by_heat[j] = int64_t(j);
    std::stable_sort(by_heat.begin(), by_heat.end(),
                     [&](int64_t x, int64_t y) { return freq[miss[x]] > freq[miss[y]]; });
    size_t j = 0;
    for (; j < by_heat.size() && st[0] > 0; ++j) {
      ins_slot.push_back(free_slots[--st[0]]);
      ins_from.push_back(by_heat[j]);
    }
    if (j < by_heat.size()) {
      for (int64_t s : hit_slots) read[s] = 1;
      const int64_t want = std::min<int64_t>(4 * int64_t(by_heat.size() - j), 4 * cap);
      std::vector<int64_t> victims;
      for (int64_t k = 0; k < want; ++k) {
        const int64_t s = int64_t(Next(reinterpret_cast<uint64_t*>(&st[3])) % uint64_t(cap));
        if (row_of[s] >= 0 && !read[s]) {
          read[s] = 1;  // distinct victims
          victims.push_back(s);
        }
      }
      for (int64_t s : victims) read[s] = 0;
      for (int64_t s : hit_slots) read[s] = 0;
      std::stable_sort(victims.begin(), victims.end(),
                       [&](int64_t x, int64_t y) { return freq[row_of[x]] < freq[row_of[y]]; });
      for (size_t v = 0; v < victims.size() && j < by_heat.size(); ++v, ++j) {
        if (freq[miss[by_heat[j]]] <= freq[row_of[victims[v]]]) continue;  // keep the incumbent
        slot_of[row_of[victims[v]]] = -1;
        stats[5]++;
        ins_slot.push_back(victims[v]);
        ins_from.push_back(by_heat[j]);
      }
    }
    for (size_t k = 0; k < ins_slot.size(); ++k) {
      const int64_t row = miss[ins_from[k]];
      slot_of[row] = int32_t(ins_slot[k]);
      row_of[ins_slot[k]] = row;
    }
    stats[0] += n;
    stats[1] += hits;
    stats[2] += unique;
    stats[3] += int64_t(miss.size());
    stats[4] += int64_t(ins_slot.size());
  }
  auto out = [](const std::vector<int64_t>& v) {
    py::array_t<int64_t> a(int64_t(v.size()));
    std::copy(v.begin(), v.end(), a.mutable_data());
    return a;
  };
  return py::make_tuple(src_a, out(miss), out(ins_slot), out(ins_from));
}

}  // namespace

PYBIND11_MODULE(_plan, m) {
  m.doc() = "One batch's embedding cache plan (serving/engines/cached/plan.cc)";
  m.def("plan", &Plan, "RowCache.plan on the index arrays; see plan.cc");
}
