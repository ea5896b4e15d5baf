/*
 * Helpers shared by the hv guest workloads (toucher, hog, filecache).
 *
 * Workloads take their parameters as key=value arguments; the guest init passes
 * every "hv.KEY=VALUE" word of the kernel command line as "KEY=VALUE", so a
 * workload simply looks up the keys it knows.  Every line a workload prints is
 * "hv-guest: key=value ..." written with one write(2), so lines from the
 * workloads and from init never interleave.  Values never contain spaces.
 */
#ifndef HV_GUEST_COMMON_H
#define HV_GUEST_COMMON_H

#include <stddef.h>
#include <stdint.h>

#define MIB ((size_t)1 << 20)

enum fill {
	FILL_UNIQUE, /* random words from the seed and page index: shares with nothing */
	FILL_ZERO,   /* one zero word written: an allocated page of zeros */
	FILL_SHARED, /* a fixed pattern per page index: identical across guests */
};

/* The value of KEY among argv[1..argc-1] ("KEY=VALUE"), or dflt if absent. */
const char *param_str(int argc, char **argv, const char *key, const char *dflt);

/* Parse KEY as a number; on a malformed value print event=error and return -1. */
int param_long(int argc, char **argv, const char *key, long dflt, long *out);
int param_double(int argc, char **argv, const char *key, double dflt, double *out);
int param_fill(int argc, char **argv, enum fill *out);

/* The seed for FILL_UNIQUE: hv.seed if given, else fresh random bytes. */
uint64_t param_seed(int argc, char **argv);

const char *fill_name(enum fill fill);

/* Print "hv-guest: " followed by the formatted text and a newline, in one write. */
void say(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* The program's name without its "hv-" prefix: "toucher", "hog", "filecache". */
const char *workload_name(void);

/* Print "hv-guest: event=error workload=NAME what=WHAT errno=N". */
void say_errno(const char *what, int err);

/* Seconds on CLOCK_MONOTONIC. */
double now_s(void);

/* Sleep until the CLOCK_MONOTONIC time t_s (returns at once if it has passed). */
void sleep_until(double t_s);

/* mmap `bytes` of anonymous memory and write every page once with `fill`.
 * Returns NULL with errno set on failure. */
void *alloc_filled(size_t bytes, enum fill fill, uint64_t seed);

#define PAGE_WORDS (4096 / sizeof(uint64_t))

#endif
