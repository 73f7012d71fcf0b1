#include "serial_glue.h"

#include <ATen/Parallel.h>
#include <omp.h>

// MKL's per-thread thread count, exported by torch's CPU library when it is built with MKL; weak, so
// that a torch without MKL still loads this library (the pointer is then null and only OpenMP's
// count is switched).
extern "C" int MKL_Set_Num_Threads_Local(int) __attribute__((weak));

namespace imi_softmax {
namespace {

struct GlueState {
  int depth = 0;          // nested set_serial_glue(true) calls not yet undone
  int kernel_threads = 0;  // OpenMP's count when the outermost switch was turned on
  int mkl_local = 0;       // MKL's local count then (0 = "use the global one")
};

thread_local GlueState state;

}  // namespace

bool set_serial_glue(bool on) {
  const bool was_on = state.depth > 0;
  if (on) {
    if (state.depth++ == 0) {
      state.kernel_threads = omp_get_max_threads();
      omp_set_num_threads(1);
      state.mkl_local = MKL_Set_Num_Threads_Local ? MKL_Set_Num_Threads_Local(1) : 0;
    }
  } else if (state.depth > 0 && --state.depth == 0) {
    omp_set_num_threads(state.kernel_threads);
    if (MKL_Set_Num_Threads_Local) MKL_Set_Num_Threads_Local(state.mkl_local);
    state.kernel_threads = 0;
  }
  return was_on;
}

int kernel_threads() { return state.depth > 0 ? state.kernel_threads : at::get_num_threads(); }

KernelThreadsScope::KernelThreadsScope() : restored_(state.depth > 0 && state.kernel_threads > 1) {
  if (restored_) omp_set_num_threads(state.kernel_threads);
}

KernelThreadsScope::~KernelThreadsScope() {
  if (restored_) omp_set_num_threads(1);
}

}  // namespace imi_softmax
