/* Helpers shared by the hv guest workloads; see common.h. */
#define _GNU_SOURCE
#include "common.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <time.h>
#include <unistd.h>

/* The base of the FILL_SHARED pattern: any constant works, it only has to be the
 * same in every guest. */
static const uint64_t shared_seed = 0x68762d7368617265ULL; /* "hv-share" */

const char *param_str(int argc, char **argv, const char *key, const char *dflt)
{
	size_t n = strlen(key);

	for (int i = 1; i < argc; i++)
		if (strncmp(argv[i], key, n) == 0 && argv[i][n] == '=')
			return argv[i] + n + 1;
	return dflt;
}

int param_long(int argc, char **argv, const char *key, long dflt, long *out)
{
	const char *s = param_str(argc, argv, key, NULL);
	char *end;

	if (s == NULL) {
		*out = dflt;
		return 0;
	}
	errno = 0;
	*out = strtol(s, &end, 10);
	if (errno != 0 || end == s || *end != '\0') {
		say("event=error workload=%s what=bad_param key=%s value=%s", workload_name(), key, s);
		return -1;
	}
	return 0;
}

int param_double(int argc, char **argv, const char *key, double dflt, double *out)
{
	const char *s = param_str(argc, argv, key, NULL);
	char *end;

	if (s == NULL) {
		*out = dflt;
		return 0;
	}
	errno = 0;
	*out = strtod(s, &end);
	if (errno != 0 || end == s || *end != '\0') {
		say("event=error workload=%s what=bad_param key=%s value=%s", workload_name(), key, s);
		return -1;
	}
	return 0;
}

int param_fill(int argc, char **argv, enum fill *out)
{
	const char *s = param_str(argc, argv, "fill", "unique");

	if (strcmp(s, "unique") == 0)
		*out = FILL_UNIQUE;
	else if (strcmp(s, "zero") == 0)
		*out = FILL_ZERO;
	else if (strcmp(s, "shared") == 0)
		*out = FILL_SHARED;
	else {
		say("event=error workload=%s what=bad_param key=fill value=%s", workload_name(), s);
		return -1;
	}
	return 0;
}

uint64_t param_seed(int argc, char **argv)
{
	const char *s = param_str(argc, argv, "seed", NULL);
	uint64_t seed;

	if (s != NULL)
		return strtoull(s, NULL, 0);
	/* GRND_INSECURE never blocks, even before the guest's CRNG is ready. */
	if (getrandom(&seed, sizeof(seed), GRND_INSECURE) == sizeof(seed))
		return seed;
	struct timespec ts;
	clock_gettime(CLOCK_REALTIME, &ts);
	return ((uint64_t)ts.tv_sec << 32) ^ (uint64_t)ts.tv_nsec ^ (uint64_t)getpid();
}

const char *fill_name(enum fill fill)
{
	switch (fill) {
	case FILL_UNIQUE:
		return "unique";
	case FILL_ZERO:
		return "zero";
	case FILL_SHARED:
		return "shared";
	}
	return "?";
}

void say(const char *fmt, ...)
{
	char line[512] = "hv-guest: ";
	size_t head = strlen(line);
	va_list ap;
	int n;

	va_start(ap, fmt);
	n = vsnprintf(line + head, sizeof(line) - head - 1, fmt, ap);
	va_end(ap);
	if (n < 0)
		return;
	size_t len = head + ((size_t)n < sizeof(line) - head - 1 ? (size_t)n : sizeof(line) - head - 2);
	line[len++] = '\n';
	/* One write per line; a short write to the console is not worth retrying. */
	if (write(STDOUT_FILENO, line, len) < 0)
		return;
}

const char *workload_name(void)
{
	const char *name = program_invocation_short_name;

	return strncmp(name, "hv-", 3) == 0 ? name + 3 : name;
}

void say_errno(const char *what, int err)
{
	say("event=error workload=%s what=%s errno=%d", workload_name(), what, err);
}

double now_s(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

void sleep_until(double t_s)
{
	struct timespec ts = {
		.tv_sec = (time_t)t_s,
		.tv_nsec = (long)((t_s - (double)(time_t)t_s) * 1e9),
	};

	while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR)
		;
}

/* splitmix64: a fast, well-mixed function of a counter. */
static uint64_t mix64(uint64_t x)
{
	x += 0x9e3779b97f4a7c15ULL;
	x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
	x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
	return x ^ (x >> 31);
}

static void fill_page(uint64_t *page, size_t index, enum fill fill, uint64_t seed)
{
	if (fill == FILL_ZERO) {
		page[0] = 0;
		return;
	}
	/* Word 0 is the page's own tag; the rest is a xorshift stream from it. */
	uint64_t x = mix64((fill == FILL_SHARED ? shared_seed : seed) ^ mix64(index));

	page[0] = x;
	for (size_t i = 1; i < PAGE_WORDS; i++) {
		x ^= x << 13;
		x ^= x >> 7;
		x ^= x << 17;
		page[i] = x;
	}
}

void *alloc_filled(size_t bytes, enum fill fill, uint64_t seed)
{
	uint64_t *mem = mmap(NULL, bytes, PROT_READ | PROT_WRITE,
			     MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);

	if (mem == MAP_FAILED)
		return NULL;
	for (size_t p = 0; p < bytes / 4096; p++)
		fill_page(mem + p * PAGE_WORDS, p, fill, seed);
	return mem;
}
