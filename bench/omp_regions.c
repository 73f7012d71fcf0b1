// LD_PRELOAD shim for bench/omp_regions.py: prints every OpenMP parallel region libgomp opens while
// the file named by OMP_REGIONS_FLAG exists, with the region's thread count and the shared objects
// of its callers with the offsets and exported symbols there. A region of more than one thread is one that, beside a busy process,
// can wait for a descheduled thread at its closing barrier.
#define _GNU_SOURCE
#include <dlfcn.h>
#include <execinfo.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static int recording(void) {
  const char* flag = getenv("OMP_REGIONS_FLAG");
  return flag && access(flag, F_OK) == 0;
}

void GOMP_parallel(void (*fn)(void*), void* data, unsigned num_threads, unsigned flags) {
  static void (*real)(void (*)(void*), void*, unsigned, unsigned);
  static int (*max_threads)(void);
  if (!real) real = (void (*)(void (*)(void*), void*, unsigned, unsigned))dlsym(RTLD_NEXT, "GOMP_parallel");
  if (!max_threads) max_threads = (int (*)(void))dlsym(RTLD_DEFAULT, "omp_get_max_threads");
  if (recording()) {
    void* frames[12];
    const int n = backtrace(frames, 12);
    const int threads = num_threads ? (int)num_threads : (max_threads ? max_threads() : -1);
    fprintf(stderr, "OMP_REGION threads=%d", threads);
    for (int i = 1; i < n; ++i) {
      Dl_info info;
      if (!dladdr(frames[i], &info)) continue;
      // file, offset in it (for addr2line when the symbol is not exported), exported symbol or ?
      fprintf(stderr, " | %s+0x%lx:%s", info.dli_fname,
              (unsigned long)((char*)frames[i] - (char*)info.dli_fbase), info.dli_sname ? info.dli_sname : "?");
    }
    fputc('\n', stderr);
  }
  real(fn, data, num_threads, flags);
}
