/*
 * hv native scanner: the per-page work of hv, called from Python through cffi.
 *
 * Every function returns a non-negative value on success and -errno on failure;
 * hv/host/native.py turns a negative value into hv.errors.NativeError.
 *
 * Reading another process's memory has two traps (see design.md, "Facts of the
 * machines"): reading a page that is not present faults it in, and pinning a
 * shared anonymous page (process_vm_readv pins what it reads) unshares it, so
 * one read of a KSM page undoes its merge.  hv_scan therefore reads
 * /proc/PID/pagemap first, /proc/kpageflags for the present frames, and then
 * reads only present, non-KSM, non-zero-page pages: with process_vm_readv (one
 * copy in the kernel) where a fresh look at pagemap and kpageflags just before
 * the read shows a page mapped exclusively and not KSM, and with pread() on
 * /proc/PID/mem (two copies, but it neither pins nor faults present pages)
 * for every other page.
 */
#ifndef HV_SCANNER_H
#define HV_SCANNER_H

#include <stddef.h>
#include <stdint.h>

/* Per-page flags written by hv_scan (uint16 per page). */
#define HV_PAGE_PRESENT   0x0001  /* pagemap bit 63 */
#define HV_PAGE_SWAPPED   0x0002  /* pagemap bit 62 */
#define HV_PAGE_EXCLUSIVE 0x0004  /* pagemap bit 56: mapped by this process only */
#define HV_PAGE_FILE      0x0008  /* pagemap bit 61: file page or shared anon */
#define HV_PAGE_KSM       0x0010  /* kpageflags KPF_KSM: merged by KSM, not read (see hv_scan) */
#define HV_PAGE_ZERO_PAGE 0x0020  /* kpageflags KPF_ZERO_PAGE: maps the shared zero page */
#define HV_PAGE_ZERO      0x0040  /* all-zero content, or maps the zero page */
#define HV_PAGE_THP       0x0080  /* kpageflags KPF_THP: part of a transparent huge page (see hv_scan) */
#define HV_PAGE_HUGE      0x0100  /* kpageflags KPF_HUGE: hugetlbfs page */
#define HV_PAGE_READ      0x0200  /* content read and hashed by this scan */
#define HV_PAGE_VANISHED  0x0400  /* present in pagemap, but gone when read */
#define HV_PAGE_NOFLAGS   0x0800  /* frame flags unknown (no /proc/kpageflags, no PFN) */

/* hv_scan options. */
#define HV_SCAN_NO_READ   0x1  /* pagemap and kpageflags only: no content, no hashes */
#define HV_SCAN_ALL_FLAGS 0x2  /* kpageflags for every present page, not only shared ones */
#define HV_SCAN_PREAD_ONLY 0x4 /* read every page through /proc/PID/mem, never process_vm_readv */

struct hv_scan_counts {
    uint64_t pages;      /* pages in the ranges */
    uint64_t present;    /* pagemap present */
    uint64_t swapped;    /* pagemap swapped */
    uint64_t read;       /* read and hashed */
    uint64_t bytes_read; /* bytes read, both ways (process_vm_readv and /proc/PID/mem) */
    uint64_t preads;     /* pread() calls on /proc/PID/mem */
    uint64_t ksm;        /* KPF_KSM */
    uint64_t zero;       /* HV_PAGE_ZERO: all-zero content or the zero page */
    uint64_t zero_page;  /* mapping the zero page */
    uint64_t thp;        /* KPF_THP */
    uint64_t vanished;   /* present in pagemap, unreadable when read */
    uint64_t noflags;    /* present without frame flags */
    uint64_t readvs;     /* process_vm_readv() calls */
    uint64_t bytes_readv; /* of bytes_read, read through process_vm_readv */
    uint64_t readv_declined; /* exclusive anonymous pages read by pread instead: the fresh
                              * check found them remapped, shared or KSM, or readv failed */
    uint64_t readv_huge; /* readv candidates that PAGEMAP_SCAN found PMD-mapped (huge
                          * pages: never KSM), so no kpageflags read was needed */
};

/*
 * Scan guest RAM of process `pid`: `nranges` ranges of host-virtual addresses
 * starts[i] .. starts[i] + lengths[i] (page aligned).  The output arrays hold
 * one entry per page, the ranges concatenated in order, and must have
 * `npages` = sum(lengths) / 4096 entries.  `batch_bytes` bounds one pread()
 * (0 = default); `options` is a mask of HV_SCAN_*.
 *
 * Reading /proc/kpageflags costs 60-90 ns per frame here, a tenth of reading
 * and hashing the page, so the frame flags reported are by default those of
 * present pages that pagemap does not mark exclusive (bit 56: mapped once) or
 * marks as file pages: shared pages, KSM pages mapped more than once and
 * zero-page mappings.  A KSM page mapped just once shares nothing; it is
 * reported unflagged and read (through /proc/PID/mem: pread does not unmerge
 * it), and exclusive pages carry no THP/HUGE flag.  HV_SCAN_ALL_FLAGS reports
 * the frame flags of every present page.
 *
 * Content is read in windows of batch_bytes.  An exclusive anonymous page is
 * read with process_vm_readv when, just before the read, its pagemap entry is
 * still the one the chunk saw (same frame, present, exclusive, anonymous) and
 * that frame's kpageflags show neither KSM nor the zero page (or, for a page
 * of a transparent huge page, PAGEMAP_SCAN shows it mapped by a PMD, which a
 * KSM page never is); every other page is read with pread on /proc/PID/mem.
 * HV_SCAN_PREAD_ONLY reads everything with pread.  Returns 0, or -errno: -ESRCH when the process is gone or exits
 * during the scan, -EINVAL for bad arguments, -EPERM/-EACCES without the
 * privilege to read the process.
 */
int hv_scan(int pid, const uint64_t *starts, const uint64_t *lengths, size_t nranges,
            uint64_t *hashes, uint16_t *flags, uint64_t *pfns, size_t npages,
            size_t batch_bytes, unsigned options, struct hv_scan_counts *counts);

/*
 * Fill out[i] with HV_PAGE_PRESENT / HV_PAGE_SWAPPED / HV_PAGE_EXCLUSIVE from
 * the pagemap entry of page address addrs[i].  Returns the number of present
 * pages, or -errno (-ESRCH: no such process; -EINVAL: not a user address).
 */
int64_t hv_present(int pid, const uint64_t *addrs, size_t n, uint8_t *out);

/*
 * process_madvise(MADV_PAGEOUT) on the pages at addrs[0..n) of process `pid`
 * (adjacent pages are coalesced, IOV_MAX iovecs per call).  A range the
 * kernel refuses (ENOMEM: no longer mapped; EINVAL: locked, PFN-mapped or
 * hugetlb) is skipped.  Returns the number of bytes the kernel reported
 * advised (advised is not paged out: read pagemap after), or -errno; -EINVAL
 * when no range could be advised because of EINVAL.
 */
int64_t hv_pageout(int pid, const uint64_t *addrs, size_t n);

/* XXH3-64 of each of the npages 4 KiB pages at buf (a baseline for benchmarks). */
void hv_hash_pages(const void *buf, size_t npages, uint64_t *out);

/* Copy `bytes` between two buffers `rounds` times; returns the elapsed seconds,
 * or a negative value when the buffers cannot be allocated. */
double hv_memcpy_seconds(size_t bytes, unsigned rounds);

#endif
