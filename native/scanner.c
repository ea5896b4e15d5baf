/*
 * hv native scanner; see scanner.h for the contract of each function.
 *
 * One scan walks each range in chunks of CHUNK_PAGES pages (one read window
 * of batch_bytes when process_vm_readv is in use, see scan_chunk):
 *   1. pread the chunk's /proc/PID/pagemap entries;
 *   2. pread /proc/kpageflags for the present frames that may be shared (see
 *      scanner.h) and for the candidates for process_vm_readv, coalescing
 *      nearby frame numbers into one read (sorted by frame in large chunks);
 *      candidates in transparent huge pages are cleared by one PAGEMAP_SCAN
 *      ioctl instead of 512 kpageflags entries per huge page (chunk_huge);
 *   3. read the content of present pages that are neither KSM nor the zero
 *      page, in windows of batch_bytes, and hash each 4 KiB page with XXH3-64;
 *      a page whose hash is that of a zero page is compared with zeros.
 *
 * Step 3 has two ways to read (the choice is explained at scan_chunk):
 *   - process_vm_readv for pages that pagemap shows mapped exclusively and
 *     kpageflags shows not KSM, both read just before (a chunk is then one
 *     read window): the kernel copies each page once, straight into our buffer;
 *   - pread on /proc/PID/mem for every other page: the kernel copies each page
 *     twice (into a kernel bounce page, then to us), but never pins it, so a
 *     KSM page that slipped through stays merged.
 * A page that can no longer be read in step 3 (unmapped meanwhile) is marked
 * HV_PAGE_VANISHED; a process that exits makes the scan return -ESRCH.
 */
#define _GNU_SOURCE
#include "scanner.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <linux/kernel-page-flags.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>
#include <xxhash.h>

/* libxxhash on x86-64 also exports XXH3_64bits_dispatch, which picks the widest
 * vector unit at run time; XXH3's output does not depend on the path
 * (tests/unit/test_native_api.py compares it with the baseline XXH3_64bits).
 * Measured here (Xeon, AVX-512) both hash a cached 4 KiB page at 35-50 GB/s,
 * ~20 ms of a 1 GiB scan whose kernel copy takes ~110 ms, and an inline
 * AVX2 or AVX-512 build of xxhash.h (XXH_INLINE_ALL + target attribute) was no
 * faster, so the scanner keeps the system library alone. */
#if defined(__x86_64__) && defined(__has_include)
#if __has_include(<xxh_x86dispatch.h>)
#include <xxh_x86dispatch.h>
#define hv_xxh3 XXH3_64bits_dispatch
#endif
#endif
#ifndef hv_xxh3
#define hv_xxh3 XXH3_64bits
#endif

/* PAGEMAP_SCAN, an ioctl on /proc/PID/pagemap since Linux 6.7
 * (include/uapi/linux/fs.h); Debian 12's headers predate it. */
#ifndef PAGEMAP_SCAN
struct page_region {
    uint64_t start, end, categories;
};
struct pm_scan_arg {
    uint64_t size, flags, start, end, walk_end, vec, vec_len, max_pages;
    uint64_t category_inverted, category_mask, category_anyof_mask, return_mask;
};
#define PAGEMAP_SCAN _IOWR('f', 16, struct pm_scan_arg)
#define PAGE_IS_FILE (1 << 2)
#define PAGE_IS_PRESENT (1 << 3)
#define PAGE_IS_PFNZERO (1 << 5)
#define PAGE_IS_HUGE (1 << 6)
#endif

#define PAGE_SHIFT 12
#define PAGE_BYTES ((size_t)1 << PAGE_SHIFT)

/* /proc/PID/pagemap entry bits (Documentation/admin-guide/mm/pagemap.rst). */
#define PM_PRESENT   (1ULL << 63)
#define PM_SWAPPED   (1ULL << 62)
#define PM_FILE      (1ULL << 61)
#define PM_EXCLUSIVE (1ULL << 56)
#define PM_PFN_MASK  ((1ULL << 55) - 1)

/* Pagemap entries read per chunk: 16384 entries = 128 KiB of pagemap = 64 MiB of
 * RAM; larger chunks give denser frame numbers to coalesce in kpageflags. */
#define CHUNK_PAGES 16384
/* Read kpageflags across a gap of up to this many unneeded frames rather than
 * issue another pread: one entry costs ~200 ns here, one pread ~2-3 entries. */
#define KPF_GAP 2
/* Largest single kpageflags read, in entries (64 KiB). */
#define KPF_MAX 8192
/* Default bytes per pread of /proc/PID/mem; small enough that the pages are
 * still in cache when they are hashed right after the read. */
#define DEFAULT_BATCH ((size_t)256 << 10)
#define MAX_BATCH ((size_t)64 << 20)

/* Pages of a 2 MiB huge page, and how many readv candidates of a window must
 * look huge-mapped (frame and address agree modulo 512) before PAGEMAP_SCAN is
 * asked: never on memory in 4 KiB pages, where it would only cost a call. */
#define HUGE_PAGES 512
#define HUGE_MIN_CANDIDATES 16

#ifndef IOV_MAX
#define IOV_MAX 1024
#endif

static int sys_pidfd_open(int pid)
{
    return (int)syscall(SYS_pidfd_open, pid, 0);
}

/* 1 when the process behind pidfd has exited (the pidfd polls readable),
 * waiting up to wait_ms for it. */
static int process_gone_wait(int pidfd, int wait_ms)
{
    struct pollfd p = {.fd = pidfd, .events = POLLIN, .revents = 0};
    if (pidfd < 0)
        return 0;
    return poll(&p, 1, wait_ms) > 0 && (p.revents & (POLLIN | POLLHUP | POLLERR));
}

static int process_gone(int pidfd)
{
    return process_gone_wait(pidfd, 0);
}

/* pread until len bytes, end of file or an error; returns bytes read or -errno. */
static ssize_t pread_full(int fd, void *buf, size_t len, uint64_t off)
{
    size_t done = 0;
    while (done < len) {
        ssize_t r = pread(fd, (char *)buf + done, len - done, (off_t)(off + done));
        if (r < 0) {
            if (errno == EINTR)
                continue;
            return done ? (ssize_t)done : -errno;
        }
        if (r == 0)
            break;
        done += (size_t)r;
    }
    return (ssize_t)done;
}

/* Open /proc/PID/<name>; a missing process is -ESRCH. */
static int open_proc(int pid, const char *name)
{
    char path[64];
    snprintf(path, sizeof path, "/proc/%d/%s", pid, name);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return errno == ENOENT ? -ESRCH : -errno;
    return fd;
}

static const uint8_t zero_page[PAGE_BYTES] __attribute__((aligned(64)));
static uint64_t zero_hash;

__attribute__((constructor)) static void init_zero_hash(void)
{
    zero_hash = hv_xxh3(zero_page, PAGE_BYTES);
}

static int is_zero(const uint8_t *p)
{
    return memcmp(p, zero_page, PAGE_BYTES) == 0;
}

struct pfn_index {
    uint64_t pfn;
    uint32_t index;
};

static int cmp_pfn(const void *a, const void *b)
{
    uint64_t x = ((const struct pfn_index *)a)->pfn, y = ((const struct pfn_index *)b)->pfn;
    return (x > y) - (x < y);
}

/* How step 3 reads a page of the chunk (struct scan.how). */
enum { HOW_SKIP, HOW_PREAD, HOW_READV };

/* kpf_fetch's mark for a frame whose flags could not be read. */
#define KPF_UNKNOWN UINT64_MAX

struct scan {
    int pid, pidfd, pagemap_fd, mem_fd, kpf_fd;
    int fast;                 /* process_vm_readv allowed for confirmed pages */
    uint64_t *pm;             /* CHUNK_PAGES pagemap entries */
    uint64_t *kpf;            /* KPF_MAX kpageflags entries */
    uint64_t *kraw;           /* CHUNK_PAGES: kpf_fetch's output, by position in order */
    struct pfn_index *order;  /* CHUNK_PAGES frames to look up */
    uint8_t *how;             /* CHUNK_PAGES: HOW_* per page of the chunk */
    uint8_t *huge;            /* CHUNK_PAGES: 1 = PMD-mapped huge page, by PAGEMAP_SCAN */
    int pmscan;               /* PAGEMAP_SCAN available (cleared on its first failure) */
    struct iovec *iov;        /* IOV_MAX remote iovecs for process_vm_readv */
    uint8_t *buf;             /* batch_bytes for the content */
    size_t batch_pages;
    unsigned options;
    uint64_t *hashes;
    uint16_t *flags;
    uint64_t *pfns;
    struct hv_scan_counts *c;
};

/* kpageflags of the m frames in order[]: kraw[q] receives the flags of
 * order[q], or KPF_UNKNOWN past the end of the file.  Frames close together
 * (within KPF_GAP of the previous one, either way) share one read.  With
 * `sort`, order[] is sorted by frame first unless it is ascending already:
 * worth it for the scattered frames of shared pages; the frames of a window of
 * exclusive pages come in runs (mostly descending, as the page allocator hands
 * them out) that need no sort. */
static int kpf_fetch(struct scan *s, size_t m, int sort)
{
    if (sort) {
        for (size_t q = 1; q < m; q++) {
            if (s->order[q].pfn < s->order[q - 1].pfn) {
                qsort(s->order, m, sizeof *s->order, cmp_pfn);
                break;
            }
        }
    }
    for (size_t j = 0; j < m;) {
        uint64_t lo = s->order[j].pfn, hi = lo;
        size_t k = j + 1;
        for (; k < m; k++) {
            uint64_t p = s->order[k].pfn, prev = s->order[k - 1].pfn;
            uint64_t step = p > prev ? p - prev : prev - p;
            uint64_t nlo = p < lo ? p : lo, nhi = p > hi ? p : hi;
            if (step > KPF_GAP || nhi - nlo >= KPF_MAX)
                break;
            lo = nlo;
            hi = nhi;
        }
        ssize_t r = pread_full(s->kpf_fd, s->kpf, (hi - lo + 1) * 8, lo * 8);
        if (r < 0)
            return (int)r;
        uint64_t got = (uint64_t)r / 8;
        for (size_t q = j; q < k; q++) {
            uint64_t rel = s->order[q].pfn - lo;
            s->kraw[q] = rel < got ? s->kpf[rel] : KPF_UNKNOWN;
        }
        j = k;
    }
    return 0;
}

/*
 * Step 2a, for readv candidates in transparent huge pages.  A page that the
 * kernel maps with a PMD (a whole 2 MiB folio) is never a KSM page: KSM merges
 * only small pages and splits a huge page first.  PAGEMAP_SCAN reports which
 * parts of [addr, addr + n pages) are PMD-mapped (PAGE_IS_HUGE, present, not
 * the huge zero page, anonymous) in one call, where kpageflags would read 512
 * frames per huge page; such candidates need no kpageflags (huge[i] = 1).
 * The check is as fresh as the kpageflags one it replaces: ksmd would have to
 * split the page and merge it between this call and the read.
 */
static void chunk_huge(struct scan *s, uint64_t addr, size_t out, size_t n)
{
    size_t aligned = 0;
    memset(s->huge, 0, n);
    if (!s->pmscan)
        return;
    for (size_t i = 0; i < n; i++)
        aligned += s->how[i] == HOW_READV &&
                   ((s->pfns[out + i] ^ ((addr >> PAGE_SHIFT) + i)) & (HUGE_PAGES - 1)) == 0;
    if (aligned < HUGE_MIN_CANDIDATES)
        return;
    struct page_region reg[8];
    struct pm_scan_arg a = {
        .size = sizeof a,
        .start = addr,
        .end = addr + n * PAGE_BYTES,
        .vec = (uint64_t)(uintptr_t)reg,
        .vec_len = sizeof reg / sizeof *reg,
        .category_mask = PAGE_IS_PRESENT | PAGE_IS_HUGE,
        .return_mask = PAGE_IS_PRESENT | PAGE_IS_HUGE | PAGE_IS_PFNZERO | PAGE_IS_FILE,
    };
    long r = ioctl(s->pagemap_fd, PAGEMAP_SCAN, &a);
    if (r < 0) {
        /* ENOTTY/EINVAL before Linux 6.7: kpageflags for every candidate. */
        s->pmscan = 0;
        return;
    }
    for (long k = 0; k < r && (size_t)k < sizeof reg / sizeof *reg; k++) {
        if (reg[k].categories & (PAGE_IS_PFNZERO | PAGE_IS_FILE) || reg[k].start < addr)
            continue;
        size_t lo = (reg[k].start - addr) >> PAGE_SHIFT, hi = (reg[k].end - addr) >> PAGE_SHIFT;
        for (size_t i = lo; i < hi && i < n; i++) {
            s->huge[i] = 1;
            s->c->readv_huge += s->how[i] == HOW_READV;
        }
    }
}

/*
 * Step 2: frame flags for the present pages of a chunk (out = first output
 * index).  Two kinds of page need them: those whose flags are reported (see
 * scanner.h: pages not mapped exclusively, or all with HV_SCAN_ALL_FLAGS), and
 * the candidates for process_vm_readv (how[] == HOW_READV), which must not be
 * KSM pages; a KSM page mapped once goes to pread and stays unreported.
 */
static int chunk_kpageflags(struct scan *s, size_t out, size_t n)
{
    size_t m = 0;
    for (size_t i = 0; i < n; i++) {
        uint16_t f = s->flags[out + i];
        if (!(f & HV_PAGE_PRESENT))
            continue;
        /* Mapped once, anonymous: neither KSM-shared nor the zero page. */
        int report = (f & (HV_PAGE_EXCLUSIVE | HV_PAGE_FILE)) != HV_PAGE_EXCLUSIVE ||
                     (s->options & HV_SCAN_ALL_FLAGS);
        if (!report && (s->how[i] != HOW_READV || s->huge[i]))
            continue;
        uint64_t pfn = s->pfns[out + i];
        if (s->kpf_fd < 0 || pfn == 0) {
            /* (never a readv candidate: those need both) */
            s->flags[out + i] |= HV_PAGE_NOFLAGS;
            s->c->noflags++;
            continue;
        }
        s->order[m].pfn = pfn;
        s->order[m].index = (uint32_t)i;
        m++;
    }
    /* Sorting pays for the scattered frames of a large chunk only; the frames
     * of a readv window come in runs (see kpf_fetch). */
    int rc = kpf_fetch(s, m, n > s->batch_pages || !s->fast);
    if (rc < 0)
        return rc;
    for (size_t q = 0; q < m; q++) {
        uint32_t i = s->order[q].index;
        uint64_t kf = s->kraw[q];
        uint16_t f = s->flags[out + i];
        int report = (f & (HV_PAGE_EXCLUSIVE | HV_PAGE_FILE)) != HV_PAGE_EXCLUSIVE ||
                     (s->options & HV_SCAN_ALL_FLAGS);
        if (s->how[i] == HOW_READV &&
            (kf == KPF_UNKNOWN || (kf & ((1ULL << KPF_KSM) | (1ULL << KPF_ZERO_PAGE))))) {
            s->how[i] = HOW_PREAD;
            s->c->readv_declined++;
        }
        if (!report)
            continue;
        if (kf == KPF_UNKNOWN) {
            s->flags[out + i] |= HV_PAGE_NOFLAGS;
            s->c->noflags++;
            continue;
        }
        uint16_t g = 0;
        if (kf & (1ULL << KPF_KSM))
            g |= HV_PAGE_KSM;
        if (kf & (1ULL << KPF_ZERO_PAGE))
            g |= HV_PAGE_ZERO_PAGE | HV_PAGE_ZERO;
        if (kf & (1ULL << KPF_THP))
            g |= HV_PAGE_THP;
        if (kf & (1ULL << KPF_HUGE))
            g |= HV_PAGE_HUGE;
        s->flags[out + i] |= g;
        s->c->ksm += !!(g & HV_PAGE_KSM);
        s->c->zero_page += !!(g & HV_PAGE_ZERO_PAGE);
        s->c->zero += !!(g & HV_PAGE_ZERO_PAGE);
        s->c->thp += !!(g & HV_PAGE_THP);
        /* KSM and zero-page mappings are known by their frame: never read. */
        if (g & (HV_PAGE_KSM | HV_PAGE_ZERO_PAGE))
            s->how[i] = HOW_SKIP;
    }
    return 0;
}

/* Record the hash of the page at p, read for output index idx. */
static void hash_page(struct scan *s, const uint8_t *p, size_t idx)
{
    uint64_t h = hv_xxh3(p, PAGE_BYTES);
    uint16_t f = HV_PAGE_READ;
    if (h == zero_hash && is_zero(p)) {
        f |= HV_PAGE_ZERO;
        s->c->zero++;
    }
    s->hashes[idx] = h;
    s->flags[idx] |= f;
}

/* Step 3 for one run of readable pages: addr, npg pages, first output index out. */
static int read_run(struct scan *s, uint64_t addr, size_t npg, size_t out)
{
    size_t done = 0;
    while (done < npg) {
        size_t want = (npg - done) * PAGE_BYTES;
        ssize_t r = pread(s->mem_fd, s->buf, want, (off_t)(addr + done * PAGE_BYTES));
        s->c->preads++;
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0 && errno != EIO && errno != EFAULT && errno != ENOMEM)
            return -errno;
        if (r <= 0) {
            /* Nothing readable at this page: unmapped since pagemap, or the
             * process's memory is gone altogether. */
            if (process_gone(s->pidfd))
                return -ESRCH;
            s->flags[out + done] |= HV_PAGE_VANISHED;
            s->c->vanished++;
            done++;
            continue;
        }
        s->c->bytes_read += (uint64_t)r;
        size_t full = (size_t)r / PAGE_BYTES;
        for (size_t j = 0; j < full; j++)
            hash_page(s, s->buf + j * PAGE_BYTES, out + done + j);
        s->c->read += full;
        /* A short read stops at a page that could not be read whole; the
         * next pread starts at that page and finds out why. */
        done += full;
        if (!full) {
            s->flags[out + done] |= HV_PAGE_VANISHED;
            s->c->vanished++;
            done++;
        }
    }
    return 0;
}

/* Step 3, fast way: process_vm_readv the HOW_READV pages of chunk pages
 * [w, w + wn) into buf (IOV_MAX remote iovecs per call) and hash them.  Pages it
 * cannot read become HOW_PREAD, for pread to read or to find vanished. */
static int readv_window(struct scan *s, uint64_t addr, size_t w, size_t wn, size_t out)
{
    size_t i = 0;
    while (i < wn) {
        size_t cnt = 0, npg = 0, end = i;
        for (; end < wn; end++) {
            if (s->how[w + end] != HOW_READV)
                continue;
            uint64_t a = addr + (w + end) * PAGE_BYTES;
            if (cnt && (uint64_t)(uintptr_t)s->iov[cnt - 1].iov_base + s->iov[cnt - 1].iov_len == a) {
                s->iov[cnt - 1].iov_len += PAGE_BYTES;
            } else {
                if (cnt == IOV_MAX)
                    break;
                s->iov[cnt].iov_base = (void *)(uintptr_t)a;
                s->iov[cnt].iov_len = PAGE_BYTES;
                cnt++;
            }
            npg++;
        }
        if (!npg)
            return 0;
        struct iovec local = {.iov_base = s->buf, .iov_len = npg * PAGE_BYTES};
        ssize_t r;
        do
            r = process_vm_readv(s->pid, &local, 1, s->iov, cnt, 0);
        while (r < 0 && errno == EINTR);
        s->c->readvs++;
        if (r < 0) {
            if (errno == ESRCH)
                return -ESRCH;
            /* EFAULT/ENOMEM: the first page is no longer mapped (pread tells
             * vanished from gone); EPERM, ENOSYS and the like: this scan reads
             * the rest with pread. */
            if (errno != EFAULT && errno != ENOMEM)
                s->fast = 0;
            r = 0;
        }
        /* The kernel copies the remote iovecs in order and stops at the first
         * page it cannot read: r bytes are whole pages from the start. */
        size_t full = (size_t)r / PAGE_BYTES, k = 0;
        s->c->bytes_read += (uint64_t)full * PAGE_BYTES;
        s->c->bytes_readv += (uint64_t)full * PAGE_BYTES;
        s->c->read += full;
        for (size_t c = i; c < end; c++) {
            if (s->how[w + c] != HOW_READV)
                continue;
            if (k < full) {
                hash_page(s, s->buf + k * PAGE_BYTES, out + w + c);
                s->how[w + c] = HOW_SKIP;
            } else {
                s->how[w + c] = HOW_PREAD;
                s->c->readv_declined++;
            }
            k++;
        }
        i = end;
    }
    return 0;
}

/* Step 3 for chunk pages [w, w + wn) (chunk at addr, first output index out):
 * the readv candidates first, then runs of the others with pread. */
static int read_window(struct scan *s, uint64_t addr, size_t w, size_t wn, size_t out)
{
    int rc = readv_window(s, addr, w, wn, out);
    if (rc < 0)
        return rc;
    for (size_t i = 0; i < wn;) {
        if (s->how[w + i] != HOW_PREAD) {
            i++;
            continue;
        }
        size_t j = i + 1;
        while (j < wn && s->how[w + j] == HOW_PREAD)
            j++;
        rc = read_run(s, addr + (w + i) * PAGE_BYTES, j - i, out + w + i);
        if (rc < 0)
            return rc;
        i = j;
    }
    return 0;
}

/*
 * One chunk of n pages at addr (first output index out): steps 1-3.
 *
 * Why process_vm_readv is safe here, and the race it leaves.  It pins each page
 * it reads, and pinning a *shared* anonymous page (a KSM page, or one still
 * COW-shared after fork) makes the kernel unshare it: our mapping gets a
 * private copy, and a KSM merge is undone.  Pinning a page mapped exclusively
 * leaves it alone.  So a page is read that way only if pagemap shows it present,
 * anonymous and mapped once (bit 56) and kpageflags shows its frame neither KSM
 * nor the zero page; all other pages are read with pread on /proc/PID/mem,
 * which never pins.
 *
 * Those flags must still hold when the page is pinned, and ksmd can merge a
 * page at any time.  So when readv is in use, a chunk is one read window
 * (batch_bytes, 256 KiB by default): pagemap and kpageflags are read for those
 * pages only, right before they are read, and are at most one window's scan
 * old (~50 us here) when a page is pinned.  (Large chunks, kept for
 * pagemap-only and pread-only scans, would leave ~15 ms.)  A merge inside that
 * window still costs its merge: the page is unshared, and ksmd merges it again
 * on a later pass.  The pages lost per scan are about (ksmd's merges per
 * second) x (window): well under one page at 5,000 merges/s, the fastest
 * governor setting, and none while ksmd idles.  Checking again after the read
 * would only find the damage done, and reading the flags a second time before
 * every pin would cost another pagemap and kpageflags read per page; a small
 * window costs almost nothing.
 *
 * The kpageflags read of exclusive pages is what keeps a KSM page mapped once
 * (its partners wrote to theirs) from being unshared: it saves no memory, so
 * pages_sharing would not change, but KSM would lose the page from its stable
 * tree.  It costs 5-13% of memcpy bandwidth in scripts/bench_scanner.py
 * (kpageflags is ~65 ns per frame here, plus ~350 ns per read, and the frames
 * of memory in 4 KiB pages are scattered: ~0.1 read per page); hv pays it to
 * keep the rule that a frame kpageflags would call KSM is never pinned.  In
 * transparent huge pages (QEMU's guest RAM) PAGEMAP_SCAN answers for a whole
 * window in one call (chunk_huge), ~0.5 us instead of ~4 us.
 */
static int scan_chunk(struct scan *s, uint64_t addr, size_t n, size_t out)
{
    uint64_t want = (uint64_t)n * 8;
    ssize_t r = pread_full(s->pagemap_fd, s->pm, want, (addr >> PAGE_SHIFT) * 8);
    if (r < 0)
        return (int)r;
    if ((uint64_t)r < want)
        /* pagemap answers every user address while the mm lives; a short
         * read means the process has exited (or the range is not user space). */
        return process_gone(s->pidfd) ? -ESRCH : -EINVAL;

    for (size_t i = 0; i < n; i++) {
        uint64_t e = s->pm[i];
        uint16_t f = 0;
        uint64_t pfn = 0;
        uint8_t how = HOW_SKIP;
        if (e & PM_PRESENT) {
            f |= HV_PAGE_PRESENT;
            pfn = e & PM_PFN_MASK;
            s->c->present++;
            how = HOW_PREAD;
            /* readv candidate: mapped once, anonymous; step 2 checks the frame. */
            if (s->fast && (e & (PM_EXCLUSIVE | PM_FILE)) == PM_EXCLUSIVE && pfn)
                how = HOW_READV;
        } else if (e & PM_SWAPPED) {
            f |= HV_PAGE_SWAPPED;
            s->c->swapped++;
        }
        if (e & PM_EXCLUSIVE)
            f |= HV_PAGE_EXCLUSIVE;
        if (e & PM_FILE)
            f |= HV_PAGE_FILE;
        s->flags[out + i] = f;
        s->pfns[out + i] = pfn;
        s->hashes[out + i] = 0;
        s->how[i] = how;
    }

    chunk_huge(s, addr, out, n);
    int rc = chunk_kpageflags(s, out, n);
    if (rc < 0 || (s->options & HV_SCAN_NO_READ))
        return rc;

    for (size_t w = 0; w < n && rc == 0; w += s->batch_pages) {
        size_t wn = n - w < s->batch_pages ? n - w : s->batch_pages;
        rc = read_window(s, addr, w, wn, out);
    }
    return rc;
}

int hv_scan(int pid, const uint64_t *starts, const uint64_t *lengths, size_t nranges,
            uint64_t *hashes, uint16_t *flags, uint64_t *pfns, size_t npages,
            size_t batch_bytes, unsigned options, struct hv_scan_counts *counts)
{
    size_t total = 0;
    for (size_t i = 0; i < nranges; i++) {
        if ((starts[i] | lengths[i]) & (PAGE_BYTES - 1))
            return -EINVAL;
        total += lengths[i] >> PAGE_SHIFT;
    }
    if (total != npages)
        return -EINVAL;
    if (batch_bytes == 0)
        batch_bytes = DEFAULT_BATCH;
    if (batch_bytes < PAGE_BYTES || batch_bytes > MAX_BATCH ||
        (options & ~(HV_SCAN_NO_READ | HV_SCAN_ALL_FLAGS | HV_SCAN_PREAD_ONLY)))
        return -EINVAL;

    memset(counts, 0, sizeof *counts);
    counts->pages = npages;

    struct scan s = {.pid = pid, .pidfd = -1, .pagemap_fd = -1, .mem_fd = -1, .kpf_fd = -1,
                     .hashes = hashes, .flags = flags, .pfns = pfns, .c = counts};
    s.batch_pages = batch_bytes / PAGE_BYTES;
    s.options = options;
    int rc = 0;

    s.pidfd = sys_pidfd_open(pid);
    if (s.pidfd < 0) {
        rc = -errno;
        goto out;
    }
    if ((s.pagemap_fd = open_proc(pid, "pagemap")) < 0) {
        rc = s.pagemap_fd;
        goto out;
    }
    if ((s.mem_fd = open_proc(pid, "mem")) < 0) {
        rc = s.mem_fd;
        goto out;
    }
    /* Without CAP_SYS_ADMIN there are neither frame numbers nor kpageflags:
     * then every present page is read (pread does not unmerge KSM pages). */
    s.kpf_fd = open("/proc/kpageflags", O_RDONLY | O_CLOEXEC);
    /* The fast way needs frame flags to tell KSM pages from the rest. */
    s.fast = s.kpf_fd >= 0 && !(options & (HV_SCAN_NO_READ | HV_SCAN_PREAD_ONLY));

    s.pm = malloc(CHUNK_PAGES * sizeof *s.pm);
    s.kpf = malloc(KPF_MAX * sizeof *s.kpf);
    s.kraw = malloc(CHUNK_PAGES * sizeof *s.kraw);
    s.order = malloc(CHUNK_PAGES * sizeof *s.order);
    s.how = malloc(CHUNK_PAGES * sizeof *s.how);
    s.huge = malloc(CHUNK_PAGES * sizeof *s.huge);
    s.pmscan = s.fast;
    s.iov = malloc(IOV_MAX * sizeof *s.iov);
    if (!s.pm || !s.kpf || !s.kraw || !s.order || !s.how || !s.huge || !s.iov ||
        posix_memalign((void **)&s.buf, PAGE_BYTES, batch_bytes)) {
        s.buf = NULL;
        rc = -ENOMEM;
        goto out;
    }

    /* With readv, one chunk is one read window (see scan_chunk). */
    size_t chunk = s.fast && s.batch_pages < CHUNK_PAGES ? s.batch_pages : CHUNK_PAGES;
    size_t out_index = 0;
    for (size_t i = 0; i < nranges && rc == 0; i++) {
        uint64_t addr = starts[i];
        size_t left = lengths[i] >> PAGE_SHIFT;
        while (left && rc == 0) {
            size_t n = left < chunk ? left : chunk;
            rc = scan_chunk(&s, addr, n, out_index);
            addr += n * PAGE_BYTES;
            out_index += n;
            left -= n;
        }
    }
    /* Pages of a process that exited mid-scan read as vanished; say so.  An
     * exiting process drops its memory a moment before its pidfd turns
     * readable, so when pages vanished, give it that moment. */
    if (rc == 0 && process_gone_wait(s.pidfd, counts->vanished ? 50 : 0))
        rc = -ESRCH;

out:
    free(s.pm);
    free(s.kpf);
    free(s.kraw);
    free(s.order);
    free(s.how);
    free(s.huge);
    free(s.iov);
    free(s.buf);
    if (s.kpf_fd >= 0)
        close(s.kpf_fd);
    if (s.mem_fd >= 0)
        close(s.mem_fd);
    if (s.pagemap_fd >= 0)
        close(s.pagemap_fd);
    if (s.pidfd >= 0)
        close(s.pidfd);
    return rc;
}

int64_t hv_present(int pid, const uint64_t *addrs, size_t n, uint8_t *out)
{
    enum { RUN = 512 };
    uint64_t pm[RUN];
    int pidfd = sys_pidfd_open(pid);
    if (pidfd < 0)
        return -errno;
    int fd = open_proc(pid, "pagemap");
    if (fd < 0) {
        close(pidfd);
        return fd;
    }
    int64_t present = 0;
    for (size_t i = 0; i < n;) {
        /* Coalesce ascending adjacent pages into one read. */
        size_t j = i + 1;
        while (j < n && j - i < RUN &&
               (addrs[j] >> PAGE_SHIFT) == (addrs[j - 1] >> PAGE_SHIFT) + 1)
            j++;
        size_t want = (j - i) * 8;
        ssize_t r = pread_full(fd, pm, want, (addrs[i] >> PAGE_SHIFT) * 8);
        if (r < 0 || (size_t)r < want) {
            /* Short: the mm is gone, or the address is not in user space. */
            int64_t err = r < 0 ? r : process_gone(pidfd) ? -ESRCH : -EINVAL;
            close(fd);
            close(pidfd);
            return err;
        }
        for (size_t k = i; k < j; k++) {
            uint64_t e = pm[k - i];
            uint8_t f = 0;
            if (e & PM_PRESENT) {
                f |= HV_PAGE_PRESENT;
                present++;
            } else if (e & PM_SWAPPED) {
                f |= HV_PAGE_SWAPPED;
            }
            if (e & PM_EXCLUSIVE)
                f |= HV_PAGE_EXCLUSIVE;
            out[k] = f;
        }
        i = j;
    }
    close(fd);
    close(pidfd);
    return present;
}

/* process_madvise(MADV_PAGEOUT) over iov[0..cnt); adds advised bytes to *total.
 * A range the kernel refuses on its own (ENOMEM: no longer mapped; EINVAL: a
 * locked, PFN-mapped or hugetlb mapping) is skipped and its errno kept in
 * *skipped_err; any other error ends the call. */
static int pageout_iovecs(int pidfd, struct iovec *iov, size_t cnt, int64_t *total, int *skipped_err)
{
    size_t off = 0;
    int again = 0;
    while (off < cnt) {
        long r = syscall(SYS_process_madvise, pidfd, iov + off, cnt - off, MADV_PAGEOUT, 0U);
        if (r < 0) {
            if (errno == EINTR || (errno == EAGAIN && ++again < 100))
                continue;
            if (errno == ENOMEM || errno == EINVAL) {
                if (!*skipped_err)
                    *skipped_err = errno;
                off++;
                continue;
            }
            return -errno;
        }
        *total += r;
        /* The kernel advises whole iovecs in order and stops at the first
         * that fails; the loop then retries that one alone to learn why. */
        size_t bytes = (size_t)r;
        while (off < cnt && bytes >= iov[off].iov_len) {
            bytes -= iov[off].iov_len;
            off++;
        }
        if (bytes && off < cnt) {
            iov[off].iov_base = (char *)iov[off].iov_base + bytes;
            iov[off].iov_len -= bytes;
        }
    }
    return 0;
}

int64_t hv_pageout(int pid, const uint64_t *addrs, size_t n)
{
    struct iovec iov[IOV_MAX];
    int64_t total = 0;
    int pidfd = sys_pidfd_open(pid);
    if (pidfd < 0)
        return -errno;
    size_t cnt = 0;
    int rc = 0, skipped_err = 0;
    for (size_t i = 0; i < n && rc == 0; i++) {
        uint64_t a = addrs[i] & ~(uint64_t)(PAGE_BYTES - 1);
        if (cnt && (uint64_t)(uintptr_t)iov[cnt - 1].iov_base + iov[cnt - 1].iov_len == a) {
            iov[cnt - 1].iov_len += PAGE_BYTES;
            continue;
        }
        if (cnt == IOV_MAX) {
            rc = pageout_iovecs(pidfd, iov, cnt, &total, &skipped_err);
            cnt = 0;
        }
        iov[cnt].iov_base = (void *)(uintptr_t)a;
        iov[cnt].iov_len = PAGE_BYTES;
        cnt++;
    }
    if (rc == 0 && cnt)
        rc = pageout_iovecs(pidfd, iov, cnt, &total, &skipped_err);
    /* Nothing could be advised because of the mappings themselves: say why.
     * (Unmapped pages alone are no error: they are not present either.) */
    if (rc == 0 && total == 0 && skipped_err == EINVAL)
        rc = -EINVAL;
    close(pidfd);
    return rc < 0 ? rc : total;
}

void hv_hash_pages(const void *buf, size_t npages, uint64_t *out)
{
    const uint8_t *p = buf;
    for (size_t i = 0; i < npages; i++)
        out[i] = hv_xxh3(p + i * PAGE_BYTES, PAGE_BYTES);
}

double hv_memcpy_seconds(size_t bytes, unsigned rounds)
{
    char *src = malloc(bytes), *dst = malloc(bytes);
    if (!src || !dst) {
        free(src);
        free(dst);
        return -1.0;
    }
    memset(src, 0x5a, bytes);
    memset(dst, 0xa5, bytes);
    memcpy(dst, src, bytes);  /* warm up */
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (unsigned r = 0; r < rounds; r++) {
        memcpy(dst, src, bytes);
        __asm__ volatile("" : : "r"(dst) : "memory");
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    free(src);
    free(dst);
    return (double)(t1.tv_sec - t0.tv_sec) + (double)(t1.tv_nsec - t0.tv_nsec) * 1e-9;
}
