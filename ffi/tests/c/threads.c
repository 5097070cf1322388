/* Several threads using one agent at once.
 *
 *   threads <iterations> <timeout_s>
 *
 * One agent ("thr", backend local) registers SRC and DST.
 *  1. Each thread owns a slice of both and, over and over, creates, posts, waits for and frees
 *     local-backend transfers (the agent naming itself as the remote, backend "local"), WRITE
 *     then READ, one descriptor and 16, and checks every byte. Between them it registers and
 *     deregisters a private buffer, takes the agent's metadata, asks the backend status and the
 *     name, and provokes errors to check that its own nixl_last_error() is set.
 *  2. All threads post, wait for and poll one shared request (posting one still in flight is
 *     NIXL_ERR_INVALID; every post ends NIXL_OK).
 *  3. The main thread sends notifications to the agent itself while all threads take them:
 *     each is handed to exactly one nixl_notif_next caller.
 * Exit status 0 passed, 1 failed. */
#include "nixl_test.h"

#include <pthread.h>
#include <stdatomic.h>

#define NTHREADS 4
#define SLICE (16u << 10)
#define NAME "thr"

static nixl_agent *agent;
static uint8_t *src, *dst;
static int iterations;
static int64_t tmo;

static nixl_desc dram(const void *p, uint64_t len)
{
    return (nixl_desc){(uint64_t)(uintptr_t)p, len, 0};
}

static nixl_xfer *create(int32_t op, const nixl_desc *l, const nixl_desc *r, size_t n)
{
    nixl_xfer *x = NULL;
    EXPECT_OK(nixl_xfer_create(agent, op, NIXL_DRAM, l, n, NIXL_DRAM, r, n, NAME, NULL, 0, "local",
                               &x));
    char b[16];
    EXPECT_OK(nixl_xfer_backend(x, b, sizeof b));
    CHECK(strcmp(b, "local") == 0, "backend \"%s\"", b);
    return x;
}

static void *worker(void *arg)
{
    const int t = (int)(intptr_t)arg;
    uint8_t *s = src + (size_t)t * SLICE, *d = dst + (size_t)t * SLICE;
    uint8_t *scratch = xmalloc(4096);
    /* the slice as one descriptor, and as 16 pieces in reverse order */
    nixl_desc ls = dram(s, SLICE), ld = dram(d, SLICE);
    nixl_desc lp[16], rp[16];
    for (int k = 0; k < 16; k++) {
        lp[k] = dram(s + k * (SLICE / 16), SLICE / 16);
        rp[k] = dram(d + (15 - k) * (SLICE / 16), SLICE / 16);
    }
    for (int it = 0; it < iterations; it++) {
        uint32_t seed = (uint32_t)(t * 100000 + it * 4);

        fill(s, SLICE, seed);
        nixl_xfer *w = create(NIXL_WRITE, &ls, &ld, 1);
        POST(w);
        WAIT_OK(w, tmo);
        EXPECT_OK(nixl_xfer_free(w));
        VERIFY(d, 0, SLICE, seed, 0, "DST slice after WRITE");

        fill(d, SLICE, seed + 1);
        nixl_xfer *r = create(NIXL_READ, &ls, &ld, 1);
        POST(r);
        WAIT_OK(r, tmo);
        VERIFY(s, 0, SLICE, seed + 1, 0, "SRC slice after READ");

        fill(s, SLICE, seed + 2);
        nixl_xfer *wp = create(NIXL_WRITE, lp, rp, 16);
        POST(wp);
        WAIT_OK(wp, tmo);
        for (int k = 0; k < 16; k++)
            VERIFY(d, (uint64_t)(15 - k) * (SLICE / 16), SLICE / 16, seed + 2,
                   (uint64_t)k * (SLICE / 16), "DST piece after WRITE of 16 pieces");
        EXPECT_OK(nixl_xfer_free(wp));

        fill(d, SLICE, seed + 3);
        POST(r); /* repost */
        WAIT_OK(r, tmo);
        VERIFY(s, 0, SLICE, seed + 3, 0, "SRC slice after the reposted READ");
        EXPECT_OK(nixl_xfer_free(r));

        if (it % 8 == 0) {
            nixl_desc sc = dram(scratch, 4096);
            EXPECT_OK(nixl_register(agent, NIXL_DRAM, &sc, 1));
            uint8_t *md = NULL;
            size_t md_len = 0;
            EXPECT_OK(nixl_local_md(agent, &md, &md_len));
            nixl_bytes_free(md, md_len);
            EXPECT_OK(nixl_deregister(agent, NIXL_DRAM, &sc, 1));
            EXPECT(nixl_deregister(agent, NIXL_DRAM, &sc, 1), NIXL_ERR_NOT_FOUND);
            EXPECT_OK(nixl_backend_status(agent, "local"));
            char name[16];
            EXPECT_OK(nixl_agent_name(agent, name, sizeof name));
            CHECK(strcmp(name, NAME) == 0, "name \"%s\"", name);
        }
        /* an error of our own, while the others succeed */
        nixl_xfer *bad = NULL;
        nixl_desc l64 = dram(s, 64), oob = dram(dst + (size_t)NTHREADS * SLICE - 8, 64);
        EXPECT(nixl_xfer_create(agent, NIXL_WRITE, NIXL_DRAM, &l64, 1, NIXL_DRAM, &oob, 1, NAME,
                                NULL, 0, "local", &bad),
               NIXL_ERR_INVALID);
        CHECK(bad == NULL, "a failed nixl_xfer_create wrote *out");
        EXPECT(nixl_xfer_status(NULL), NIXL_ERR_INVALID);
    }
    free(scratch);
    return NULL;
}

/* 2. one request, many threads */
static nixl_xfer *shared;
static uint8_t *sh_src, *sh_dst;
#define SH_LEN (256u << 10)
static atomic_int posts_ok, posts_in_flight;

static void *shared_worker(void *arg)
{
    (void)arg;
    for (int it = 0; it < iterations; it++) {
        nixl_status s = nixl_xfer_post(shared);
        if (s == NIXL_OK || s == NIXL_IN_PROGRESS)
            atomic_fetch_add(&posts_ok, 1);
        else if (s == NIXL_ERR_INVALID)
            atomic_fetch_add(&posts_in_flight, 1); /* another thread's post was in flight */
        else
            FAIL("posting the shared request: %s", status_name(s));
        s = nixl_xfer_status(shared);
        CHECK(s == NIXL_OK || s == NIXL_IN_PROGRESS, "status of the shared request: %s",
              status_name(s));
        s = nixl_xfer_wait(shared, tmo);
        CHECK(s == NIXL_OK, "waiting for the shared request: %s", status_name(s));
        char b[16];
        EXPECT_OK(nixl_xfer_backend(shared, b, sizeof b));
    }
    return NULL;
}

/* 3. notifications to ourselves, taken by every thread */
#define NOTIFS 400
static atomic_int taken_total;
static atomic_int taken[NOTIFS];

static void *notif_worker(void *arg)
{
    (void)arg;
    int64_t deadline = now_ms() + tmo;
    while (atomic_load(&taken_total) < NOTIFS) {
        CHECK(now_ms() < deadline, "only %d of %d notifications taken", atomic_load(&taken_total),
              NOTIFS);
        char from[16];
        uint8_t msg[16];
        size_t len = 0;
        nixl_status s = nixl_notif_next(agent, from, sizeof from, msg, sizeof msg - 1, &len);
        if (s == NIXL_EMPTY) {
            s = nixl_notif_wait(agent, 10);
            CHECK(s == NIXL_OK || s == NIXL_EMPTY, "nixl_notif_wait: %s", status_name(s));
            continue;
        }
        EXPECT(s, NIXL_OK);
        CHECK(strcmp(from, NAME) == 0, "from \"%s\"", from);
        msg[len] = 0;
        int i = atoi((const char *)msg);
        CHECK(i >= 0 && i < NOTIFS, "message \"%s\"", (const char *)msg);
        CHECK(atomic_fetch_add(&taken[i], 1) == 0, "notification %d taken twice", i);
        atomic_fetch_add(&taken_total, 1);
    }
    return NULL;
}

int main(int argc, char **argv)
{
    if (argc != 3) {
        fprintf(stderr, "usage: %s <iterations> <timeout_s>\n", argv[0]);
        return 2;
    }
    g_role = "threads";
    iterations = atoi(argv[1]);
    tmo = (int64_t)atoi(argv[2]) * 1000;
    setvbuf(stdout, NULL, _IOLBF, 0);

    EXPECT_OK(nixl_agent_new(NAME, "backends = [\"local\"]\n", &agent));
    src = xmalloc((size_t)NTHREADS * SLICE);
    dst = xmalloc((size_t)NTHREADS * SLICE);
    nixl_desc regs[2] = {dram(src, (uint64_t)NTHREADS * SLICE), dram(dst, (uint64_t)NTHREADS * SLICE)};
    EXPECT_OK(nixl_register(agent, NIXL_DRAM, regs, 2));

    pthread_t th[NTHREADS];
    int64_t t0 = now_ms();
    for (int t = 0; t < NTHREADS; t++)
        CHECK(pthread_create(&th[t], NULL, worker, (void *)(intptr_t)t) == 0, "pthread_create");
    for (int t = 0; t < NTHREADS; t++)
        pthread_join(th[t], NULL);
    printf("[threads] %d threads x %d iterations in %lld ms\n", NTHREADS, iterations,
           (long long)(now_ms() - t0));

    /* 2. */
    sh_src = xmalloc(SH_LEN);
    sh_dst = xmalloc(SH_LEN);
    fill(sh_src, SH_LEN, 5);
    memset(sh_dst, 0, SH_LEN);
    nixl_desc sh[2] = {dram(sh_src, SH_LEN), dram(sh_dst, SH_LEN)};
    EXPECT_OK(nixl_register(agent, NIXL_DRAM, sh, 2));
    shared = create(NIXL_WRITE, &sh[0], &sh[1], 1);
    t0 = now_ms();
    for (int t = 0; t < NTHREADS; t++)
        CHECK(pthread_create(&th[t], NULL, shared_worker, NULL) == 0, "pthread_create");
    for (int t = 0; t < NTHREADS; t++)
        pthread_join(th[t], NULL);
    printf("[threads] one request, %d threads x %d posts: %d accepted, %d refused in flight, "
           "%lld ms\n",
           NTHREADS, iterations, atomic_load(&posts_ok), atomic_load(&posts_in_flight),
           (long long)(now_ms() - t0));
    CHECK(atomic_load(&posts_ok) >= 1, "no post of the shared request was accepted");
    VERIFY(sh_dst, 0, SH_LEN, 5, 0, "DST of the shared request");
    EXPECT_OK(nixl_xfer_free(shared));
    EXPECT_OK(nixl_deregister(agent, NIXL_DRAM, sh, 2));
    free(sh_src);
    free(sh_dst);

    /* 3. */
    t0 = now_ms();
    for (int t = 0; t < NTHREADS; t++)
        CHECK(pthread_create(&th[t], NULL, notif_worker, NULL) == 0, "pthread_create");
    for (int i = 0; i < NOTIFS; i++) {
        char m[16];
        int n = snprintf(m, sizeof m, "%d", i);
        EXPECT_OK(nixl_notif_send(agent, NAME, (const uint8_t *)m, (size_t)n));
    }
    for (int t = 0; t < NTHREADS; t++)
        pthread_join(th[t], NULL);
    for (int i = 0; i < NOTIFS; i++)
        CHECK(atomic_load(&taken[i]) == 1, "notification %d taken %d times", i,
              atomic_load(&taken[i]));
    char from[16];
    uint8_t msg[16];
    size_t len = 0;
    EXPECT(nixl_notif_next(agent, from, sizeof from, msg, sizeof msg, &len), NIXL_EMPTY);
    printf("[threads] %d notifications taken by %d threads in %lld ms\n", NOTIFS, NTHREADS,
           (long long)(now_ms() - t0));

    EXPECT_OK(nixl_deregister(agent, NIXL_DRAM, regs, 2));
    nixl_agent_free(agent);
    free(src);
    free(dst);
    printf("[threads] passed\n");
    return 0;
}
