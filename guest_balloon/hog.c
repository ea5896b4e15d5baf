/*
 * hog: allocate and write hog_mib MiB, hold it idle for hog_hold_s seconds
 * (forever if negative), then free it and exit.
 *
 * Parameters (key=value): hog_mib (default 64), hog_hold_s (default -1),
 * fill=unique|zero|shared (default unique), seed (default random).
 *
 * Lines:
 *   event=hog_start mib=M hold_s=S fill=F seed=0xX
 *   event=hog_touched mib=M fill=F touch_s=T
 *   event=hog_freed mib=M
 *   event=error workload=hog what=... errno=N
 */
#include "common.h"

#include <errno.h>
#include <inttypes.h>
#include <sys/mman.h>
#include <unistd.h>

int main(int argc, char **argv)
{
	long mib, hold_s;
	enum fill fill;

	if (param_long(argc, argv, "hog_mib", 64, &mib) < 0 ||
	    param_long(argc, argv, "hog_hold_s", -1, &hold_s) < 0 ||
	    param_fill(argc, argv, &fill) < 0)
		return 2;
	if (mib <= 0) {
		say("event=error workload=hog what=bad_param key=hog_mib value=%ld", mib);
		return 2;
	}
	uint64_t seed = param_seed(argc, argv);
	size_t bytes = (size_t)mib * MIB;

	say("event=hog_start mib=%ld hold_s=%ld fill=%s seed=0x%016" PRIx64,
	    mib, hold_s, fill_name(fill), seed);
	double t0 = now_s();
	void *mem = alloc_filled(bytes, fill, seed);
	if (mem == NULL) {
		say_errno("mmap", errno);
		return 1;
	}
	say("event=hog_touched mib=%ld fill=%s touch_s=%.2f", mib, fill_name(fill), now_s() - t0);

	if (hold_s < 0) {
		for (;;)
			pause();
	}
	sleep_until(now_s() + (double)hold_s);
	if (munmap(mem, bytes) != 0) {
		say_errno("munmap", errno);
		return 1;
	}
	say("event=hog_freed mib=%ld", mib);
	return 0;
}
