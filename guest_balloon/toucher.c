/*
 * toucher: allocate alloc_mib MiB, write every page once, then keep touching a
 * working set -- the first ws MiB of the allocation -- at `rate` passes per
 * second, where a pass writes one word of every working-set page.
 *
 * Parameters (key=value):
 *   alloc_mib  MiB to allocate (default: the largest working set; 64 if none)
 *   ws         working-set schedule "MIB[:SECONDS][,MIB[:SECONDS]]..." (default:
 *              alloc_mib).  Each phase lasts SECONDS; only the last may omit it
 *              and then lasts forever; if the last has a duration too, the
 *              schedule repeats.  "40:60,120": 40 MiB for 60 s, then 120 MiB.
 *              "0:30,100:30": idle 30 s, 100 MiB 30 s, and again.
 *   rate       passes per second, fractions allowed; 0 = back to back (default 1)
 *   fill, seed as in common.h (default unique, random)
 *
 * A touch writes the page's last word: with fill=unique it stores the pass count
 * (the page changes and stays unique); with zero or shared it stores the value
 * already there (a write access that keeps the content shareable).
 *
 * Lines:
 *   event=toucher_start alloc_mib=A ws=SCHEDULE rate=R fill=F seed=0xX
 *   event=toucher_filled alloc_mib=A fill_s=T
 *   event=toucher_ws t_s=T.T ws_mib=W previous_mib=P    (at each phase change)
 *   event=toucher t_s=T ws_mib=W alloc_mib=A passes=N   (every second)
 *   event=error workload=toucher what=... errno=N
 * t_s counts seconds since the allocation was filled; passes is cumulative.
 */
#include "common.h"

#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#define MAX_PHASES 32

struct phase {
	long mib;
	double duration_s; /* < 0: forever (only the last phase) */
};

struct schedule {
	struct phase phase[MAX_PHASES];
	int n;
	double cycle_s; /* sum of durations; used when the last phase is finite */
};

static int parse_schedule(const char *s, struct schedule *sch)
{
	char *end;

	sch->n = 0;
	sch->cycle_s = 0;
	for (;;) {
		struct phase *ph = &sch->phase[sch->n];

		if (sch->n == MAX_PHASES)
			return -1;
		ph->mib = strtol(s, &end, 10);
		if (end == s || ph->mib < 0)
			return -1;
		ph->duration_s = -1;
		if (*end == ':') {
			s = end + 1;
			ph->duration_s = strtod(s, &end);
			if (end == s || ph->duration_s <= 0)
				return -1;
			sch->cycle_s += ph->duration_s;
		}
		sch->n++;
		if (*end == '\0')
			return 0;
		if (*end != ',' || ph->duration_s < 0)
			return -1; /* only the last phase may be endless */
		s = end + 1;
	}
}

static long ws_at(const struct schedule *sch, double t_s)
{
	if (sch->phase[sch->n - 1].duration_s > 0)
		t_s -= sch->cycle_s * (double)(long)(t_s / sch->cycle_s);
	for (int i = 0; i < sch->n; i++) {
		if (sch->phase[i].duration_s < 0 || t_s < sch->phase[i].duration_s)
			return sch->phase[i].mib;
		t_s -= sch->phase[i].duration_s;
	}
	return sch->phase[sch->n - 1].mib;
}

static long max_ws(const struct schedule *sch)
{
	long m = 0;

	for (int i = 0; i < sch->n; i++)
		if (sch->phase[i].mib > m)
			m = sch->phase[i].mib;
	return m;
}

/* The next tick after `tick` one period on; a missed tick is skipped, not made up. */
static double next_tick(double tick, double period_s, double now)
{
	return tick + period_s > now ? tick + period_s : now + period_s;
}

static void touch(uint64_t *mem, long ws_mib, enum fill fill, uint64_t pass)
{
	size_t pages = (size_t)ws_mib * MIB / 4096;
	volatile uint64_t *last = mem + PAGE_WORDS - 1;

	for (size_t p = 0; p < pages; p++, last += PAGE_WORDS)
		*last = fill == FILL_UNIQUE ? pass : *last;
}

int main(int argc, char **argv)
{
	struct schedule sch;
	long alloc_mib;
	double rate;
	enum fill fill;
	const char *ws = param_str(argc, argv, "ws", NULL);

	if (ws != NULL && parse_schedule(ws, &sch) < 0) {
		say("event=error workload=toucher what=bad_param key=ws value=%s", ws);
		return 2;
	}
	if (param_long(argc, argv, "alloc_mib", ws != NULL ? max_ws(&sch) : 64, &alloc_mib) < 0 ||
	    param_double(argc, argv, "rate", 1.0, &rate) < 0 || param_fill(argc, argv, &fill) < 0)
		return 2;
	if (ws == NULL) {
		sch.n = 1;
		sch.phase[0] = (struct phase){ .mib = alloc_mib, .duration_s = -1 };
	}
	if (alloc_mib <= 0 || max_ws(&sch) > alloc_mib || rate < 0) {
		say("event=error workload=toucher what=bad_param alloc_mib=%ld max_ws_mib=%ld rate=%g",
		    alloc_mib, max_ws(&sch), rate);
		return 2;
	}
	uint64_t seed = param_seed(argc, argv);

	say("event=toucher_start alloc_mib=%ld ws=%s rate=%g fill=%s seed=0x%016" PRIx64,
	    alloc_mib, ws != NULL ? ws : "all", rate, fill_name(fill), seed);
	double t0 = now_s();
	uint64_t *mem = alloc_filled((size_t)alloc_mib * MIB, fill, seed);
	if (mem == NULL) {
		say_errno("mmap", errno);
		return 1;
	}
	double start = now_s();
	say("event=toucher_filled alloc_mib=%ld fill_s=%.2f", alloc_mib, start - t0);

	uint64_t passes = 0;
	long ws_mib = ws_at(&sch, 0);
	double next_pass = start, next_report = start + 1;
	for (;;) {
		double now = now_s();
		long want = ws_at(&sch, now - start);

		if (want != ws_mib) {
			say("event=toucher_ws t_s=%.1f ws_mib=%ld previous_mib=%ld",
			    now - start, want, ws_mib);
			ws_mib = want;
		}
		if (now >= next_report) {
			say("event=toucher t_s=%.0f ws_mib=%ld alloc_mib=%ld passes=%" PRIu64,
			    now - start, ws_mib, alloc_mib, passes);
			next_report = next_tick(next_report, 1, now);
		}
		if (now >= next_pass) {
			touch(mem, ws_mib, fill, ++passes);
			next_pass = rate > 0 ? next_tick(next_pass, 1 / rate, now) : now;
		}
		if (rate > 0)
			sleep_until(next_pass < next_report ? next_pass : next_report);
	}
}
