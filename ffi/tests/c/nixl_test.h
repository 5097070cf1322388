/* Helpers shared by the C ABI test programs (ffi/tests/c/: peer.c, misuse.c, threads.c).
 *
 * Every check failure prints "[role] FAIL file:line: what (last error: ...)" on stderr and exits
 * with status 1. Exit status 77 means "skipped" (the backend under test cannot run on this host).
 * Include this first in every test program: it defines _GNU_SOURCE for the POSIX calls. */
#ifndef NIXL_TEST_H
#define NIXL_TEST_H

#ifndef _GNU_SOURCE
#define _GNU_SOURCE 1
#endif

#include <errno.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "nixl.h"

#define EXIT_SKIP 77

/* Helpers a program may leave unused. */
#define NT_HELPER static __attribute__((unused))

static const char *g_role = "test";

/* The calling thread's last error, copied before anything else can overwrite it. */
NT_HELPER void last_error_copy(char *buf, size_t cap)
{
    const char *e = nixl_last_error();
    if (e == NULL) {
        snprintf(buf, cap, "<nixl_last_error returned NULL>");
        return;
    }
    snprintf(buf, cap, "%s", e);
}

NT_HELPER void fail_at(const char *file, int line, const char *fmt, ...)
    __attribute__((format(printf, 3, 4), noreturn));
NT_HELPER void fail_at(const char *file, int line, const char *fmt, ...)
{
    char le[1024];
    last_error_copy(le, sizeof le);
    char msg[2048];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    fprintf(stderr, "[%s] FAIL %s:%d: %s (nixl_last_error: \"%s\")\n", g_role, file, line, msg, le);
    fflush(stderr);
    fflush(stdout);
    exit(1);
}

#define FAIL(...) fail_at(__FILE__, __LINE__, __VA_ARGS__)
/* CHECK(cond, fmt, args...): at least a (non-empty) format string. */
#define CHECK(cond, ...)                                                                           \
    do {                                                                                           \
        if (!(cond)) {                                                                             \
            fprintf(stderr, "[%s] check `%s` failed:\n", g_role, #cond);                          \
            FAIL(__VA_ARGS__);                                                                     \
        }                                                                                          \
    } while (0)

NT_HELPER const char *status_name(nixl_status s)
{
    /* Our own table, so that a report never depends on nixl_status_str (which is tested). */
    switch (s) {
    case NIXL_OK: return "NIXL_OK";
    case NIXL_IN_PROGRESS: return "NIXL_IN_PROGRESS";
    case NIXL_EMPTY: return "NIXL_EMPTY";
    case NIXL_ERR_INVALID: return "NIXL_ERR_INVALID";
    case NIXL_ERR_NOT_FOUND: return "NIXL_ERR_NOT_FOUND";
    case NIXL_ERR_BACKEND: return "NIXL_ERR_BACKEND";
    case NIXL_ERR_REMOTE_DISCONNECT: return "NIXL_ERR_REMOTE_DISCONNECT";
    case NIXL_ERR_CANCELLED: return "NIXL_ERR_CANCELLED";
    case NIXL_ERR_TIMEOUT: return "NIXL_ERR_TIMEOUT";
    case NIXL_ERR_UNAVAILABLE: return "NIXL_ERR_UNAVAILABLE";
    case NIXL_ERR_DENIED: return "NIXL_ERR_DENIED";
    case NIXL_ERR_BUFFER_TOO_SMALL: return "NIXL_ERR_BUFFER_TOO_SMALL";
    case NIXL_ERR_PANIC: return "NIXL_ERR_PANIC";
    default: return "<unknown status>";
    }
}

/* The error text is checked right after the call, before any other nixl call. */
NT_HELPER void expect_status_at(const char *file, int line, const char *call, nixl_status got,
                             nixl_status want)
{
    char le[1024];
    last_error_copy(le, sizeof le);
    if (got != want) {
        fprintf(stderr, "[%s] FAIL %s:%d: %s returned %s (%d), expected %s (%d) (nixl_last_error: \"%s\")\n",
                g_role, file, line, call, status_name(got), (int)got, status_name(want), (int)want,
                le);
        fflush(stderr);
        exit(1);
    }
    if (want < 0 && le[0] == '\0') {
        fprintf(stderr, "[%s] FAIL %s:%d: %s returned %s as expected, but nixl_last_error() is empty\n",
                g_role, file, line, call, status_name(got));
        fflush(stderr);
        exit(1);
    }
}

/* EXPECT(call, code): the call returns exactly `code`; after an error the thread's last error
 * text is non-empty. */
#define EXPECT(call, want) expect_status_at(__FILE__, __LINE__, #call, (call), (want))
#define EXPECT_OK(call) EXPECT(call, NIXL_OK)

/* EXPECT_ONE_OF2: for the places where the contract allows two answers (a race). */
#define EXPECT_ONE_OF2(call, a, b, outp)                                                           \
    do {                                                                                           \
        nixl_status s_ = (call);                                                                   \
        if (s_ != (a) && s_ != (b))                                                                \
            FAIL("%s returned %s (%d), expected %s or %s", #call, status_name(s_), (int)s_,        \
                 status_name(a), status_name(b));                                                  \
        *(outp) = s_;                                                                              \
    } while (0)

/* A configuration, written to `buf` (`cap` bytes) and returned: the `backends` (TOML array
 * contents), tcp listening on loopback with `tmo_ms` for its I/O and connection deadlines (the TLS
 * handshake runs ~50x slower under valgrind: the default 3 s deadline is too short on a loaded
 * machine), then the keys and sections `rest_fmt` formats with the remaining arguments. */
NT_HELPER __attribute__((format(printf, 5, 6))) const char *
nt_config(char *buf, size_t cap, const char *backends, long long tmo_ms, const char *rest_fmt, ...)
{
    int n = snprintf(buf, cap,
                     "backends = [%s]\n"
                     "[tcp]\n"
                     "listen = \"127.0.0.1:0\"\n"
                     "io_timeout_ms = %lld\n"
                     "connect_timeout_ms = %lld\n",
                     backends, tmo_ms, tmo_ms);
    if (n < 0 || (size_t)n >= cap)
        FAIL("configuration longer than %zu bytes", cap);
    va_list ap;
    va_start(ap, rest_fmt);
    int m = vsnprintf(buf + n, cap - (size_t)n, rest_fmt, ap);
    va_end(ap);
    if (m < 0 || (size_t)m >= cap - (size_t)n)
        FAIL("configuration longer than %zu bytes", cap);
    return buf;
}

NT_HELPER int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

NT_HELPER void sleep_ms(int64_t ms)
{
    struct timespec ts = {.tv_sec = ms / 1000, .tv_nsec = (long)(ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
    }
}

NT_HELPER void *xmalloc(size_t n)
{
    void *p = malloc(n ? n : 1);
    if (p == NULL)
        FAIL("malloc(%zu) failed", n);
    return p;
}

/* The test pattern: byte i of a buffer filled with `seed` (depends on seed and on the index, so
 * misplaced bytes are caught). */
NT_HELPER inline uint8_t pat(uint32_t seed, uint64_t i)
{
    uint64_t h = (i + 1) * 0x9E3779B97F4A7C15ULL ^ ((uint64_t)seed * 0xC2B2AE3D27D4EB4FULL);
    h ^= h >> 29;
    h *= 0xBF58476D1CE4E5B9ULL;
    h ^= h >> 32;
    return (uint8_t)h;
}

NT_HELPER void fill(uint8_t *buf, uint64_t len, uint32_t seed)
{
    for (uint64_t i = 0; i < len; i++)
        buf[i] = pat(seed, i);
}

/* Whether buf[off .. off+len) holds pattern `seed` at indexes base+0 .. base+len; on the first
 * mismatch fails with `what`. */
#define VERIFY(buf, off, len, seed, base, what)                                                    \
    verify_at(__FILE__, __LINE__, (buf), (off), (len), (seed), (base), (what))
NT_HELPER void verify_at(const char *file, int line, const uint8_t *buf, uint64_t off, uint64_t len,
                      uint32_t seed, uint64_t base, const char *what)
{
    for (uint64_t i = 0; i < len; i++) {
        uint8_t want = pat(seed, base + i);
        if (buf[off + i] != want) {
            fail_at(file, line,
                    "%s: byte %llu of %llu (buffer offset %llu) is 0x%02x, expected 0x%02x "
                    "(pattern %u)",
                    what, (unsigned long long)i, (unsigned long long)len,
                    (unsigned long long)(off + i), buf[off + i], want, seed);
        }
    }
}

/* Writes `data` to dir/name atomically (a temporary file, then rename). */
NT_HELPER void write_file_atomic(const char *dir, const char *name, const void *data, size_t len)
{
    char tmp[4096], path[4096];
    snprintf(tmp, sizeof tmp, "%s/.%s.tmp", dir, name);
    snprintf(path, sizeof path, "%s/%s", dir, name);
    FILE *f = fopen(tmp, "wb");
    if (f == NULL)
        FAIL("fopen(%s): %s", tmp, strerror(errno));
    if (len > 0 && fwrite(data, 1, len, f) != len)
        FAIL("fwrite(%s): %s", tmp, strerror(errno));
    if (fclose(f) != 0)
        FAIL("fclose(%s): %s", tmp, strerror(errno));
    if (rename(tmp, path) != 0)
        FAIL("rename(%s, %s): %s", tmp, path, strerror(errno));
}

/* Waits up to timeout_ms for dir/name to exist and returns its contents (malloc'ed). */
NT_HELPER uint8_t *read_file_wait(const char *dir, const char *name, int64_t timeout_ms, size_t *len)
{
    char path[4096];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    int64_t deadline = now_ms() + timeout_ms;
    FILE *f;
    while ((f = fopen(path, "rb")) == NULL) {
        if (errno != ENOENT)
            FAIL("fopen(%s): %s", path, strerror(errno));
        if (now_ms() > deadline)
            FAIL("timed out after %lld ms waiting for %s", (long long)timeout_ms, path);
        sleep_ms(5);
    }
    size_t cap = 4096, n = 0;
    uint8_t *buf = xmalloc(cap);
    for (;;) {
        if (n == cap) {
            cap *= 2;
            buf = realloc(buf, cap);
            if (buf == NULL)
                FAIL("realloc");
        }
        size_t got = fread(buf + n, 1, cap - n, f);
        n += got;
        if (got == 0)
            break;
    }
    if (ferror(f))
        FAIL("fread(%s)", path);
    fclose(f);
    *len = n;
    return buf;
}

/* One notification, taken with nixl_notif_wait + nixl_notif_next within timeout_ms.
 * Fails on timeout. */
typedef struct {
    char from[256];
    uint8_t msg[65536];
    size_t len;
} notif_t;

NT_HELPER void take_notif(nixl_agent *agent, int64_t timeout_ms, notif_t *n, const char *waiting_for)
{
    int64_t deadline = now_ms() + timeout_ms;
    for (;;) {
        size_t len = 0;
        nixl_status s = nixl_notif_next(agent, n->from, sizeof n->from, n->msg, sizeof n->msg, &len);
        if (s == NIXL_OK) {
            n->len = len;
            return;
        }
        if (s != NIXL_EMPTY)
            FAIL("nixl_notif_next returned %s (%d) while waiting for %s", status_name(s), (int)s,
                 waiting_for);
        int64_t left = deadline - now_ms();
        if (left <= 0)
            FAIL("timed out after %lld ms waiting for notification %s", (long long)timeout_ms,
                 waiting_for);
        s = nixl_notif_wait(agent, left);
        if (s != NIXL_OK && s != NIXL_EMPTY)
            FAIL("nixl_notif_wait returned %s (%d) while waiting for %s", status_name(s), (int)s,
                 waiting_for);
    }
}

/* Takes the next notification and checks that it is `msg` (a string) from `from`. */
#define EXPECT_NOTIF(agent, timeout_ms, from, msg)                                                 \
    expect_notif_at(__FILE__, __LINE__, (agent), (timeout_ms), (from), (const uint8_t *)(msg),     \
                    strlen(msg))
NT_HELPER void expect_notif_at(const char *file, int line, nixl_agent *agent, int64_t timeout_ms,
                            const char *from, const uint8_t *msg, size_t len)
{
    static _Thread_local notif_t n;
    char what[256];
    snprintf(what, sizeof what, "\"%.*s\" from %s", (int)(len < 64 ? len : 64), (const char *)msg,
             from);
    take_notif(agent, timeout_ms, &n, what);
    if (strcmp(n.from, from) != 0)
        fail_at(file, line, "notification from \"%s\", expected from \"%s\"", n.from, from);
    if (n.len != len || memcmp(n.msg, msg, len) != 0)
        fail_at(file, line, "notification \"%.*s\" (%zu bytes) from %s, expected %s (%zu bytes)",
                (int)(n.len < 64 ? n.len : 64), (const char *)n.msg, n.len, n.from, what, len);
}

/* Waits for a transfer with nixl_xfer_wait, expecting NIXL_OK. */
#define WAIT_OK(xfer, timeout_ms) wait_ok_at(__FILE__, __LINE__, (xfer), (timeout_ms), #xfer)
NT_HELPER void wait_ok_at(const char *file, int line, nixl_xfer *x, int64_t timeout_ms,
                       const char *what)
{
    nixl_status s = nixl_xfer_wait(x, timeout_ms);
    if (s == NIXL_IN_PROGRESS)
        fail_at(file, line, "transfer %s still in progress after %lld ms", what,
                (long long)timeout_ms);
    if (s != NIXL_OK)
        fail_at(file, line, "transfer %s ended with %s (%d)", what, status_name(s), (int)s);
    s = nixl_xfer_status(x);
    if (s != NIXL_OK)
        fail_at(file, line, "nixl_xfer_status(%s) after the wait returned %s (%d)", what,
                status_name(s), (int)s);
}

/* Posts a transfer: NIXL_OK (done inline) or NIXL_IN_PROGRESS. */
#define POST(xfer) post_at(__FILE__, __LINE__, (xfer), #xfer)
NT_HELPER nixl_status post_at(const char *file, int line, nixl_xfer *x, const char *what)
{
    nixl_status s = nixl_xfer_post(x);
    if (s != NIXL_OK && s != NIXL_IN_PROGRESS)
        fail_at(file, line, "nixl_xfer_post(%s) returned %s (%d)", what, status_name(s), (int)s);
    return s;
}

#endif /* NIXL_TEST_H */
