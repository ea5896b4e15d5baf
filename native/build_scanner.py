"""cffi build script for ``hv._native`` (API mode): only ``set_source`` and ``cdef``.

The C lives in ``scanner.c`` / ``scanner.h`` beside this file and links the system
xxHash library.  Built by ``setup.py`` (``cffi_modules``) or in place with
``python native/build_scanner.py``.
"""

from __future__ import annotations

from pathlib import Path

from cffi import FFI  # type: ignore[import-untyped,unused-ignore]

HERE = Path(__file__).resolve().parent

ffibuilder = FFI()

ffibuilder.cdef(
    """
    #define HV_PAGE_PRESENT ...
    #define HV_PAGE_SWAPPED ...
    #define HV_PAGE_EXCLUSIVE ...
    #define HV_PAGE_FILE ...
    #define HV_PAGE_KSM ...
    #define HV_PAGE_ZERO_PAGE ...
    #define HV_PAGE_ZERO ...
    #define HV_PAGE_THP ...
    #define HV_PAGE_HUGE ...
    #define HV_PAGE_READ ...
    #define HV_PAGE_VANISHED ...
    #define HV_PAGE_NOFLAGS ...
    #define HV_SCAN_NO_READ ...
    #define HV_SCAN_ALL_FLAGS ...
    #define HV_SCAN_PREAD_ONLY ...

    struct hv_scan_counts {
        uint64_t pages;
        uint64_t present;
        uint64_t swapped;
        uint64_t read;
        uint64_t bytes_read;
        uint64_t preads;
        uint64_t ksm;
        uint64_t zero;
        uint64_t zero_page;
        uint64_t thp;
        uint64_t vanished;
        uint64_t noflags;
        uint64_t readvs;
        uint64_t bytes_readv;
        uint64_t readv_declined;
        uint64_t readv_huge;
    };

    int hv_scan(int pid, const uint64_t *starts, const uint64_t *lengths, size_t nranges,
                uint64_t *hashes, uint16_t *flags, uint64_t *pfns, size_t npages,
                size_t batch_bytes, unsigned options, struct hv_scan_counts *counts);
    int64_t hv_present(int pid, const uint64_t *addrs, size_t n, uint8_t *out);
    int64_t hv_pageout(int pid, const uint64_t *addrs, size_t n);
    void hv_hash_pages(const void *buf, size_t npages, uint64_t *out);
    double hv_memcpy_seconds(size_t bytes, unsigned rounds);
    """
)

ffibuilder.set_source(
    "hv._native",
    '#include "scanner.h"',
    sources=[str(HERE / "scanner.c")],
    include_dirs=[str(HERE)],
    libraries=["xxhash"],
    extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra"],
)

if __name__ == "__main__":
    # In-place build: compile under native/_gen (ignored by git), then install the
    # module as hv/_native.abi3.so, the name `pip install -e .` gives it (cffi
    # compiles against the limited API), so neither build can shadow the other.
    import shutil

    built = Path(ffibuilder.compile(tmpdir=str(HERE / "_gen"), verbose=False))
    package = HERE.parent / "hv"
    for stale in package.glob("_native.*.so"):
        stale.unlink()
    shutil.copy2(built, package / "_native.abi3.so")
