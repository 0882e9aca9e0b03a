// Thread count and a small fork-join helper (std::thread; no OpenMP runtime to clash with
// torch's or numpy's).
#pragma once
#include <atomic>
#include <exception>
#include <thread>
#include <vector>

namespace plm::cpu {

int default_num_threads();   // cores this process may run on
int get_num_threads();       // the setting, or the default when unset
void set_num_threads(int n); // n <= 0 restores the default

// Runs fn(t) for t in [0, nthreads), t = 0 on the calling thread; rethrows the first exception.
template <class Fn>
void parallel_for(int nthreads, Fn&& fn) {
  if (nthreads <= 1) {
    fn(0);
    return;
  }
  std::vector<std::exception_ptr> errors(nthreads);
  std::vector<std::thread> pool;
  pool.reserve(nthreads - 1);
  for (int t = 1; t < nthreads; ++t)
    pool.emplace_back([&, t] {
      try {
        fn(t);
      } catch (...) {
        errors[t] = std::current_exception();
      }
    });
  try {
    fn(0);
  } catch (...) {
    errors[0] = std::current_exception();
  }
  for (auto& th : pool) th.join();
  for (auto& e : errors)
    if (e) std::rethrow_exception(e);
}

// Hands out work items [0, count) one at a time to whichever thread asks next.
class WorkQueue {
 public:
  explicit WorkQueue(long long count) : count_(count) {}
  bool next(long long* item) {
    long long i = next_.fetch_add(1, std::memory_order_relaxed);
    if (i >= count_) return false;
    *item = i;
    return true;
  }

 private:
  long long count_;
  std::atomic<long long> next_{0};
};

}  // namespace plm::cpu
