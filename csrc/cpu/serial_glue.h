// Serial glue: while a training step runs, the small torch ops around our kernels (concatenating
// targets and samples, scaling by grad_loss, the proposal scores' product, the finiteness check, the
// touched-row marks: O(B * M) or O(B * K * d) work) run on the calling thread alone, and only our
// kernels (O(B * M * d), rows handed out in chunks: parallel_chunks.h) use every thread. Each of
// those torch ops would otherwise open an OpenMP region that splits its elements in equal parts up
// front and ends in a barrier: on a machine where another process holds a core, every such region
// waits for a descheduled thread for up to a scheduler slice, and a step has a dozen of them.
//
// The switch is per thread (OpenMP's nthreads ICV and MKL's local thread count of the calling
// thread), so other threads of the process keep their settings. Nested switches are counted.
#pragma once

namespace imi_softmax {

// Turns serial glue on (true) or off (false) for the calling thread; returns whether it was on.
// Turning it off restores the thread counts that were in place when it was first turned on.
bool set_serial_glue(bool on);

// The number of threads our kernels use on this thread: the count saved by set_serial_glue while
// it is on, otherwise at::get_num_threads().
int kernel_threads();

// While alive, the calling thread's OpenMP regions use kernel_threads() threads again (a no-op when
// serial glue is off). parallel_chunks opens its region inside one.
class KernelThreadsScope {
 public:
  KernelThreadsScope();
  ~KernelThreadsScope();
  KernelThreadsScope(const KernelThreadsScope&) = delete;
  KernelThreadsScope& operator=(const KernelThreadsScope&) = delete;

 private:
  bool restored_;
};

}  // namespace imi_softmax
