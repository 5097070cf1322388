/* Two processes moving bytes through the C ABI.
 *
 *   peer target    <dir> <shm|tcp> <full|small> <timeout_s>
 *   peer initiator <dir> <shm|tcp> <full|small> <timeout_s>
 *
 * Both are started at the same time with the same arguments; they exchange metadata through
 * files in <dir> (written atomically: a temporary file, then rename), which is also the shm
 * backend's socket_dir. The initiator forces the backend by name and checks nixl_xfer_backend.
 *
 *  1. the target registers A (one large buffer) and B (room for 1000 odd-sized pieces) in one
 *     call and publishes its metadata; the initiator registers IA and IB and publishes its own;
 *     each loads the other's.
 *  2. WRITE IA -> A with notification "big-write"; the target checks every byte when it sees
 *     the notification, fills A with a new pattern and notifies "ready big-read".
 *  3. READ A -> IA (completion polled with nixl_xfer_status); the initiator checks every byte.
 *  4. WRITE of 1000 pieces IB -> B with "many-write"; the target checks the pieces and that the
 *     gaps between them are untouched; refills B; "ready many-read".
 *  5. READ of the 1000 pieces back; the initiator checks pieces and gaps.
 *  6. Repost of the requests of 2 and 3 with new data.
 *  7. A WRITE with the backend left to the policy (backend "shm" or "tcp").
 *  8. Standalone notifications both ways (nixl_notif_send), binary ones included.
 *  9. The initiator writes <dir>/initiator.done; the target deregisters, frees its agent and
 *     writes <dir>/target.gone; a READ from it then ends NIXL_ERR_REMOTE_DISCONNECT.
 * 10. The initiator invalidates the target (unknown afterwards) and frees its agent before its
 *     last transfer request.
 *
 * "small" uses smaller buffers (for valgrind). Every wait has a timeout. Exit status: 0 passed,
 * 1 failed (the reason on stderr), 77 the backend cannot run here (skipped). */
#include "nixl_test.h"

#define NPIECES 1000
#define TARGET "c-target"
#define INITIATOR "c-initiator"

typedef struct {
    uint64_t loff, roff, len;
} piece_t;

static piece_t pieces[NPIECES];
static uint64_t pieces_lsize, pieces_rsize, big_size;
static int64_t tmo; /* every wait's timeout, ms */
static const char *dir, *backend;

/* The same layout in both processes: odd sizes, gaps of 0-4 bytes on the initiator's side and of
 * 1-3 on the target's, and the pieces in reverse order on the target's side. */
static void make_layout(int small)
{
    big_size = small ? (512u << 10) : (4u << 20);
    const uint64_t mod = small ? 61 : 613;
    uint64_t lo = 0;
    for (uint64_t k = 0; k < NPIECES; k++) {
        pieces[k].len = 1 + (k * 7919) % mod;
        pieces[k].loff = lo + (k % 5);
        lo = pieces[k].loff + pieces[k].len;
    }
    pieces_lsize = lo + 7;
    uint64_t ro = 0;
    for (uint64_t k = NPIECES; k-- > 0;) {
        pieces[k].roff = ro + (k % 3) + 1;
        ro = pieces[k].roff + pieces[k].len;
    }
    pieces_rsize = ro + 3;
}

static nixl_agent *new_agent(const char *name)
{
    char cfg[8192];
    nt_config(cfg, sizeof cfg, "\"shm\", \"tcp\"", (long long)tmo,
              "[shm]\nsocket_dir = '%s'\nop_timeout_ms = %lld\n", dir, (long long)tmo);
    nixl_agent *a = NULL;
    EXPECT_OK(nixl_agent_new(name, cfg, &a));
    CHECK(a != NULL, "nixl_agent_new returned NIXL_OK and no agent");
    char got[64];
    EXPECT_OK(nixl_agent_name(a, got, sizeof got));
    CHECK(strcmp(got, name) == 0, "nixl_agent_name wrote \"%s\"", got);
    nixl_status s = nixl_backend_status(a, backend);
    if (s == NIXL_ERR_UNAVAILABLE) {
        char le[1024];
        last_error_copy(le, sizeof le);
        printf("[%s] SKIP: backend %s cannot run on this host: %s\n", g_role, backend, le);
        fflush(stdout);
        nixl_agent_free(a);
        exit(EXIT_SKIP);
    }
    EXPECT(s, NIXL_OK);
    return a;
}

static void publish_md(nixl_agent *a, const char *file)
{
    uint8_t *md = NULL;
    size_t md_len = 0;
    EXPECT_OK(nixl_local_md(a, &md, &md_len));
    CHECK(md != NULL && md_len > 0, "nixl_local_md gave %p, %zu bytes", (void *)md, md_len);
    write_file_atomic(dir, file, md, md_len);
    nixl_bytes_free(md, md_len);
}

static void load_peer_md(nixl_agent *a, const char *file, const char *want_name)
{
    size_t len = 0;
    uint8_t *md = read_file_wait(dir, file, tmo, &len);
    char name[128];
    memset(name, 'X', sizeof name);
    EXPECT_OK(nixl_load_remote_md(a, md, len, name, sizeof name));
    CHECK(strcmp(name, want_name) == 0, "nixl_load_remote_md wrote the name \"%.100s\"", name);
    free(md);
}

static void expect_backend(nixl_xfer *x, const char *want)
{
    char got[32];
    memset(got, 'X', sizeof got);
    EXPECT_OK(nixl_xfer_backend(x, got, sizeof got));
    CHECK(memchr(got, '\0', sizeof got) != NULL, "nixl_xfer_backend wrote no NUL");
    CHECK(strcmp(got, want) == 0, "transfer runs on backend \"%s\", expected \"%s\"", got, want);
}

/* Checks that pieces in `buf` hold pattern `seed` of the other side's buffer at that side's
 * offsets, and that every byte outside the pieces still holds `gap_seed`. */
static void verify_pieces(const uint8_t *buf, uint64_t size, int on_target, uint32_t seed,
                          uint32_t gap_seed, const char *what)
{
    uint8_t *covered = calloc(size, 1);
    CHECK(covered != NULL, "calloc");
    char w[128];
    for (int k = 0; k < NPIECES; k++) {
        uint64_t here = on_target ? pieces[k].roff : pieces[k].loff;
        uint64_t there = on_target ? pieces[k].loff : pieces[k].roff;
        snprintf(w, sizeof w, "%s, piece %d (%llu bytes)", what, k,
                 (unsigned long long)pieces[k].len);
        VERIFY(buf, here, pieces[k].len, seed, there, w);
        memset(covered + here, 1, pieces[k].len);
    }
    for (uint64_t i = 0; i < size; i++) {
        if (!covered[i] && buf[i] != pat(gap_seed, i))
            FAIL("%s: byte %llu outside every piece was overwritten (0x%02x, expected 0x%02x)",
                 what, (unsigned long long)i, buf[i], pat(gap_seed, i));
    }
    free(covered);
}

static void fill_descs(nixl_desc *local, nixl_desc *remote, const uint8_t *lbase, uint64_t rbase)
{
    for (int k = 0; k < NPIECES; k++) {
        local[k] = (nixl_desc){(uint64_t)(uintptr_t)lbase + pieces[k].loff, pieces[k].len, 0};
        remote[k] = (nixl_desc){rbase + pieces[k].roff, pieces[k].len, 0};
    }
}

/* The target publishes the addresses of A and B (they are in its metadata too, but the C side
 * has no API to read them) in a small file beside its metadata. */
typedef struct {
    uint64_t a_addr, b_addr;
} target_addrs_t;

static int run_target(void)
{
    nixl_agent *agent = new_agent(TARGET);
    uint8_t *a = xmalloc(big_size), *b = xmalloc(pieces_rsize);
    fill(a, big_size, 1);
    fill(b, pieces_rsize, 2);
    nixl_desc regs[2] = {
        {(uint64_t)(uintptr_t)a, big_size, 0},
        {(uint64_t)(uintptr_t)b, pieces_rsize, 0},
    };
    EXPECT_OK(nixl_register(agent, NIXL_DRAM, regs, 2));
    target_addrs_t addrs = {(uint64_t)(uintptr_t)a, (uint64_t)(uintptr_t)b};
    write_file_atomic(dir, "target.addrs", &addrs, sizeof addrs);
    publish_md(agent, "target.md");
    load_peer_md(agent, "initiator.md", INITIATOR);
    printf("[%s] metadata exchanged\n", g_role);

    /* 2. big WRITE, then a new pattern for the READ */
    EXPECT_NOTIF(agent, tmo, INITIATOR, "big-write");
    VERIFY(a, 0, big_size, 11, 0, "A after the big WRITE");
    fill(a, big_size, 12);
    EXPECT_OK(nixl_notif_send(agent, INITIATOR, (const uint8_t *)"ready big-read", 14));

    /* 4. many pieces */
    EXPECT_NOTIF(agent, tmo, INITIATOR, "many-write");
    verify_pieces(b, pieces_rsize, 1, 21, 2, "B after the WRITE of 1000 pieces");
    fill(b, pieces_rsize, 22);
    EXPECT_OK(nixl_notif_send(agent, INITIATOR, (const uint8_t *)"ready many-read", 15));

    /* 6. reposts */
    EXPECT_NOTIF(agent, tmo, INITIATOR, "big-write");
    VERIFY(a, 0, big_size, 13, 0, "A after the reposted big WRITE");
    fill(a, big_size, 14);
    EXPECT_OK(nixl_notif_send(agent, INITIATOR, (const uint8_t *)"ready big-reread", 16));

    /* 7. policy's choice */
    EXPECT_NOTIF(agent, tmo, INITIATOR, "policy-write");
    VERIFY(a, 0, 4096, 15, 0, "A after the WRITE on the policy's backend");
    VERIFY(a, 4096, big_size - 4096, 14, 4096, "A past the WRITE on the policy's backend");

    /* 8. standalone notifications, in any order */
    uint8_t bin[3] = {0, 0xff, 0};
    uint8_t *large = xmalloc(4096);
    fill(large, 4096, 31);
    int seen[3] = {0, 0, 0};
    for (int i = 0; i < 3; i++) {
        static notif_t n;
        take_notif(agent, tmo, &n, "standalone notifications");
        CHECK(strcmp(n.from, INITIATOR) == 0, "notification from \"%s\"", n.from);
        int which = -1;
        if (n.len == 5 && memcmp(n.msg, "hello", 5) == 0)
            which = 0;
        else if (n.len == 3 && memcmp(n.msg, bin, 3) == 0)
            which = 1;
        else if (n.len == 4096 && memcmp(n.msg, large, 4096) == 0)
            which = 2;
        CHECK(which >= 0 && !seen[which], "unexpected notification of %zu bytes \"%.*s\"", n.len,
              (int)(n.len < 32 ? n.len : 32), (const char *)n.msg);
        seen[which] = 1;
    }
    free(large);
    size_t len = 12345;
    char from[64];
    uint8_t msg[64];
    EXPECT(nixl_notif_next(agent, from, sizeof from, msg, sizeof msg, &len), NIXL_EMPTY);
    CHECK(len == 12345, "nixl_notif_next wrote *msg_len (%zu) without a message", len);
    EXPECT_OK(nixl_notif_send(agent, INITIATOR, (const uint8_t *)"bye", 3));

    /* 9. wait for the initiator to be done with our memory */
    size_t dlen = 0;
    free(read_file_wait(dir, "initiator.done", tmo, &dlen));
    EXPECT_OK(nixl_deregister(agent, NIXL_DRAM, regs, 2));
    EXPECT(nixl_deregister(agent, NIXL_DRAM, regs, 1), NIXL_ERR_NOT_FOUND);
    nixl_agent_free(agent);
    write_file_atomic(dir, "target.gone", "gone", 4);
    free(a);
    free(b);
    printf("[%s] passed\n", g_role);
    return 0;
}

static int run_initiator(void)
{
    nixl_agent *agent = new_agent(INITIATOR);
    uint8_t *ia = xmalloc(big_size), *ib = xmalloc(pieces_lsize);
    fill(ia, big_size, 99);
    fill(ib, pieces_lsize, 98);
    nixl_desc ra = {(uint64_t)(uintptr_t)ia, big_size, 0};
    nixl_desc rb = {(uint64_t)(uintptr_t)ib, pieces_lsize, 0};
    EXPECT_OK(nixl_register(agent, NIXL_DRAM, &ra, 1));
    EXPECT_OK(nixl_register(agent, NIXL_DRAM, &rb, 1));
    publish_md(agent, "initiator.md");
    load_peer_md(agent, "target.md", TARGET);
    size_t alen = 0;
    target_addrs_t *addrs = (target_addrs_t *)read_file_wait(dir, "target.addrs", tmo, &alen);
    CHECK(alen == sizeof *addrs, "target.addrs has %zu bytes", alen);
    const uint64_t A = addrs->a_addr, B = addrs->b_addr;
    free(addrs);
    printf("[%s] metadata exchanged\n", g_role);

    nixl_desc big_local = {(uint64_t)(uintptr_t)ia, big_size, 0};
    nixl_desc big_remote = {A, big_size, 0};

    /* Out of bounds against the peer's registration: refused at create. */
    {
        nixl_desc l = {(uint64_t)(uintptr_t)ia, 16, 0};
        nixl_desc r = {A + big_size - 8, 16, 0};
        nixl_xfer *x = NULL;
        EXPECT(nixl_xfer_create(agent, NIXL_WRITE, NIXL_DRAM, &l, 1, NIXL_DRAM, &r, 1, TARGET,
                                NULL, 0, backend, &x),
               NIXL_ERR_INVALID);
        CHECK(x == NULL, "a failed nixl_xfer_create wrote *out");
    }

    /* 2. big WRITE with a notification */
    fill(ia, big_size, 11);
    nixl_xfer *wr = NULL;
    EXPECT_OK(nixl_xfer_create(agent, NIXL_WRITE, NIXL_DRAM, &big_local, 1, NIXL_DRAM, &big_remote,
                               1, TARGET, (const uint8_t *)"big-write", 9, backend, &wr));
    CHECK(wr != NULL, "no request");
    expect_backend(wr, backend);
    EXPECT(nixl_xfer_status(wr), NIXL_ERR_INVALID); /* never posted */
    POST(wr);
    WAIT_OK(wr, tmo);

    /* 3. big READ, completion polled */
    EXPECT_NOTIF(agent, tmo, TARGET, "ready big-read");
    fill(ia, big_size, 99);
    nixl_xfer *rd = NULL;
    EXPECT_OK(nixl_xfer_create(agent, NIXL_READ, NIXL_DRAM, &big_local, 1, NIXL_DRAM, &big_remote,
                               1, TARGET, NULL, 0, backend, &rd));
    expect_backend(rd, backend);
    nixl_status s = POST(rd);
    int64_t deadline = now_ms() + tmo;
    while (s == NIXL_IN_PROGRESS) {
        CHECK(now_ms() < deadline, "big READ still in progress after %lld ms", (long long)tmo);
        sleep_ms(1);
        s = nixl_xfer_status(rd);
    }
    EXPECT(s, NIXL_OK);
    EXPECT(nixl_xfer_wait(rd, 0), NIXL_OK);
    VERIFY(ia, 0, big_size, 12, 0, "IA after the big READ");

    /* 4. 1000 pieces WRITE */
    nixl_desc *ld = xmalloc(sizeof(nixl_desc) * NPIECES), *rdsc = xmalloc(sizeof(nixl_desc) * NPIECES);
    fill_descs(ld, rdsc, ib, B);
    fill(ib, pieces_lsize, 21);
    nixl_xfer *mw = NULL;
    EXPECT_OK(nixl_xfer_create(agent, NIXL_WRITE, NIXL_DRAM, ld, NPIECES, NIXL_DRAM, rdsc, NPIECES,
                               TARGET, (const uint8_t *)"many-write", 10, backend, &mw));
    expect_backend(mw, backend);
    POST(mw);
    WAIT_OK(mw, tmo);
    EXPECT_OK(nixl_xfer_free(mw));

    /* 5. 1000 pieces READ */
    EXPECT_NOTIF(agent, tmo, TARGET, "ready many-read");
    fill(ib, pieces_lsize, 98);
    nixl_xfer *mr = NULL;
    EXPECT_OK(nixl_xfer_create(agent, NIXL_READ, NIXL_DRAM, ld, NPIECES, NIXL_DRAM, rdsc, NPIECES,
                               TARGET, NULL, 0, backend, &mr));
    free(ld);
    free(rdsc); /* the request keeps its own copy of the lists */
    expect_backend(mr, backend);
    POST(mr);
    WAIT_OK(mr, tmo);
    verify_pieces(ib, pieces_lsize, 0, 22, 98, "IB after the READ of 1000 pieces");
    EXPECT_OK(nixl_xfer_free(mr));

    /* 6. reposts of the big requests */
    fill(ia, big_size, 13);
    POST(wr);
    WAIT_OK(wr, tmo);
    EXPECT_NOTIF(agent, tmo, TARGET, "ready big-reread");
    fill(ia, big_size, 97);
    POST(rd);
    WAIT_OK(rd, tmo);
    VERIFY(ia, 0, big_size, 14, 0, "IA after the reposted big READ");
    EXPECT_OK(nixl_xfer_free(rd));

    /* 7. the policy chooses */
    fill(ia, big_size, 15);
    nixl_desc small_local = {(uint64_t)(uintptr_t)ia, 4096, 0};
    nixl_desc small_remote = {A, 4096, 0};
    nixl_xfer *pw = NULL;
    EXPECT_OK(nixl_xfer_create(agent, NIXL_WRITE, NIXL_DRAM, &small_local, 1, NIXL_DRAM,
                               &small_remote, 1, TARGET, (const uint8_t *)"policy-write", 12, NULL,
                               &pw));
    char chosen[32];
    EXPECT_OK(nixl_xfer_backend(pw, chosen, sizeof chosen));
    CHECK(strcmp(chosen, "shm") == 0 || strcmp(chosen, "tcp") == 0,
          "the policy chose backend \"%s\"", chosen);
    printf("[%s] the policy chose %s\n", g_role, chosen);
    POST(pw);
    WAIT_OK(pw, tmo);
    EXPECT_OK(nixl_xfer_free(pw));

    /* 8. standalone notifications */
    uint8_t bin[3] = {0, 0xff, 0};
    uint8_t *large = xmalloc(4096);
    fill(large, 4096, 31);
    EXPECT_OK(nixl_notif_send(agent, TARGET, (const uint8_t *)"hello", 5));
    EXPECT_OK(nixl_notif_send(agent, TARGET, bin, 3));
    EXPECT_OK(nixl_notif_send(agent, TARGET, large, 4096));
    free(large);
    EXPECT_NOTIF(agent, tmo, TARGET, "bye");

    /* 9. the target leaves: a transfer to it fails with NIXL_ERR_REMOTE_DISCONNECT, and does
     * not hang */
    nixl_xfer *late = NULL;
    EXPECT_OK(nixl_xfer_create(agent, NIXL_READ, NIXL_DRAM, &big_local, 1, NIXL_DRAM, &big_remote,
                               1, TARGET, NULL, 0, backend, &late));
    write_file_atomic(dir, "initiator.done", "done", 4);
    size_t glen = 0;
    free(read_file_wait(dir, "target.gone", tmo, &glen));
    int64_t t0 = now_ms();
    s = nixl_xfer_post(late);
    if (s == NIXL_IN_PROGRESS)
        s = nixl_xfer_wait(late, tmo);
    char le[512];
    last_error_copy(le, sizeof le);
    printf("[%s] a READ from the departed target ended %s in %lld ms: %s\n", g_role,
           status_name(s), (long long)(now_ms() - t0), le);
    CHECK(s == NIXL_ERR_REMOTE_DISCONNECT, "a READ from the departed target ended %s",
          status_name(s));
    EXPECT(nixl_xfer_status(late), NIXL_ERR_REMOTE_DISCONNECT);
    EXPECT_OK(nixl_xfer_free(late));
    s = nixl_notif_send(agent, TARGET, (const uint8_t *)"anyone?", 7);
    CHECK(s < 0, "a notification to the departed target: %s", status_name(s));

    /* 10. invalidate; free the agent before its last request */
    EXPECT_OK(nixl_invalidate_remote(agent, TARGET));
    nixl_xfer *x = NULL;
    EXPECT(nixl_xfer_create(agent, NIXL_WRITE, NIXL_DRAM, &big_local, 1, NIXL_DRAM, &big_remote,
                            1, TARGET, NULL, 0, backend, &x),
           NIXL_ERR_NOT_FOUND);
    EXPECT(nixl_notif_send(agent, TARGET, (const uint8_t *)"x", 1), NIXL_ERR_NOT_FOUND);
    EXPECT(nixl_invalidate_remote(agent, TARGET), NIXL_ERR_NOT_FOUND);
    nixl_agent_free(agent);
    EXPECT_OK(nixl_xfer_free(wr));
    free(ia);
    free(ib);
    printf("[%s] passed\n", g_role);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc != 6) {
        fprintf(stderr, "usage: %s <target|initiator> <dir> <shm|tcp> <full|small> <timeout_s>\n",
                argv[0]);
        return 2;
    }
    g_role = argv[1];
    dir = argv[2];
    backend = argv[3];
    make_layout(strcmp(argv[4], "small") == 0);
    tmo = (int64_t)atoi(argv[5]) * 1000;
    setvbuf(stdout, NULL, _IOLBF, 0);
    printf("[%s] backend %s, %llu-byte buffer, %d pieces (%llu bytes)\n", g_role, backend,
           (unsigned long long)big_size, NPIECES, (unsigned long long)pieces_rsize);
    if (strcmp(g_role, "target") == 0)
        return run_target();
    if (strcmp(g_role, "initiator") == 0)
        return run_initiator();
    fprintf(stderr, "unknown role %s\n", g_role);
    return 2;
}
