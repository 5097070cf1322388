/* Files through the C ABI: the agent names itself as the remote of READ (file -> memory) and
 * WRITE (memory -> file) requests, over `uring` (chosen by default where io_uring runs) and
 * `posix` (forced).
 *
 *   files <dir> <size_mib> <timeout_s>
 *
 *  1. nixl_register_file (the agent opens and owns the fd): WRITE a pattern, READ it back into
 *     another buffer, with one descriptor and with 257 odd pieces, every byte checked, for each
 *     backend; the file on disk is checked with plain read(2).
 *  2. A file the caller opened, registered by (offset, len, fd) with nixl_register.
 *  3. O_DIRECT: an aligned round trip; a misaligned buffer and a misaligned length refused at
 *     creation with NIXL_ERR_INVALID naming descriptor 0.
 *  4. Errors: a missing file (NIXL_ERR_NOT_FOUND), unknown flags, nothing to register, WRITE
 *     into a read-only registration, a READ past the end of the file (fails, not OK).
 *  5. nixl_deregister closes the fd the agent opened.
 * Exit status 0 passed, 1 failed. */
#include "nixl_test.h"

#include <errno.h>
#include <fcntl.h>
#include <unistd.h>

#define NAME "files"

static int64_t tmo;

static nixl_desc dram(const void *p, uint64_t len)
{
    nixl_desc d = {(uint64_t)(uintptr_t)p, len, 0};
    return d;
}

static void run(nixl_agent *a, int op, const nixl_desc *mem, const nixl_desc *file, size_t n,
                const char *backend, const char *want_backend)
{
    nixl_xfer *x = NULL;
    EXPECT_OK(nixl_xfer_create(a, op, NIXL_DRAM, mem, n, NIXL_FILE, file, n, NAME, NULL, 0,
                               backend, &x));
    char got[16];
    EXPECT_OK(nixl_xfer_backend(x, got, sizeof got));
    CHECK(strcmp(got, want_backend) == 0, "backend %s, expected %s", got, want_backend);
    if (POST(x) == NIXL_IN_PROGRESS)
        WAIT_OK(x, tmo);
    EXPECT_OK(nixl_xfer_free(x));
}

static void read_whole(const char *path, uint8_t *buf, size_t len)
{
    int fd = open(path, O_RDONLY);
    CHECK(fd >= 0, "open %s: %s", path, strerror(errno));
    size_t got = 0;
    while (got < len) {
        ssize_t r = pread(fd, buf + got, len - got, (off_t)got);
        CHECK(r > 0, "pread %s at %zu: %s", path, got, r < 0 ? strerror(errno) : "end of file");
        got += (size_t)r;
    }
    close(fd);
}

static void round_trips(nixl_agent *a, const char *dir, size_t size, const char *backend,
                        const char *want, uint32_t seed)
{
    char path[512];
    snprintf(path, sizeof path, "%s/rt-%s.bin", dir, want);
    nixl_desc f;
    EXPECT_OK(nixl_register_file(a, path, 0, size, NIXL_FILE_CREATE, &f));
    CHECK(f.addr == 0 && f.len == size && f.dev_id > 2, "descriptor (%llu, %llu, %llu)",
          (unsigned long long)f.addr, (unsigned long long)f.len, (unsigned long long)f.dev_id);
    uint8_t *src = xmalloc(size), *dst = xmalloc(size), *disk = xmalloc(size);
    fill(src, size, seed);
    memset(dst, 0, size);
    nixl_desc bufs[2] = {dram(src, size), dram(dst, size)};
    EXPECT_OK(nixl_register(a, NIXL_DRAM, bufs, 2));

    /* One descriptor each way. */
    run(a, NIXL_WRITE, &bufs[0], &f, 1, backend, want);
    read_whole(path, disk, size);
    VERIFY(disk, 0, size, seed, 0, "file after WRITE");
    run(a, NIXL_READ, &bufs[1], &f, 1, backend, want);
    VERIFY(dst, 0, size, seed, 0, "READ back");

    /* 257 odd pieces: memory pieces taken from the end of the buffer backwards, file pieces
     * forwards with gaps. */
    enum { N = 257 };
    nixl_desc mem[N], back[N], file[N];
    uint64_t foff = 0, moff = size;
    memset(dst, 0, size);
    for (int i = 0; i < N; i++) {
        uint64_t len = 1 + (uint64_t)(i * 37 % 4001);
        foff += (uint64_t)(i % 3) * 13;
        moff -= len + 7;
        mem[i] = dram(src + moff, len);
        back[i] = dram(dst + moff, len);
        nixl_desc d = {foff, len, f.dev_id};
        file[i] = d;
        foff += len;
    }
    CHECK(foff < size && moff > 0, "pieces do not fit");
    run(a, NIXL_WRITE, mem, file, N, backend, want);
    run(a, NIXL_READ, back, file, N, backend, want);
    read_whole(path, disk, size);
    for (int i = 0; i < N; i++) {
        uint64_t m = mem[i].addr - (uint64_t)(uintptr_t)src;
        VERIFY(dst, m, mem[i].len, seed, m, "piece read back");
        CHECK(memcmp(disk + file[i].addr, src + m, mem[i].len) == 0, "piece %d on disk differs",
              i);
    }

    EXPECT_OK(nixl_deregister(a, NIXL_DRAM, bufs, 2));
    /* Deregistering closes the fd the agent opened. */
    EXPECT_OK(nixl_deregister(a, NIXL_FILE, &f, 1));
    errno = 0;
    CHECK(fcntl((int)f.dev_id, F_GETFD) == -1 && errno == EBADF,
          "fd %llu still open after deregistration", (unsigned long long)f.dev_id);
    free(src);
    free(dst);
    free(disk);
    printf("[files] round trips over %s: ok\n", want);
}

static void callers_fd(nixl_agent *a, const char *dir)
{
    char path[512];
    snprintf(path, sizeof path, "%s/own.bin", dir);
    int fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0600);
    CHECK(fd >= 0, "open %s: %s", path, strerror(errno));
    size_t n = 1 << 20;
    uint8_t *src = xmalloc(n), *dst = xmalloc(n);
    fill(src, n, 5);
    /* Valgrind does not see io_uring's writes into memory: start from defined bytes. */
    memset(dst, 0, n);
    nixl_desc bufs[2] = {dram(src, n), dram(dst, n)};
    nixl_desc f = {4096, n, (uint64_t)fd};
    EXPECT_OK(nixl_register(a, NIXL_DRAM, bufs, 2));
    EXPECT_OK(nixl_register(a, NIXL_FILE, &f, 1));
    run(a, NIXL_WRITE, &bufs[0], &f, 1, "posix", "posix");
    run(a, NIXL_READ, &bufs[1], &f, 1, NULL, "uring");
    VERIFY(dst, 0, n, 5, 0, "caller's fd READ back");
    EXPECT_OK(nixl_deregister(a, NIXL_FILE, &f, 1));
    /* The caller's own fd stays open. */
    CHECK(fcntl(fd, F_GETFD) != -1, "the caller's fd was closed by deregistration");
    EXPECT_OK(nixl_deregister(a, NIXL_DRAM, bufs, 2));
    close(fd);
    free(src);
    free(dst);
    printf("[files] caller's fd: ok\n");
}

static void direct(nixl_agent *a, const char *dir)
{
    char path[512];
    snprintf(path, sizeof path, "%s/direct.bin", dir);
    size_t n = 1 << 20;
    nixl_desc f;
    nixl_status s = nixl_register_file(a, path, 0, n, NIXL_FILE_CREATE | NIXL_FILE_DIRECT, &f);
    if (s == NIXL_ERR_INVALID && strstr(nixl_last_error(), "Invalid argument") != NULL) {
        printf("[files] O_DIRECT not supported under %s: skipped that part\n", dir);
        return;
    }
    EXPECT(s, NIXL_OK);
    uint8_t *src = NULL, *dst = NULL;
    CHECK(posix_memalign((void **)&src, 4096, n + 4096) == 0, "posix_memalign");
    CHECK(posix_memalign((void **)&dst, 4096, n) == 0, "posix_memalign");
    memset(dst, 0, n);
    fill(src, n + 4096, 9);
    nixl_desc bufs[2] = {dram(src, n + 4096), dram(dst, n)};
    EXPECT_OK(nixl_register(a, NIXL_DRAM, bufs, 2));
    nixl_desc s_al = dram(src, n), d_al = dram(dst, n);
    run(a, NIXL_WRITE, &s_al, &f, 1, NULL, "uring");
    run(a, NIXL_READ, &d_al, &f, 1, "posix", "posix");
    VERIFY(dst, 0, n, 9, 0, "O_DIRECT READ back");

    nixl_xfer *x = NULL;
    nixl_desc mis = dram(src + 1, 4096), fpart = {0, 4096, f.dev_id};
    EXPECT(nixl_xfer_create(a, NIXL_WRITE, NIXL_DRAM, &mis, 1, NIXL_FILE, &fpart, 1, NAME, NULL,
                            0, NULL, &x),
           NIXL_ERR_INVALID);
    CHECK(strstr(nixl_last_error(), "descriptor 0") && strstr(nixl_last_error(), "aligned"),
          "misaligned memory: \"%s\"", nixl_last_error());
    nixl_desc odd = dram(src, 100), fodd = {0, 100, f.dev_id};
    EXPECT(nixl_xfer_create(a, NIXL_WRITE, NIXL_DRAM, &odd, 1, NIXL_FILE, &fodd, 1, NAME, NULL,
                            0, "uring", &x),
           NIXL_ERR_INVALID);
    CHECK(strstr(nixl_last_error(), "multiples of"), "odd length: \"%s\"", nixl_last_error());
    CHECK(x == NULL, "a failed create wrote *out");
    EXPECT_OK(nixl_deregister(a, NIXL_DRAM, bufs, 2));
    EXPECT_OK(nixl_deregister(a, NIXL_FILE, &f, 1));
    free(src);
    free(dst);
    printf("[files] O_DIRECT: ok\n");
}

static void errors(nixl_agent *a, const char *dir)
{
    char path[512];
    nixl_desc f = {1, 2, 3}, keep = f;
    snprintf(path, sizeof path, "%s/missing/none.bin", dir);
    EXPECT(nixl_register_file(a, path, 0, 10, 0, &f), NIXL_ERR_NOT_FOUND);
    EXPECT(nixl_register_file(a, path, 0, 10, NIXL_FILE_CREATE, &f), NIXL_ERR_NOT_FOUND);
    snprintf(path, sizeof path, "%s/small.bin", dir);
    EXPECT(nixl_register_file(a, path, 0, 10, 0x100, &f), NIXL_ERR_INVALID);
    EXPECT(nixl_register_file(a, NULL, 0, 10, 0, &f), NIXL_ERR_INVALID);
    EXPECT(nixl_register_file(a, path, 0, 10, NIXL_FILE_CREATE, NULL), NIXL_ERR_INVALID);
    /* Created empty: nothing past offset 0 with len 0. */
    EXPECT(nixl_register_file(a, path, 0, 0, NIXL_FILE_CREATE, &f), NIXL_ERR_INVALID);
    CHECK(memcmp(&f, &keep, sizeof f) == 0, "a failed nixl_register_file wrote *out");

    /* 64 KiB on disk, 1 MiB registered: a READ of it all fails, and says why. */
    int fd = open(path, O_RDWR);
    CHECK(fd >= 0 && ftruncate(fd, 64 << 10) == 0, "ftruncate");
    close(fd);
    uint8_t *buf = xmalloc(1 << 20);
    nixl_desc b = dram(buf, 1 << 20);
    EXPECT_OK(nixl_register(a, NIXL_DRAM, &b, 1));
    EXPECT_OK(nixl_register_file(a, path, 0, 1 << 20, 0, &f));
    const char *backends[2] = {"uring", "posix"};
    for (int i = 0; i < 2; i++) {
        nixl_xfer *x = NULL;
        EXPECT_OK(nixl_xfer_create(a, NIXL_READ, NIXL_DRAM, &b, 1, NIXL_FILE, &f, 1, NAME, NULL,
                                   0, backends[i], &x));
        nixl_status s = nixl_xfer_post(x);
        if (s == NIXL_IN_PROGRESS)
            s = nixl_xfer_wait(x, tmo);
        EXPECT(s, NIXL_ERR_BACKEND);
        CHECK(strstr(nixl_last_error(), "short read") != NULL, "%s: \"%s\"", backends[i],
              nixl_last_error());
        EXPECT_OK(nixl_xfer_free(x));
    }
    EXPECT_OK(nixl_deregister(a, NIXL_FILE, &f, 1));

    /* Read-only: WRITE refused at creation. */
    EXPECT_OK(nixl_register_file(a, path, 0, 0, NIXL_FILE_READ_ONLY, &f));
    CHECK(f.len == 64 << 10, "len 0 registered %llu bytes", (unsigned long long)f.len);
    nixl_desc part = dram(buf, f.len);
    nixl_xfer *x = NULL;
    EXPECT(nixl_xfer_create(a, NIXL_WRITE, NIXL_DRAM, &part, 1, NIXL_FILE, &f, 1, NAME, NULL, 0,
                            NULL, &x),
           NIXL_ERR_INVALID);
    CHECK(strstr(nixl_last_error(), "not open for writing"), "\"%s\"", nixl_last_error());
    EXPECT_OK(nixl_deregister(a, NIXL_FILE, &f, 1));
    EXPECT(nixl_deregister(a, NIXL_FILE, &f, 1), NIXL_ERR_NOT_FOUND);
    EXPECT_OK(nixl_deregister(a, NIXL_DRAM, &b, 1));
    free(buf);
    printf("[files] errors: ok\n");
}

int main(int argc, char **argv)
{
    if (argc != 4) {
        fprintf(stderr, "usage: %s <dir> <size_mib> <timeout_s>\n", argv[0]);
        return 2;
    }
    g_role = "files";
    const char *dir = argv[1];
    size_t size = (size_t)atoi(argv[2]) << 20;
    tmo = (int64_t)atoi(argv[3]) * 1000;
    setvbuf(stdout, NULL, _IOLBF, 0);

    nixl_agent *a = NULL;
    EXPECT_OK(nixl_agent_new(NAME, "backends = [\"local\", \"uring\", \"posix\"]", &a));
    if (nixl_backend_status(a, "uring") != NIXL_OK) {
        fprintf(stderr, "[files] uring cannot run here: %s\n", nixl_last_error());
        nixl_agent_free(a);
        return EXIT_SKIP;
    }
    round_trips(a, dir, size, NULL, "uring", 1);
    round_trips(a, dir, size, "posix", "posix", 2);
    callers_fd(a, dir);
    direct(a, dir);
    errors(a, dir);
    nixl_agent_free(a);
    printf("[files] passed\n");
    return 0;
}
